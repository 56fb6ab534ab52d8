"""Sites mode, the site's side: one hospital's data from the one CSV it holds.

In sites mode each hospital runs its own worker that sees only its own file (the rows of the
embedded CSV whose site column, named by the dataset schema, is that hospital; ``fedpriv
split-sites`` writes them). Under ``data.partition=by_site`` a site's train/test split
depends only on the seed and its own patients (:func:`fl_core.data.partitioning.site_rng`),
so :func:`site_client_data` on the site's file gives exactly the
:class:`~fl_core.data.tables.ClientData` the simulation builds for it from the full file:
same train/test patients, same tensors. Loading and encoding are the simulation's own
(:class:`~adapters.tables.ClinicalTable`, :class:`~fl_core.data.transform.TabularTransform`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from adapters.csv_header import refuse_duplicate_columns
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError, DataConfig, PipelineConfig, site_slug
from fl_core.data.schema import DatasetSchema
from fl_core.data.tables import ClientData, DataError


def site_client_data(cfg: PipelineConfig, csv_path: Path, site_id: str) -> ClientData:
    """The encoded train/test data of ``site_id`` from ``csv_path``, a file of its rows only.

    Equal to the simulation's client ``site_id`` (full file, same config and seed). Raises
    :class:`~fl_core.data.tables.DataError` (one line naming the site and the file) if the file is
    missing or empty, cannot be read, holds a row of another site, or has no complete patient;
    :class:`~fl_core.config.model.ConfigError` unless ``data.partition`` is ``by_site``.
    """
    if cfg.data.partition != "by_site":
        raise ConfigError(f"data.partition={cfg.data.partition}: a site's own data needs "
                          f"data.partition=by_site (one client per hospital)")
    path = Path(csv_path).resolve()
    where = f"site {site_id!r}, file {path}"
    if not path.is_file():
        raise DataError(f"{where}: the data file does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: the data file is empty (0 bytes)")
    data_cfg = own_data_config(cfg, path, site_id)
    loader = ClinicalTable.get(data_cfg)
    column = data_cfg.spec.site
    try:
        sites = [*loader.table[column].astype(str),
                 *loader.incomplete_table[column].astype(str)]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            csv.Error, ValueError) as exc:
        raise DataError(f"{where}: cannot be read as the clinical CSV "
                        f"({type(exc).__name__})") from None
    if not sites:
        dropped = loader.dropped_rows()["label.drop_values"]
        raise DataError(f"{where}: the data file has no rows" + (
            f" with a label ({dropped} row(s) with a label in label.drop_values)"
            if dropped else ""))
    foreign = sum(s != site_id for s in sites)
    if foreign:
        # the count only: a worker's error may travel, the other site's values must not
        raise DataError(f"{where}: {foreign} of {len(sites)} row(s) belong to another site "
                        f"(column {column!r}); a site's file holds its own rows only")
    if loader.table.empty:
        raise DataError(f"{where}: no complete patient (all {len(sites)} row(s) miss a core "
                        f"feature; data.drop_incomplete)")
    (client,), _, _ = loader.partitioned(data_cfg, cfg.seed)
    return client


def own_data_config(cfg: PipelineConfig, csv_path: Path, site_id: str) -> DataConfig:
    """``cfg.data`` reading only the site's own file: as ``data.path``, or under the schema's
    ``site_source: file`` (no site column) as the one entry of ``data.site_files``."""
    path = str(Path(csv_path).resolve())
    if cfg.data.spec.site_source == "file":
        return cfg.data.model_copy(update={"site_files": {site_id: path}})
    return cfg.data.model_copy(update={"path": path, "site_files": None})


def site_dropped_rows(cfg: PipelineConfig, csv_path: Path, site_id: str) -> dict[str, int]:
    """The rows of a site's file left out at load, by key (counts only: they may go to the
    coordinator); :meth:`~adapters.tables.ClinicalTable.dropped_rows`."""
    return ClinicalTable.get(own_data_config(cfg, csv_path, site_id)).dropped_rows()


def site_record_keys(cfg: PipelineConfig, csv_path: Path, site_id: str) -> dict[int, str]:
    """Patient id → the fingerprint of their records in the site's own file: the accounts
    of the site's ledger (:meth:`~adapters.tables.ClinicalTable.record_keys`; the same keys
    as the pooled file gives, whatever the site or the ids are called)."""
    return ClinicalTable.get(own_data_config(cfg, csv_path, site_id)).record_keys()


# ------------------------------------------------------------------------- split-sites
@dataclass(frozen=True)
class SiteFile:
    """One site's rows of a CSV: what ``fedpriv split-sites`` writes for it; ``patient_id``
    is the patient-id column of the dataset schema."""

    site: str
    slug: str
    header: list[str]
    rows: list[list[str]]
    patient_id: str = ""

    @property
    def patients(self) -> int:
        """Distinct patient ids among the rows (the row count if there is no id column)."""
        pid = self.patient_id
        column = self.header.index(pid) if pid in self.header else None
        if column is None:
            return len(self.rows)
        return len({r[column] for r in self.rows if column < len(r)})

    def text(self) -> str:
        """The CSV text: the original header, then this site's rows in their original order."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows(self.rows)
        return out.getvalue()


