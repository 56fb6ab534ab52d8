"""The per-site data report (:mod:`fl_core.data.report`) of the configured table: printed
before training and kept as ``reports/data_report.json`` and ``reports/data_report.md``.

The partition stage writes it (the flow, ``fedpriv stage partition`` and the dry run alike),
in the run's workspace; a successful run publishes it to ``reports/`` with the rest.
:func:`data_report_dict` is what other writers (the model card) read.

Privacy: in simulation the coordinator holds the table, so per-site counts are nothing new
to it. In sites mode a site prints and keeps its own report in its state folder
(:func:`write_site_data_report`); nothing of it is sent to the coordinator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.artifacts import Paths, write_json_atomic, write_text_atomic
from adapters.tables import ClinicalTable
from fl_core.config.model import DataConfig, PipelineConfig
from fl_core.data.report import DataReport, data_report
from fl_core.data.tables import ClientSplit, Partition

REPORT_JSON = "data_report.json"
REPORT_MD = "data_report.md"


def build_data_report(data: DataConfig, root: str | Path = ".",
                      partition: Partition | None = None) -> DataReport:
    """The report of ``data``'s file(s) under ``root`` (read through the shared
    :class:`ClinicalTable`, so the same rows the training table was cleaned from)."""
    table = ClinicalTable.get(data, root)
    raw = table._raw_frame()  # every row as read, site attached: the table's own source
    notes = ["validation passed for every row (a failure stops the run; it drops nothing)"]
    return data_report(raw, data.spec, data.features, drop_incomplete=data.drop_incomplete,
                       partition=partition, notes=notes)


def report_paths(paths: Paths) -> tuple[Path, Path]:
    """Where a run's report goes: ``<reports>/data_report.json`` and ``.md``."""
    return paths.reports / REPORT_JSON, paths.reports / REPORT_MD


def write_data_report(report: DataReport, folder: Path, *, echo: bool = True) -> Path:
    """Write ``report`` as JSON and markdown into ``folder``; print it with ``echo``.
    Returns the JSON file."""
    target = folder / REPORT_JSON
    write_json_atomic(target, report.to_dict())
    write_text_atomic(folder / REPORT_MD, report.markdown())
    if echo:
        print(report.text(), end="", flush=True)
    return target


def run_data_report(cfg: PipelineConfig, paths: Paths, partition: Partition) -> DataReport:
    """The partition stage's report: built, written into the run's reports, printed."""
    report = build_data_report(cfg.data, paths.root, partition)
    write_data_report(report, paths.reports)
    return report


def data_report_dict(cfg: PipelineConfig, root: str | Path = ".",
                     run_id: str | None = None) -> dict[str, Any]:
    """The run's data report as a dict (``reports/data_report.json`` of the run, or the
    published one without ``run_id``); built from the data when the file is not there."""
    paths = Paths.of(cfg, root, run_id)
    path = report_paths(paths)[0]
    if path.is_file():
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    return build_data_report(cfg.data, paths.root).to_dict()


def write_site_data_report(data: DataConfig, state_dir: Path, site: str,
                           split: ClientSplit | None = None) -> DataReport | None:
    """Sites mode: a site's own report of its own file (``data``: the site's own data
    configuration), with its train/test ``split``, printed in its worker's log and kept in
    its state folder (``<state>/reports/data_report.{json,md}``); never sent anywhere. A
    report that cannot be made is said in the log, and the session goes on."""
    partition = None if split is None else Partition(clients=(split,), scheme="by_site",
                                                     seed=0)
    try:
        report = build_data_report(data, partition=partition)
        print(f"site {site}: ", end="")
        write_data_report(report, state_dir / "reports")
    except (OSError, ValueError) as exc:  # informational: never what stops a session
        print(f"site {site}: no data report ({type(exc).__name__}: {exc})", flush=True)
        return None
    return report
