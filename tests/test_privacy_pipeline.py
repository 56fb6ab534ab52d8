"""DP in the real pipeline: accounting through the stages, the ledger around registration."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from fl_core.config import ConfigError, load_config
from fl_core.ledger import BudgetExceededError, PrivacyLedger

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]
ROOT = Path(__file__).resolve().parents[1]
SITES = {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}


def _stages(root: Path, *names: str, overrides: tuple[str, ...] = ("rounds=2",)) -> None:
    from tasks.audit import audit_model
    from tasks.partition import partition_data
    from tasks.publish import publish_results
    from tasks.train import train_model
    from tasks.validate import validate_data

    stages = {"validate": validate_data, "partition": partition_data, "train": train_model,
              "audit": audit_model, "register": publish_results}
    cfg = load_config(root / "params.yaml", list(overrides))
    for name in names:
        stages[name](cfg, root)


def _ledger(root: Path) -> PrivacyLedger:
    return PrivacyLedger(root / ".fedpriv" / "privacy_ledger.sqlite")


def _versions(root: Path) -> list:
    from mlflow import MlflowClient

    db = root / ".fedpriv" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return client.search_model_versions("name='fedpriv-heart'")


def _fingerprint() -> str:
    from fl_core.data import file_fingerprint

    return file_fingerprint(ROOT / "data" / "raw" / "heart_disease_uci.csv")


def test_run_reports_epsilon_that_a_fresh_accountant_confirms(project: Path) -> None:
    from opacus.accountants import PRVAccountant

    _stages(project, "validate", "partition", "train", "audit", "register")
    train = json.loads((project / "reports" / "train.json").read_text())
    privacy = train["privacy"]
    steps = 2 * 2 * math.ceil(1 / privacy["sample_rate"])  # rounds × local_epochs × ⌈1/q⌉
    assert privacy["steps_planned"] == steps
    assert set(privacy["client_steps"].values()) == {steps}
    fresh = PRVAccountant()
    fresh.history = [(privacy["noise_multiplier"], privacy["sample_rate"], steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = fresh.get_epsilon(delta=1e-5)
    for eps in privacy["client_epsilon"].values():
        assert eps == pytest.approx(expected, rel=1e-9)
    assert 0.95 <= privacy["epsilon"] <= 1.0  # calibrated to the target from below
    assert privacy["site_epsilon"] == dict.fromkeys(SITES, privacy["epsilon"])

    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["epsilon"] == privacy["epsilon"] and metrics["delta"] == 1e-5
    rows = list(csv.DictReader((project / "reports" / "rounds.csv").open()))
    per_round = [float(r["epsilon"]) for r in rows]
    assert 0 < per_round[0] < per_round[1] == pytest.approx(privacy["epsilon"])

    registration = json.loads((project / "reports" / "registration.json").read_text())
    entries = _ledger(project).entries()
    assert {e.site for e in entries} == SITES
    assert {e.run_id for e in entries} == {registration["run_id"]}
    assert {e.fingerprint for e in entries} == {_fingerprint()}
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}")
    tags = client.get_run(registration["run_id"]).data.tags
    assert tags["privacy"] == "patient-level DP-SGD"
    assert float(tags["privacy.epsilon"]) == pytest.approx(privacy["epsilon"], rel=1e-5)


def test_run_that_would_overspend_is_refused_before_training(project: Path) -> None:
    _ledger(project).charge(_fingerprint(), {"Hungary": 9.5}, 1e-5, "prv", "earlier", 10.0)
    _stages(project, "validate", "partition")
    with pytest.raises(BudgetExceededError, match=r"site 'Hungary' has spent ε=9.5") as err:
        _stages(project, "train")
    assert "privacy.lifetime_epsilon=10" in str(err.value)
    assert not (project / "data" / "models" / "model.pt").exists()
    assert not (project / "reports" / "train.json").exists()
    assert [e.run_id for e in _ledger(project).entries()] == ["earlier"]
    # a run that fits what is left is accepted
    _stages(project, "train", "audit", "register",
            overrides=("rounds=2", "privacy.epsilon=0.5"))
    spent = {b.site: b.epsilon for b in _ledger(project).balances()}
    assert 9.95 < spent["Hungary"] <= 10.0 and spent["Cleveland"] <= 0.5


def test_ledger_refusal_at_release_unregisters_the_model(project: Path) -> None:
    """Two runs each fit alone; the one committing second is refused and rolled back."""
    _stages(project, "validate", "partition", "train", "audit")
    # a concurrent run commits first and leaves less than this run's ε at Cleveland
    _ledger(project).charge(_fingerprint(), {"Cleveland": 9.5}, 1e-5, "prv", "other", 10.0)
    with pytest.raises(BudgetExceededError, match="was not registered"):
        _stages(project, "register")
    assert _versions(project) == []
    assert not (project / "reports" / "metrics.json").exists()
    assert [e.run_id for e in _ledger(project).entries()] == ["other"]


def test_run_killed_mid_training_spends_nothing(project: Path) -> None:
    _stages(project, "validate", "partition")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "stage", "train", "--root", str(project),
         "--set", "rounds=200"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("round   2/200") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _ledger(project).entries() == []
    assert not (project / "reports" / "train.json").exists()
    # the whole lifetime budget is still there for the next run
    _stages(project, "train", "audit", "register",
            overrides=("rounds=2", "privacy.epsilon=10", "privacy.accountant=rdp"))
    assert max(b.epsilon for b in _ledger(project).balances()) > 9.9


def test_delta_too_large_for_a_site_is_a_config_error(project: Path) -> None:
    _stages(project, "validate", "partition")
    # 1/(10·243) (Cleveland, the largest site) is the binding bound, not Switzerland's 37
    with pytest.raises(ConfigError,
                       match=r"privacy.delta=0.004 .*client 'Cleveland' has 243 .*1/\(10·243\)"):
        _stages(project, "train", overrides=("rounds=2", "privacy.delta=0.004"))
    assert not (project / "reports" / "train.json").exists()


def test_cli_budget_shows_the_ledger(project: Path) -> None:
    _ledger(project).charge(_fingerprint(), {"Cleveland": 1.25}, 1e-5, "rdp", "run-x", 10.0)
    # a subprocess: the CLI imports Prefect, whose log handlers must not bind to pytest's capture
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "budget", "--root", str(project), "--entries"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "Cleveland" in out and "1.2500" in out and "8.7500" in out and "run-x" in out


def test_server_side_dp_fedavg_is_accounted_per_round(project: Path) -> None:
    from fl_core.compression import dense_size
    from fl_core.privacy import epsilon_spent

    overrides = ("rounds=3", "privacy.enabled=false", "privacy.server.enabled=true",
                 "privacy.server.noise_multiplier=2.0", "aggregation.method=fedavg",
                 "anomaly.enabled=false", "aggregation.max_norm_factor=0",
                 "data.partition=by_patient", "client_fraction=0.5")
    _stages(project, "validate", "partition", "train", overrides=overrides)
    privacy = json.loads((project / "reports" / "train.json").read_text())["privacy"]
    assert privacy["epsilon"] is None and privacy["client_rate"] == 0.5
    # one subsampled Gaussian mechanism per round at the client sampling rate
    assert privacy["client_level_epsilon"] == pytest.approx(
        epsilon_spent(2.0, 0.5, 3, 1e-5, "prv"))
    assert privacy["client_level_epsilon"] < epsilon_spent(2.0, 1.0, 3, 1e-5, "prv")
    rows = list(csv.DictReader((project / "reports" / "rounds.csv").open()))
    model_bytes = dense_size(19)  # the dense logistic regression: 18 features and a bias
    asked = [int(r["bytes_downloaded"]) // model_bytes for r in rows]
    assert all(2 <= a < 20 for a in asked) and len(set(asked)) > 1
    with pytest.raises(ConfigError, match="aggregation.method=fedavg"):
        load_config(project / "params.yaml", ["privacy.server.enabled=true"])