def split_by_site(path: Path, spec: DatasetSchema) -> list[SiteFile]:
    """The rows of the CSV at ``path`` grouped by site (the schema's site column), sites in
    order of first appearance. Cells are kept as text, exactly as read. Raises
    :class:`~fl_core.data.tables.DataError` if the file has no site column or no rows, a row has no
    site, or two sites would share a folder name."""
    path = Path(path)
    site_column = spec.site
    records = _csv_records(path, "data.path")
    if not records or site_column not in records[0]:
        raise DataError(f"{path}: no {site_column!r} column in the header: cannot split by "
                        f"site")
    header, body = records[0], [r for r in records[1:] if r]  # blank lines carry no row
    if not body:
        raise DataError(f"{path}: the data file has no rows")
    mapped = _row_sites(path, header, body, spec)
    # a patient's rows all go to the site of their first record (several records per patient)
    if spec.patient_id in header:
        mapped = _site_of_first_record(body, mapped, header.index(spec.patient_id))
    groups: dict[str, list[list[str]]] = {}
    for row, site in zip(body, mapped, strict=True):
        groups.setdefault(site, []).append(row)
    files = [SiteFile(site, site_slug(site), header, rows, spec.patient_id)
             for site, rows in groups.items()]
    _check_slugs(path, files)
    return files


def _row_sites(path: Path, header: list[str], body: list[list[str]],
               spec: DatasetSchema) -> list[str]:
    """Each row's site: its site cell through the schema's site groups and default. Raises
    :class:`~fl_core.data.tables.DataError` naming the first row with no site or one that maps
    to none (rows are numbered as in the file, the header being row 1)."""
    column = header.index(spec.site)
    raw = pd.Series([row[column] if column < len(row) else "" for row in body], dtype=object)
    mapped = spec.site_values(raw.where(raw.str.strip() != ""))
    for line, (value, site) in enumerate(zip(raw, mapped, strict=True), start=2):
        if not value.strip():
            raise DataError(f"{path}: row {line} has no site (column {spec.site!r})")
        if not isinstance(site, str):
            raise DataError(f"{path}: row {line}: site value {value!r} is in no group of "
                            f"site_groups and the schema has no site_default")
    return list(mapped)


def _site_of_first_record(body: list[list[str]], sites: list[str], pid: int) -> list[str]:
    """``sites`` with every row moved to the site of its patient's first row (column ``pid``)."""
    first: dict[str, str] = {}
    for row, site in zip(body, sites, strict=True):
        first.setdefault(row[pid].strip() if pid < len(row) else "", site)
    return [first[row[pid].strip() if pid < len(row) else ""] for row in body]


def _csv_records(path: Path, key: str) -> list[list[str]]:
    """Every row of the CSV at ``path`` as text cells (the header first); ``key`` is the
    configuration key that named the file."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            records = list(csv.reader(handle))
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found ({key})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as CSV ({type(exc).__name__})") from None
    refuse_duplicate_columns(path)  # split files would repeat the name pandas then renames
    return records


def own_site_files(cfg: PipelineConfig, root: Path) -> list[SiteFile]:
    """The site files ``split-sites`` writes: ``data.path`` split by the schema's site
    column, or, for data that already come one file per site (``data.site_files``), each
    site's file as it is."""
    if not cfg.data.site_files:
        return split_by_site(root / cfg.data.path, cfg.data.spec)
    files = []
    for path, site in cfg.data.sources(root):
        assert site is not None
        records = _csv_records(path, f"data.site_files.{site}")
        if not records:
            raise DataError(f"{path}: the data file is empty (data.site_files.{site})")
        body = [r for r in records[1:] if r]
        files.append(SiteFile(site, site_slug(site), records[0], body, cfg.data.spec.patient_id))
    _check_slugs(root, files)
    return files


def _check_slugs(path: Path, files: list[SiteFile]) -> None:
    """Every site gets a folder name of its own."""
    slugs: dict[str, str] = {}
    for f in files:
        if not f.slug:
            raise DataError(f"{path}: site {f.site!r} gives no folder name (no letter or digit)")
        if f.slug in slugs:
            raise DataError(f"{path}: sites {slugs[f.slug]!r} and {f.site!r} would share the "
                            f"folder {f.slug!r}")
        slugs[f.slug] = f.site
