"""Loading, patient-based partitioning and transforms for the clinical table.

The raw CSV is immutable input. :class:`FederatedDataLoader` reads it lazily, once per dataset
key, and is the only global state in ``fl_core`` (a documented cache: a class-level map of
instances guarded by a lock). Partitioning works on *patients*: every record of a patient goes
to exactly one client and to one side of that client's train/test split.

Column names, the label rule and "not measured" tokens come from the dataset schema
(``data.schema``, :mod:`fl_core.schema`). Preprocessing (clipping, scaling, filling missing
values, one-hot encoding) is *declared* there too, never fitted: no statistic of any patient,
training or test, reaches the model through it, so it spends no privacy (README: Preprocessing
spends no privacy).
"""

from __future__ import annotations

import hashlib
import json
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from fl_core.config import DataConfig, FeatureReference
from fl_core.schema import DatasetSchema, LabelRule

LABEL = "label"
"""The binary label column of the cleaned table (the schema's label rule applied)."""


class DataError(ValueError):
    """The data cannot be loaded or partitioned as configured."""


@dataclass(frozen=True)
class ClientSplit:
    """The patients of one client, by side of its train/test split."""

    client_id: str
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]


@dataclass(frozen=True)
class Partition:
    """Patients → clients, and per client the 80/20 split. Serialisable to JSON."""

    clients: tuple[ClientSplit, ...]
    scheme: str
    seed: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "scheme": self.scheme,
                "seed": self.seed,
                "clients": [
                    {"client_id": c.client_id, "train": list(c.train_ids), "test": list(c.test_ids)}
                    for c in self.clients
                ],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Partition:
        raw = json.loads(text)
        clients = tuple(
            ClientSplit(c["client_id"], tuple(c["train"]), tuple(c["test"])) for c in raw["clients"]
        )
        return cls(clients=clients, scheme=raw["scheme"], seed=raw["seed"])


@dataclass(frozen=True)
class ClientData:
    """One client's encoded tensors. ``x_*`` are float32 ``[patients, features]``."""

    client_id: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]
    # the patient id of each x_train row (None: one row per patient, in train_ids order)
    train_patients: torch.Tensor | None = None
    # the patient id of each x_test row (None: one row per patient, in test_ids order)
    test_patients: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    def patient_ids(self) -> torch.Tensor:
        """The patient id of each training row: the privacy unit of DP-SGD."""
        if self.train_patients is not None:
            return self.train_patients
        return torch.tensor(self.train_ids, dtype=torch.int64)

    def test_patient_ids(self) -> torch.Tensor:
        """The patient id of each test row (the membership audit's non-member unit)."""
        if self.test_patients is not None:
            return self.test_patients
        return torch.tensor(self.test_ids, dtype=torch.int64)


