"""SIGKILL inside registration, at several points: afterwards, and after the next start, every
version that carries an alias is complete (its own run FINISHED with params and metrics, the
audit among its artifacts, the ledger charge of its training present), no run is left RUNNING,
and a rerun succeeds."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.config_files import load_config
from tests.killing import kill_when, rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["rounds=2", "audit.shadow_models=2", "gate.min_accuracy=0"]

# the moments to kill at: (what appeared in the MLflow store, extra delay in seconds)
KILL_POINTS = [
    ("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'", 0.0),
    ("SELECT COUNT(*) FROM model_versions", 0.0),
    ("SELECT COUNT(*) FROM registered_model_aliases", 0.0),
    ("SELECT COUNT(*) FROM registered_model_aliases", 0.15),
]


def _prepare(project: Path) -> None:
    from adapters.audit import audit_model
    from adapters.partition import partition_data
    from adapters.train import train_model
    from adapters.validate import validate_data

    cfg = load_config(project / "params.yaml", OVERRIDES)
    for stage in (validate_data, partition_data, train_model, audit_model):
        stage(cfg, project)


def _register_command(project: Path) -> list[str]:
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    return [sys.executable, "-m", "flows.cli", "stage", "register", "--root", str(project), *sets]


def _check_invariant(project: Path) -> list[str]:
    """Every aliased version is complete and accounted; returns the aliased versions."""
    from mlflow import MlflowClient

    from adapters.ledger_store import PrivacyLedger

    uri = f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    ledger = PrivacyLedger(project / ".fedpriv" / "privacy_ledger.sqlite")
    aliased = []
    for model in client.search_registered_models():
        for alias, version in (model.aliases or {}).items():
            mv = client.get_model_version(model.name, str(version))
            assert mv.tags.get("fedpriv.state") == "complete", (alias, version, mv.tags)
            run = client.get_run(mv.run_id)
            assert run.info.status == "FINISHED"
            assert run.data.params["rounds"] == "2" and "accuracy" in run.data.metrics
            artifacts = {a.path for a in client.list_artifacts(mv.run_id, "reports")}
            assert "reports/audit.json" in artifacts
            assert ledger.has_run(mv.tags["privacy.ledger_run"])
            aliased.append(str(version))
    experiment = client.get_experiment_by_name("fedpriv")
    if experiment is not None:
        running = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
        assert running == [], [r.info.run_id for r in running]
    return aliased


def test_sigkill_inside_registration_leaves_a_consistent_registry(project: Path) -> None:
    _prepare(project)
    db = project / ".fedpriv" / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = 0
    for query, delay in KILL_POINTS:
        before = rows(db, query)
        hit, _ = kill_when(_register_command(project), lambda q=query, b=before: rows(db, q) > b,
                           delay=delay, cwd=ROOT, env=env)
        killed += hit
    assert killed >= 3  # the kills happened inside registration, not after it
    # the next start reaps what the killed runs left, then registers
    from subprocess import run

    done = run(_register_command(project), cwd=ROOT, env=env, capture_output=True, text=True,
               timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    aliased = _check_invariant(project)
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["model_version"] in aliased


# where `fedpriv run` is killed, one run after another: (the file or row that appeared, delay)
RUN_KILL_POINTS = [
    ("runs/*/reports/validation.json", 0.0),
    ("runs/*/data/processed/partition.json", 0.2),
    ("runs/*/data/models/model.pt", 0.0),
    ("runs/*/reports/audit.json", 0.0),
    ("SELECT COUNT(*) FROM model_versions", 0.05),
    ("publish.json", 0.0),
    ("runs/*/reports/registration.json", 0.0),  # registered, not yet published
]


def test_sigkill_of_whole_runs_at_every_stage_is_cleaned_up_by_the_next_start(
        project: Path) -> None:
    """Kill `fedpriv run` (its process group: CLI and Prefect's server) at every stage, each
    kill in a new run; then one clean run. Afterwards: no workspace, journal or temp file is
    left; every killed flow run is CRASHED and none RUNNING; every aliased version is complete
    and charged; the published view is one whole run's and agrees with the registry; the run
    killed after its registration had its results published, not discarded."""
    import subprocess

    state = project / ".fedpriv"
    home = state / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)})
    command = [sys.executable, "-m", "flows.cli", "run", "--root", str(project),
               *[a for o in OVERRIDES for a in ("--set", o)]]

    def appeared(point: str) -> Callable[[], bool]:
        """True once the row or file appears anew (a file left by an earlier run, such as a
        journal the next start rolls forward, does not count until it is written again)."""
        if point.startswith("SELECT"):
            before = rows(state / "mlflow.db", point)
            return lambda: rows(state / "mlflow.db", point) > before
        seen = {p: _mtime(p) for p in state.glob(point)}
        return lambda: any(seen.get(p) != _mtime(p) for p in state.glob(point))

    killed = sum(kill_when(command, appeared(point), delay=delay, cwd=ROOT, env=env)[0]
                 for point, delay in RUN_KILL_POINTS)
    assert killed >= len(RUN_KILL_POINTS) - 1  # the journal lives for milliseconds

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "its registration had completed: published its results" in done.stdout + done.stderr
    assert list((state / "runs").iterdir()) == []
    assert not (state / "publish.json").exists()
    leftovers = [p for d in (project / "reports", project / "data", state)
                 for p in d.rglob(".*.tmp")]
    assert leftovers == []
    prefect_db = home / "prefect.db"
    assert rows(prefect_db, "SELECT COUNT(*) FROM flow_run WHERE state_type = 'RUNNING'") == 0
    assert rows(prefect_db, "SELECT COUNT(*) FROM flow_run WHERE state_type = 'CRASHED'") \
        == killed
    _check_invariant(project)
    _check_published_view(project)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _check_published_view(project: Path) -> None:
    """reports/ is the last run's, whole: its metrics are its MLflow run's, its version is
    the newest complete one."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registration = json.loads((project / "reports" / "registration.json").read_text())
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    logged = client.get_run(registration["run_id"]).data.metrics
    assert logged["accuracy"] == pytest.approx(metrics["accuracy"])
    versions = client.search_model_versions(f"name = '{registration['model_name']}'")
    complete = [int(v.version) for v in versions if v.tags.get("fedpriv.state") == "complete"]
    assert int(registration["model_version"]) == max(complete)
