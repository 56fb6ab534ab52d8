"""Data that come one file per site, with no site column (schema ``site_source: file``):
each file is that site's rows, in simulation (``data.site_files``) and at a site's worker
(sites mode); the result is exactly the one-table dataset's."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapters.config_files import load_config
from adapters.gx_validation import validate_site_file, validate_sources
from adapters.schema_files import load_schema
from adapters.site_files import site_client_data
from adapters.tables import ClinicalTable
from fl_core.config.model import ConfigError
from fl_core.data.schema import SchemaError, parse_schema
from fl_core.data.tables import DataError

ROOT = Path(__file__).resolve().parents[2]
TENSORS = ("x_train", "y_train", "x_test", "y_test", "train_patients", "test_patients")


@pytest.fixture(autouse=True)
def fresh_cache():
    ClinicalTable.clear_cache()
    yield
    ClinicalTable.clear_cache()


def _slug(site: str) -> str:
    return site.lower().replace(" ", "_")


def write_site_files(project: Path) -> dict[str, str]:
    """The heart table as one file per hospital without its site column, a schema that says
    so, and ``params.yaml`` naming the files; returns site → file (relative)."""
    with (ROOT / "data" / "raw" / "heart_disease_uci.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    column = header.index("dataset")
    by_site: dict[str, list[list[str]]] = {}
    for row in rows:
        by_site.setdefault(row[column], []).append(row[:column] + row[column + 1:])
    files = {}
    for site, site_rows in by_site.items():
        files[site] = f"data/raw/{_slug(site)}.csv"
        with (project / files[site]).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header[:column] + header[column + 1:])
            writer.writerows(site_rows)
    schema = yaml.safe_load((ROOT / "data" / "schemas" / "heart.yaml").read_text())
    del schema["site"]
    schema.update(id="heart-files", site_source="file")
    (project / "data" / "schemas" / "heart_files.yaml").write_text(
        yaml.safe_dump(schema, sort_keys=False))  # feature order is the encoding order
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(schema="data/schemas/heart_files.yaml", site_files=files)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return files


@pytest.fixture
def per_site(project: Path) -> tuple[Path, dict[str, str]]:
    return project, write_site_files(project)


def test_the_schema_declares_one_file_per_site() -> None:
    tree = yaml.safe_load((ROOT / "data" / "schemas" / "heart.yaml").read_text())
    del tree["site"]
    spec = parse_schema({**tree, "site_source": "file"}, "t")
    assert (spec.site, spec.site_source) == ("site", "file")  # the column fedpriv adds
    with pytest.raises(SchemaError, match="site_groups maps values of a site column"):
        parse_schema({**tree, "site_source": "file",
                      "site_groups": {"Cleveland": ["x"]}}, "t")
    with pytest.raises(SchemaError, match="site: required key missing"):
        parse_schema(tree, "t")  # a site column table must name its column
    assert load_schema(ROOT / "data" / "schemas" / "heart.yaml").site_source == "column"


def test_site_files_read_as_the_one_table(per_site: tuple[Path, dict[str, str]]) -> None:
    project, _ = per_site
    files_cfg = load_config(project / "params.yaml")
    table_cfg = load_config(ROOT / "params.yaml",
                            [f"data.path={ROOT / 'data/raw/heart_disease_uci.csv'}"])
    files = ClinicalTable.get(files_cfg.data, project)
    table = ClinicalTable.get(table_cfg.data, ROOT)
    left = files.table.sort_values("id").reset_index(drop=True)
    right = table.table.rename(columns={"dataset": "site"}).sort_values("id") \
        .reset_index(drop=True)
    assert left[list(right.columns)].equals(right)
    assert len(files.incomplete_table) == len(table.incomplete_table) == 180
    a, _, pa = files.partitioned(files_cfg.data, 42)
    b, _, pb = table.partitioned(table_cfg.data, 42)
    assert pa.clients == pb.clients
    for x, y in zip(a, b, strict=True):
        assert x.client_id == y.client_id
        assert all(getattr(x, t).equal(getattr(y, t)) for t in TENSORS)


def test_site_files_validate_site_by_site(per_site: tuple[Path, dict[str, str]]) -> None:
    project, files = per_site
    cfg = load_config(project / "params.yaml")
    report = validate_sources(cfg.data.sources(project), cfg.data)
    assert report.success, report.message()
    assert report.sites == {"Cleveland": 304, "Hungary": 293, "Switzerland": 123,
                            "VA Long Beach": 200}
    # a bad value is named with its site, the file it is in
    hungary = project / files["Hungary"]
    text = hungary.read_text().splitlines()
    age = text[0].split(",").index("age")
    cells = text[1].split(",")
    cells[age] = "150"
    hungary.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    report = validate_sources(cfg.data.sources(project), cfg.data)
    assert not report.success
    assert [(f.site, f.column) for f in report.failures] == [("Hungary", "age")]
    # a missing file: the site and the file are named
    (project / files["Switzerland"]).unlink()
    report = validate_sources(cfg.data.sources(project), cfg.data)
    assert not report.success
    assert "site 'Switzerland'" in report.failures[0].detail
    assert "switzerland.csv" in report.failures[0].detail


def test_a_file_with_another_sites_rows_is_refused(per_site: tuple[Path, dict[str, str]]
                                                   ) -> None:
    """A file may keep a site column; then it must name the file's own site."""
    project, files = per_site
    path = project / files["Cleveland"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",site", *(f"{row},Cleveland" for row in lines[1:-1]),
                               lines[-1] + ",Hungary"]) + "\n")
    cfg = load_config(project / "params.yaml")
    report = validate_sources(cfg.data.sources(project), cfg.data)
    assert [f.expectation for f in report.failures] == ["file_rows_of_one_site"]
    assert "1 of 304 rows name another site than 'Cleveland'" in report.failures[0].detail
    with pytest.raises(DataError, match="1 row\\(s\\) name another site than 'Cleveland'"):
        ClinicalTable.get(cfg.data, project).table  # noqa: B018


