"""The per-site data report of the configured table (adapters.data_report): written by the
partition stage before training, consistent with the training table, and in sites mode made
and kept at the site from its own file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.config_files import load_config
from adapters.data_report import (
    build_data_report,
    data_report_dict,
    write_site_data_report,
)
from adapters.tables import ClinicalTable
from fl_core.data.report import INCOMPLETE, LABEL_DROP
from fl_core.data.tables import ClientSplit


@pytest.mark.slow
def test_the_partition_stage_writes_the_heart_report_before_training(project: Path,
                                                                     capsys) -> None:
    from adapters.partition import partition_data
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", [])
    validate_data(cfg, project)
    partition_data(cfg, project)
    printed = capsys.readouterr().out
    assert "data report (heart; per site, before training)" in printed
    report = json.loads((project / "reports" / "data_report.json").read_text())
    total = report["total"]
    # drop_incomplete leaves 740 of the 920 patients (180 with an empty feature)
    assert (total["rows"], total["patients"], total["kept_patients"]) == (920, 920, 740)
    assert total["dropped_rows"] == {LABEL_DROP: 0, INCOMPLETE: 180}
    assert total["dropped_patients"] == 180
    sites = {s["site"]: s for s in report["sites"]}
    assert list(sites) == cfg.data.spec.sites
    assert sites["Switzerland"]["dropped_rows"][INCOMPLETE] == 77
    assert sites["Switzerland"]["missing"]["fbs"] == pytest.approx(0.61, abs=0.01)
    assert sites["Switzerland"]["not_measured"]["chol"] == 1.0  # every chol is 0
    for s in sites.values():  # prevalence = positive / kept patients, train + test = kept
        assert s["prevalence"] == pytest.approx(s["positive_patients"] / s["kept_patients"])
        assert s["train_patients"] + s["test_patients"] == s["kept_patients"]
        assert set(s["missing"]) == set(cfg.data.features)
    assert (project / "reports" / "data_report.md").read_text().startswith(
        "# Data report: heart")
    assert data_report_dict(cfg, project) == report  # what the model card reads


def test_the_report_agrees_with_the_training_table(raw_csv: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml", [])
    report = build_data_report(cfg.data, Path(__file__).resolve().parents[2])
    table = ClinicalTable.get(cfg.data, Path(__file__).resolve().parents[2])
    total = report.to_dict()["total"]
    assert total["kept_rows"] == len(table.table)
    assert total["dropped_rows"] == table.dropped_rows()
    assert total["positive_patients"] == int(table.table.groupby(cfg.data.spec.patient_id)
                                             ["label"].max().sum())


def test_a_site_reports_its_own_file_locally(project: Path, tmp_path: Path, capsys) -> None:
    from adapters.site_files import own_data_config, own_site_files

    cfg = load_config(project / "params.yaml", [])
    pooled = {s.site: s for s in build_data_report(cfg.data, project).sites}
    site = own_site_files(cfg, project)[2]  # Switzerland
    path = tmp_path / "site.csv"
    path.write_text(site.text())
    state = tmp_path / "state"
    report = write_site_data_report(own_data_config(cfg, path, site.site), state, site.site,
                                    ClientSplit(site.site, (1, 2), (3,)))
    assert report is not None and [s.site for s in report.sites] == [site.site]
    own = report.sites[0]
    mine = pooled[site.site]
    assert (own.rows, own.kept_patients, own.dropped_rows, own.prevalence) == (
        mine.rows, mine.kept_patients, mine.dropped_rows, mine.prevalence)
    assert (own.train_patients, own.test_patients) == (2, 1)
    kept = json.loads((state / "reports" / "data_report.json").read_text())
    assert [s["site"] for s in kept["sites"]] == [site.site]  # its own site only
    assert f"site {site.site}: data report" in capsys.readouterr().out


@pytest.mark.slow
def test_the_registered_run_carries_the_data_report(project: Path) -> None:
    from mlflow import MlflowClient

    from adapters.audit import audit_model
    from adapters.partition import partition_data
    from adapters.publish import publish_results
    from adapters.train import train_model
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", ["rounds=2", "audit.shadow_models=2"])
    for stage in (validate_data, partition_data, train_model, audit_model):
        stage(cfg, project)
    outcome = publish_results(cfg, project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(outcome.registration.run_id, "reports")}
    assert {"reports/data_report.json", "reports/data_report.md"} <= logged