@dataclass(frozen=True)
class TabularTransform:
    """Declared preprocessing: clipping, scaling and encoding with constants fixed in advance.

    Numeric column j (declared ``low_j, high_j, center_j, scale_j, fill_j`` in the dataset
    schema) becomes ``(clip(x_j, low_j, high_j) − center_j) / scale_j``, a missing value being
    ``fill_j`` first, so every output lies in ``[(low_j − center_j)/scale_j,
    (high_j − center_j)/scale_j]``; each column in ``missing_indicators`` (a feature with
    "not measured" tokens) also gets a 0/1 indicator of missingness. Categorical columns become
    one-hot blocks over their declared ``categories`` (or their ordinal code), booleans 0/1
    (``booleans``: the false and true tokens); a missing category becomes its
    ``missing_category`` default. Nothing is estimated from rows: each output row is a
    function of its input row alone, and :meth:`fit` only checks the columns.
    """

    features: tuple[str, ...]
    reference: dict[str, FeatureReference]
    missing_category: dict[str, str]
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    booleans: dict[str, tuple[str, str]] = field(default_factory=dict)
    one_hot: bool = True
    missing_indicators: tuple[str, ...] = ()
    # per feature, the recorded values that mean "not measured" (read as missing)
    missing_tokens: dict[str, tuple[float | str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        undeclared = [f for f in self.features if f not in self.reference and not (
            f in self.missing_category and (f in self.categories or f in self.booleans))]
        if undeclared:
            raise DataError(f"no declared preprocessing for feature(s) {undeclared} "
                            f"(data.schema)")

    @classmethod
    def from_config(cls, config: DataConfig) -> TabularTransform:
        """The transform ``data.*`` and its dataset schema declare."""
        spec = config.spec
        chosen = [spec.feature(f) for f in config.features]
        return cls(features=tuple(config.features), reference=dict(config.reference),
                   missing_category=dict(config.missing_category),
                   categories={n: tuple(f.categories) for n, f in zip(config.features, chosen,
                                                                      strict=True)
                               if f.type == "categorical" and f.categories},
                   booleans={n: f.tokens for n, f in zip(config.features, chosen, strict=True)
                             if f.type == "boolean"},
                   one_hot=config.one_hot, missing_indicators=config.missing_indicators,
                   missing_tokens={n: tuple(f.missing_values) for n, f
                                   in zip(config.features, chosen, strict=True)
                                   if f.missing_values})

    def fit(self, train: pd.DataFrame) -> TabularTransform:
        """Check that ``train`` has the declared columns; read no value. Returns ``self``."""
        self._check_columns(train)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The whole transform as plain JSON-able data (to save beside a model)."""
        return {
            "features": list(self.features),
            "reference": {k: v.model_dump() for k, v in self.reference.items()},
            "missing_category": dict(self.missing_category),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "booleans": {k: list(v) for k, v in self.booleans.items()},
            "one_hot": self.one_hot,
            "missing_indicators": list(self.missing_indicators),
            "missing_tokens": {k: list(v) for k, v in self.missing_tokens.items()},
            "columns": self.columns(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TabularTransform:
        """Inverse of :meth:`state_dict` (the declared constants are validated again)."""
        return cls(features=tuple(state["features"]),
                   reference={k: FeatureReference.model_validate(v)
                              for k, v in state["reference"].items()},
                   missing_category=dict(state["missing_category"]),
                   categories={k: tuple(v) for k, v in state["categories"].items()},
                   booleans={k: (v[0], v[1]) for k, v in state["booleans"].items()},
                   one_hot=bool(state["one_hot"]),
                   missing_indicators=tuple(state["missing_indicators"]),
                   missing_tokens={k: tuple(v) for k, v
                                   in state.get("missing_tokens", {}).items()})

    def columns(self) -> list[str]:
        """The encoded model input columns, in order (``<feature>=<category>``,
        ``<feature>_missing``)."""
        names: list[str] = []
        for col in self.features:
            if col in self.categories and self.one_hot:
                names += [f"{col}={c}" for c in self.categories[col]]
            else:
                names.append(col)
            if col in self.missing_indicators:
                names.append(f"{col}_missing")
        return names

    def transform(self, frame: pd.DataFrame) -> torch.Tensor:
        """``[rows, len(columns())]`` float32, row by row as the class docstring states."""
        self._check_columns(frame)
        blocks: list[np.ndarray] = []
        for col in self.features:
            values = frame[col]
            if col in self.reference:
                blocks.append(_scaled(values, self.reference[col])[:, None])
            elif col in self.booleans:
                filled = values.fillna(self.missing_category[col])
                true = self.booleans[col][1]
                blocks.append(filled.map(lambda v, t=true: _as_bool(v, t))
                              .to_numpy(dtype=float)[:, None])
            else:
                blocks.append(self._encoded(col, values.fillna(self.missing_category[col])))
            if col in self.missing_indicators:
                blocks.append(values.isna().to_numpy().astype(float)[:, None])
        return torch.tensor(np.hstack(blocks), dtype=torch.float32)

    def _encoded(self, col: str, values: pd.Series) -> np.ndarray:
        cats = self.categories[col]
        codes = values.map({c: i for i, c in enumerate(cats)})
        if codes.isna().any():
            unknown = sorted(set(values[codes.isna()].astype(str)))
            raise DataError(f"{col}: unknown categor(y/ies) {unknown}; accepted: {list(cats)}")
        index = codes.to_numpy(dtype=int)
        return np.eye(len(cats))[index] if self.one_hot else index[:, None].astype(float)

    def _check_columns(self, frame: pd.DataFrame) -> None:
        absent = [c for c in self.features if c not in frame.columns]
        if absent:
            raise DataError(f"column(s) {absent} missing from the table to transform")


def _scaled(values: pd.Series, ref: FeatureReference) -> np.ndarray:
    """``(clip(x, low, high) − center) / scale``, a missing (or non-numeric) x read as ``fill``."""
    num = pd.to_numeric(values, errors="coerce").astype(float).fillna(ref.fill).to_numpy()
    return (np.clip(num, ref.low, ref.high) - ref.center) / ref.scale


def _as_bool(value: object, true: str) -> float:
    """1.0 for the true token (case and surrounding blanks ignored), else 0.0."""
    if isinstance(value, str):
        return 1.0 if value.strip().upper() == true.strip().upper() else 0.0
    return float(bool(value))


def not_measured(values: pd.Series, tokens: list[float | str]) -> pd.Series:
    """Where ``values`` holds one of the schema's "not measured" ``tokens`` (numbers compare
    as numbers, text as stripped text)."""
    numbers = [t for t in tokens if isinstance(t, int | float)]
    texts = {str(t).strip() for t in tokens if not isinstance(t, int | float)}
    mask = pd.to_numeric(values, errors="coerce").isin(numbers) if numbers else \
        pd.Series(False, index=values.index)
    if texts:
        mask |= values.astype(str).str.strip().isin(texts) & values.notna()
    return mask


def binary_label(values: pd.Series, rule: LabelRule) -> pd.Series:
    """The schema's label rule applied to the raw label column: int64 0/1."""
    comparison = rule.comparison()
    if comparison is not None:
        op, number = comparison
        return op(pd.to_numeric(values), number).astype(np.int64)
    positive = set(rule.positive_values or [])
    return values.astype(str).str.strip().isin(positive).astype(np.int64)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: identifies the dataset in reports and ledgers."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FederatedDataLoader:
    """The clinical table of one CSV (or of one file per site, ``data.site_files``), read
    lazily and shared across threads.

    Use :meth:`get`: it returns one instance per dataset key (each file's resolved path, size
    and modification time, and the cleaning options), creating it under a class-level lock.
    Construction reads nothing; the file is read on first access to :attr:`table`, once.
    Partitioning and transform options are passed per call, not fixed at construction.
    """

    _instances: ClassVar[dict[tuple, FederatedDataLoader]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, sources: tuple[tuple[Path, str | None], ...], config: DataConfig
                 ) -> None:
        self.sources = sources  # (resolved file, the site it holds or None), DataConfig.sources
        self.config = config
        self._table: pd.DataFrame | None = None
        self._incomplete: pd.DataFrame | None = None
        self._dropped = 0  # rows whose label is one of label.drop_values
        self._lock = threading.Lock()
        self.reads = 0  # how many times the data were read (tests check laziness)

    @property
    def path(self) -> Path:
        """The (first) file read: what messages name."""
        return self.sources[0][0]

    @classmethod
    def get(cls, config: DataConfig, root: str | Path = ".") -> FederatedDataLoader:
        sources, stamps = [], []
        for name, site in config.sources(root):
            path = name.resolve()
            try:
                stat = path.stat()
            except FileNotFoundError:
                key = "data.path" if site is None else f"data.site_files.{site}"
                raise DataError(f"{path}: data file not found ({key})") from None
            sources.append((path, site))
            stamps.append((str(path), site, stat.st_size, stat.st_mtime_ns))
        key = (
            tuple(stamps),
            tuple(config.features), config.drop_incomplete, config.spec.model_dump_json(),
        )
        with cls._instances_lock:
            instance = cls._instances.get(key)
            if instance is None:
                instance = cls(tuple(sources), config)
                cls._instances[key] = instance
            return instance

    @classmethod
    def clear_cache(cls) -> None:
        with cls._instances_lock:
            cls._instances.clear()

    @property
    def table(self) -> pd.DataFrame:
        """The cleaned table: core features, site, patient id and a binary ``label``."""
        if self._table is None:
            with self._lock:
                if self._table is None:
                    self._table = self._read()
        return self._table

    @property
    def spec(self) -> DatasetSchema:
        """The dataset schema the table is read with."""
        return self.config.spec

    def _read_source(self, path: Path, site: str | None) -> pd.DataFrame:
        """One file's needed columns, its site column attached under ``site_source: file``."""
        frame = pd.read_csv(path, keep_default_na=True, encoding="utf-8-sig")  # BOM-safe
        spec = self.spec
        frame, foreign = spec.attach_file_site(frame, site)
        if foreign:
            raise DataError(f"{path}: {foreign} row(s) name another site than {site!r} in "
                            f"column {spec.site!r}; a site's file holds its own rows only")
        needed = list(dict.fromkeys([*spec.required_columns, *self.config.features]))
        missing_cols = [c for c in needed if c not in frame.columns]
        if missing_cols:
            raise DataError(f"{path}: missing column(s) {missing_cols}")
        return frame[needed].copy()

    def _raw_frame(self) -> pd.DataFrame:
        """Every source's rows, in order; one file per site must not share a patient id."""
        frames = [self._read_source(path, site) for path, site in self.sources]
        if len(frames) == 1:
            return frames[0]
        spec = self.spec
        frame = pd.concat(frames, ignore_index=True)
        ids = frame[spec.patient_id].astype(str).str.strip()
        sites_per_patient = frame[spec.site].groupby(ids).nunique()
        shared = int((sites_per_patient > 1).sum())
        if shared:
            # a count only: the ids are the sites' patient identifiers
            raise DataError(f"{shared} patient id(s) occur in more than one site's file "
                            f"(data.site_files): one id must be one patient across the "
                            f"files; make the ids unique per patient (e.g. prefix the site)")
        return frame

    def _read(self) -> pd.DataFrame:
        self.reads += 1
        cfg, spec = self.config, self.config.spec
        frame = self._raw_frame()
        # one site per patient (the site of their first record; site_groups mapped), taken
        # before dropping rows so that a site's own file (split-sites) gives the same sites
        frame[spec.site] = spec.site_of(frame)
        dropped = spec.label.dropped(frame[spec.label.column])
        self._dropped = int(dropped.sum())
        frame = frame[~dropped].copy()
        marked = {col: not_measured(frame[col], spec.feature(col).missing_values)
                  for col in cfg.missing_indicators}
        # a token is "not measured" only where a value was recorded at all: such a row still
        # counts as complete (its feature gets a missing indicator instead)
        present = frame[list(cfg.features)].notna()
        for col, mask in marked.items():
            if not mask.any():
                continue
            if spec.feature(col).numeric and not pd.api.types.is_float_dtype(frame[col]):
                frame[col] = frame[col].astype(float)  # an int64 column cannot hold NaN
            frame.loc[mask, col] = np.nan
        complete = present.all(axis=1)
        frame[LABEL] = binary_label(frame[spec.label.column], spec.label)
        frame[spec.patient_id] = frame[spec.patient_id].astype(np.int64)
        if cfg.drop_incomplete:
            self._incomplete = frame[~complete].reset_index(drop=True)
            frame = frame[complete]
        else:
            self._incomplete = frame.iloc[0:0]
        return frame.reset_index(drop=True)

    def dropped_rows(self) -> dict[str, int]:
        """Rows of the file left out of :attr:`table`, by the key that leaves them out:
        ``label.drop_values`` (no label: dropped everywhere, the audit included) and
        ``data.drop_incomplete`` (kept as :attr:`incomplete_table`, an audit population)."""
        self.table  # noqa: B018 - reading the table counts them
        return {"label.drop_values": self._dropped,
                "data.drop_incomplete": len(self.incomplete_table)}

    def describe_dropped(self) -> str:
        """:meth:`dropped_rows` in words ("" when none), e.g. ``rows left out: 12 with a
        label in label.drop_values (<the values>); 3 incomplete (...)``."""
        counts = self.dropped_rows()
        parts = []
        if counts["label.drop_values"]:
            parts.append(f"{counts['label.drop_values']} with a label in label.drop_values "
                         f"({', '.join(self.spec.label.drop_values)})")
        if counts["data.drop_incomplete"]:
            parts.append(f"{counts['data.drop_incomplete']} incomplete "
                         f"(data.drop_incomplete; audit population)")
        return f"rows left out: {'; '.join(parts)}" if parts else ""

    @property
    def incomplete_table(self) -> pd.DataFrame:
        """The patients ``drop_incomplete`` left out (never trained on): an audit population."""
        self.table  # noqa: B018 - reading the table fills this too
        assert self._incomplete is not None
        return self._incomplete

    def site_of_patient(self) -> dict[int, str]:
        """Patient id → hospital, for every patient of the cleaned table."""
        ids, sites = self.table[self.spec.patient_id], self.table[self.spec.site]
        return dict(zip(ids.tolist(), sites.astype(str), strict=True))

    # ---------------------------------------------------------------- partitioning
    def partition(self, config: DataConfig, seed: int) -> Partition:
        """Assign patients to clients and split each client's patients 80/20, stratified.

        ``config`` gives the scheme (it is per call: the loader is shared by every caller of
        the same file, whatever partitioning each of them wants). Under ``by_site`` each
        site's split uses :func:`site_rng` (seed, site name): it depends on that site's
        patients alone, so a hospital holding only its own rows gets the same split
        (:func:`fl_core.site_data.site_client_data`).
        """
        cfg = config
        patients = self.table.groupby(self.spec.patient_id).agg(
            site=(self.spec.site, "first"), label=(LABEL, "max"))
        rng = np.random.default_rng(seed)
        groups = assign_clients(patients.index.to_numpy(), patients["site"].to_numpy(),
                                patients["label"].to_numpy(), cfg, rng)
        clients = []
        for client_id, ids in groups.items():
            labels = patients.loc[ids, "label"].to_numpy()
            # by_site: each hospital's split draws from its own generator, so a site can
            # compute it alone from its own file (sites mode); by_patient: the shared one
            split_rng = site_rng(seed, client_id) if cfg.partition == "by_site" else rng
            train, test = _stratified_split(ids, labels, cfg.test_fraction, split_rng)
            clients.append(ClientSplit(client_id, tuple(map(int, train)), tuple(map(int, test))))
        return Partition(clients=tuple(clients), scheme=cfg.partition, seed=seed)

    def fit_transform(self, config: DataConfig, partition: Partition) -> TabularTransform:
        """The declared transform, its columns checked on this partition's training rows.

        No value of any patient enters it: the result is the same for every partition.
        """
        train_ids = [i for c in partition.clients for i in c.train_ids]
        train = self.table[self.table[self.spec.patient_id].isin(train_ids)]
        return TabularTransform.from_config(config).fit(train)

    def encoded(
        self, config: DataConfig, partition: Partition
    ) -> tuple[list[ClientData], TabularTransform]:
        """The clients' tensors, encoded with the declared transform (nothing fitted)."""
        transform = self.fit_transform(config, partition)
        return self.client_data(partition, transform), transform

    def partitioned(
        self, config: DataConfig, seed: int
    ) -> tuple[list[ClientData], TabularTransform, Partition]:
        """A fresh partition for ``seed`` and its encoded client data (no files written)."""
        partition = self.partition(config, seed)
        data, transform = self.encoded(config, partition)
        return data, transform, partition

    def client_data(self, partition: Partition, transform: TabularTransform) -> list[ClientData]:
        indexed = self.table.set_index(self.spec.patient_id, drop=False)
        out = []
        for split in partition.clients:
            train = indexed.loc[list(split.train_ids)]
            test = indexed.loc[list(split.test_ids)]
            out.append(
                ClientData(
                    client_id=split.client_id,
                    x_train=transform.transform(train),
                    y_train=torch.tensor(train[LABEL].to_numpy(), dtype=torch.float32),
                    x_test=transform.transform(test),
                    y_test=torch.tensor(test[LABEL].to_numpy(), dtype=torch.float32),
                    train_ids=split.train_ids,
                    test_ids=split.test_ids,
                    train_patients=torch.tensor(train[self.spec.patient_id].to_numpy(),
                                                dtype=torch.int64),
                    test_patients=torch.tensor(test[self.spec.patient_id].to_numpy(),
                                               dtype=torch.int64),
                )
            )
        return out


def site_rng(seed: int, site: str) -> np.random.Generator:
    """The generator of ``site``'s train/test split under ``by_site``: a function of the seed
    and the site's name only, so the split of a site depends on (seed, its patients) and not
    on any other site's data (a hospital computes it alone, README: Data)."""
    return np.random.default_rng([seed, zlib.crc32(site.encode("utf-8"))])


def assign_clients(
    ids: np.ndarray, sites: np.ndarray, labels: np.ndarray, config: DataConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Patients → clients as ``data.partition`` says: one client per hospital (``by_site``) or
    ``data.num_clients`` clients, IID or label-skewed Dirichlet(``data.dirichlet_alpha``)
    (``by_patient``). ``ids``, ``sites`` and ``labels`` are per patient; each client's ids
    come sorted. The one partitioning rule: the pipeline's split and the audit's shadow
    federations both use it."""
    if config.partition == "by_site":
        return {str(site): np.sort(ids[sites == site]) for site in sorted(np.unique(sites))}
    return _split_patients(ids, labels, config.num_clients, config.dirichlet_alpha, rng)


def _split_patients(
    ids: np.ndarray, labels: np.ndarray, k: int, alpha: float | None, rng: np.random.Generator,
    min_patients: int = 5, max_tries: int = 1000,
) -> dict[str, np.ndarray]:
    """IID (alpha None) or label-skewed Dirichlet(alpha) assignment of patients to k clients."""
    if k * min_patients > len(ids):
        raise DataError(
            f"data.num_clients={k} needs at least {k * min_patients} patients "
            f"({min_patients} per client); the data has {len(ids)}"
        )
    names = [f"client-{i:03d}" for i in range(k)]
    if alpha is None:
        shuffled = rng.permutation(ids)
        parts = np.array_split(shuffled, k)
        return {n: np.sort(part) for n, part in zip(names, parts, strict=True)}
    for _ in range(max_tries):
        owner = np.empty(len(ids), dtype=np.int64)
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                owner[part] = client
        if np.bincount(owner, minlength=k).min() >= min_patients:
            return {n: np.sort(ids[owner == i]) for i, n in enumerate(names)}
    raise DataError(
        f"data.dirichlet_alpha={alpha} with {k} clients left a client with fewer than "
        f"{min_patients} patients in {max_tries} draws; raise alpha or lower num_clients"
    )


def _stratified_split(
    ids: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(ids[labels == cls])
        n_test = int(round(test_fraction * len(members)))
        n_test = min(n_test, len(members) - 1)  # keep at least one training patient per class
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