def test_a_patient_id_in_two_sites_files_is_refused(per_site: tuple[Path, dict[str, str]]
                                                    ) -> None:
    project, files = per_site
    shutil.copy(project / files["Cleveland"], project / files["Hungary"])
    cfg = load_config(project / "params.yaml")
    report = validate_sources(cfg.data.sources(project), cfg.data)
    assert not report.success
    assert any(f.expectation == "expect_column_values_to_be_unique" for f in report.failures)
    # several records per patient: no uniqueness check, but the loader refuses the overlap
    many = load_config(project / "params.yaml", ["schema.records_per_patient=many"])
    with pytest.raises(DataError, match="304 patient id\\(s\\) occur in more than one site's"):
        ClinicalTable.get(many.data, project).table  # noqa: B018


def test_site_files_configuration_errors_name_the_key(
        per_site: tuple[Path, dict[str, str]]) -> None:
    project, _ = per_site
    params = project / "params.yaml"
    with pytest.raises(ConfigError, match="data.site_files: the schema .* declares one file per "
                                          "site \\(site_source: file\\); name each"):
        load_config(params, ["data.site_files=null"])
    # sites mode: the coordinator names no file (each site's worker has its own)
    sites = load_config(params, ["data.site_files=null", "federation.mode=sites",
                                 "federation.sites=[{id: Cleveland, work_pool: a}, "
                                 "{id: Hungary, work_pool: b}]"])
    assert sites.data.site_files is None
    with pytest.raises(ConfigError, match="data.site_files: unknown site\\(s\\) \\['Mars'\\]"):
        load_config(params, ["data.site_files={Mars: x.csv}"])
    with pytest.raises(ConfigError, match="data.site_files: the schema .*heart.yaml reads each "
                                          "row's site from the column 'dataset'"):
        load_config(params, [f"data.schema={ROOT / 'data/schemas/heart.yaml'}"])


