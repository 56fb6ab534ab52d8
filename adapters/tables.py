"""The clinical table read from its CSV file(s), cleaned once and shared across threads."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from adapters.csv_header import refuse_duplicate_columns
from fl_core.config.model import DataConfig
from fl_core.data.fingerprint import content_columns, record_fingerprints
from fl_core.data.partitioning import _stratified_split, assign_clients, site_rng
from fl_core.data.schema import DatasetSchema
from fl_core.data.tables import (
    LABEL,
    ClientData,
    ClientSplit,
    DataError,
    Partition,
    binary_label,
    not_measured,
    strip_text_cells,
)
from fl_core.data.transform import TabularTransform


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: identifies the dataset in reports and ledgers."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ClinicalTable:
    """The clinical table of one CSV (or of one file per site, ``data.site_files``), read
    lazily and shared across threads.

    Use :meth:`get`: it returns one instance per dataset key (each file's resolved path, size
    and modification time, and the cleaning options), creating it under a class-level lock.
    Construction reads nothing; the file is read on first access to :attr:`table`, once.
    Partitioning and transform options are passed per call, not fixed at construction.
    """

    _instances: ClassVar[dict[tuple, ClinicalTable]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, sources: tuple[tuple[Path, str | None], ...], config: DataConfig
                 ) -> None:
        self.sources = sources  # (resolved file, the site it holds or None), DataConfig.sources
        self.config = config
        self._table: pd.DataFrame | None = None
        self._incomplete: pd.DataFrame | None = None
        self._dropped = 0  # rows whose label is one of label.drop_values
        self._records: pd.Series | None = None  # patient id (text) → records' fingerprint
        self._lock = threading.Lock()
        self.reads = 0  # how many times the data were read (tests check laziness)

    @property
    def path(self) -> Path:
        """The (first) file read: what messages name."""
        return self.sources[0][0]

    @classmethod
    def get(cls, config: DataConfig, root: str | Path = ".") -> ClinicalTable:
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
        refuse_duplicate_columns(path)
        frame = strip_text_cells(  # BOM-safe; padded text cells are their stripped value
            pd.read_csv(path, keep_default_na=True, encoding="utf-8-sig"))
        spec = self.spec
        frame, foreign = spec.attach_file_site(frame, site)
        if foreign:
            raise DataError(f"{path}: {foreign} row(s) name another site than {site!r} in "
                            f"column {spec.site!r}; a site's file holds its own rows only")
        needed = list(dict.fromkeys([*spec.required_columns, *self.config.features]))
        missing_cols = [c for c in needed if c not in frame.columns]
        if missing_cols:
            raise DataError(f"{path}: missing column(s) {missing_cols}")
        # every declared feature the file has: the records' fingerprint covers them all
        kept = [*needed, *(c for c in content_columns(spec) if c in frame and c not in needed)]
        return frame[kept].copy()

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
        self._records = record_fingerprints(
            frame, spec, frame[spec.patient_id].astype(str).str.strip())
        frame = frame[list(dict.fromkeys([*spec.required_columns, *cfg.features]))].copy()
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
            if spec.feature(col).numeric:
                # an int64 column cannot hold NaN, and a text token ('.', 'NA_NA') read the
                # whole column as text: blank the tokens first, then read the numbers
                frame[col] = pd.to_numeric(frame[col].where(~mask)).astype(float)
            else:
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

    def record_keys(self) -> dict[int, str]:
        """Patient id → the fingerprint of all their records in the file(s) (every row, the
        dropped ones included; :func:`fl_core.data.fingerprint.record_fingerprints`): the
        privacy ledger's account of the patient."""
        self.table  # noqa: B018 - reading the table computes them
        assert self._records is not None
        ids = pd.to_numeric(self._records.index).astype(np.int64)  # as the table's ids
        return dict(zip(ids.tolist(),
                        self._records.tolist(), strict=True))

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
        (:func:`adapters.site_files.site_client_data`).
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