def test_a_sites_own_file_without_site_column_is_the_simulations_client(
        per_site: tuple[Path, dict[str, str]]) -> None:
    project, files = per_site
    cfg = load_config(project / "params.yaml")
    simulated = {c.client_id: c for c in
                 ClinicalTable.get(cfg.data, project).partitioned(cfg.data, cfg.seed)[0]}
    at_site = load_config(project / "params.yaml", [
        "data.site_files=null", "federation.mode=sites",
        "federation.sites=[{id: Cleveland, work_pool: a}, {id: Hungary, work_pool: b}]"])
    for site, name in files.items():
        own = site_client_data(at_site, project / name, site)
        assert own.train_ids == simulated[site].train_ids
        assert all(getattr(own, t).equal(getattr(simulated[site], t)) for t in TENSORS)
        report, summary = validate_site_file(at_site, project / name, site)
        assert report.success and summary["site"] == site
        assert summary["rows"] == report.sites[site]


@pytest.mark.slow
def test_cli_validates_partitions_and_splits_site_files(
        per_site: tuple[Path, dict[str, str]]) -> None:
    project, files = per_site
    fedpriv = [sys.executable, "-m", "flows.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*fedpriv, *args, "--root", str(project)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    done = run("stage", "validate")
    assert done.returncode == 0, done.stderr
    report = json.loads((project / "reports" / "validation.json").read_text())
    assert report["file"] == files and set(report["sha256"]) == set(files)
    done = run("stage", "partition")
    assert done.returncode == 0, done.stderr
    assert "4 clients, 592 train / 148 test patients" in done.stdout
    done = run("split-sites", "--out", "sites")
    assert done.returncode == 0, done.stderr
    for site, name in files.items():
        copied = project / "sites" / site.lower().replace(" ", "-") / Path(name).name
        assert copied.read_text() == (project / name).read_text()
    (project / files["Hungary"]).write_text("")
    done = run("stage", "validate")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1].endswith(
        "site 'Hungary' (" + str(project / files["Hungary"]) + "): the data file is empty "
        "(0 bytes)")


@pytest.mark.slow
def test_sessions_on_files_without_a_site_column_train_the_simulations_model(
        per_site: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Four site sessions, each given only its own file (no site column) and its site's
    name, serve the coordinator over the endpoint: the model is the simulation's."""
    import torch

    from adapters.federation_endpoint import FederationEndpoint
    from adapters.partition import partition_data
    from adapters.train import train_at_sites, train_model
    from adapters.validate import validate_data
    from tests.adapters.test_site_session import OVERRIDES, _shutdown, _start_sessions
    from tests.federation import LOOPBACK, make_pki, wait_ready

    project, files = per_site
    cfg = load_config(project / "params.yaml", OVERRIDES)
    validate_data(cfg, project)
    partition_data(cfg, project)
    simulated = train_model(cfg, project)
    pki = make_pki(tmp_path / "pki")
    endpoint = FederationEndpoint(listen=LOOPBACK, run_id="run1", sites=list(files),
                                  tls=pki.tls).start()
    threads = _start_sessions(cfg, {s: project / f for s, f in files.items()}, endpoint, pki,
                              tmp_path)
    ready = wait_ready(endpoint, list(files))
    assert all(m.passed for m in ready.values()), {s: m.validation for s, m in ready.items()}
    coordinator = tmp_path / "coordinator"
    try:
        at_sites = train_at_sites(cfg, coordinator, "run1", endpoint, ready)
    finally:
        _shutdown(endpoint)
        endpoint.stop()
    for thread in threads:
        thread.join(timeout=30)
    assert at_sites.accuracy == pytest.approx(simulated.accuracy, abs=1e-9)
    sim_model = torch.load(project / "data" / "models" / "model.pt", weights_only=True)
    site_model = torch.load(coordinator / ".fedpriv" / "runs" / "run1" / "data" / "models"
                            / "model.pt", weights_only=True)
    assert torch.allclose(sim_model["params"], site_model["params"], atol=1e-6)
