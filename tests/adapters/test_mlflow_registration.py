"""The MLflow registration against a real local SQLite store (the gate decides the alias;
its rules: tests/fl_core/audit/test_gate.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.config_files import build_config
from fl_core.config.model import PipelineConfig
from fl_core.data.transform import TabularTransform
from fl_core.model.networks import build_model, get_flat_params
from tests.conftest import data_config

PRIVATE = {"epsilon": 0.99, "mia_tpr_at_0_1pct_fpr": 0.0, "empirical_epsilon_lower_bound": 0.0,
           "randomness": "secure"}
PASSING = {"accuracy": 0.82, "auc": 0.80, "mia_auc": 0.52, "delta": None, **PRIVATE}
REFUSED = {"accuracy": 0.61, "auc": 0.70, "mia_auc": 0.55, "delta": None, **PRIVATE}
HISTORY = [
    {"round": r, "train_loss": 1.0 / r, "test_loss": 1.1 / r, "accuracy": 0.6 + 0.05 * r,
     "auc": 0.7 + 0.04 * r, "bytes_uploaded": 1000 * r, "bytes_downloaded": 900 * r,
     "failed_clients": "", "seconds": float("nan")}
    for r in (1, 2, 3)
]


# --- register_model -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, already migrated MLflow database: copying it saves ~4 s of migrations a test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def cfg(tmp_path: Path, migrated_db: Path) -> PipelineConfig:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(migrated_db, state / "mlflow.db")
    return build_config({
        "state_dir": str(state),
        # the gate by accuracy alone: these tests are about registration (the evaluation's
        # size and bounds rules: tests/fl_core/audit/test_gate.py)
        "gate": {"min_accuracy": 0.75, "min_test_patients": 0, "min_test_positives": 0,
                 "min_test_negatives": 0, "all_sites_evaluated": False, "min_auc_lower": 0,
                 "min_balanced_accuracy_lower": 0},
        "mlflow": {"experiment": "test-exp", "model_name": "test-model"},
    })


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "reports" / "audit.json"
    path.parent.mkdir()
    path.write_text('{"mia_auc": 0.52}\n')
    return path


TRANSFORM = TabularTransform.from_config(data_config())


@pytest.fixture
def model() -> torch.nn.Module:
    return build_model("mlp", len(TRANSFORM.columns()), hidden_units=8, seed=3)


def _served(model: torch.nn.Module) -> Any:
    from adapters.serving import ServedModel

    return ServedModel({"kind": "mlp", "num_features": len(TRANSFORM.columns()),
                        "hidden_units": 8, "params": get_flat_params(model),
                        "columns": TRANSFORM.columns(), "opacus_fixed": False}, TRANSFORM)


def _client(cfg: PipelineConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow_tracking_uri, registry_uri=cfg.mlflow_tracking_uri)


def _register(cfg: PipelineConfig, model: torch.nn.Module, metrics: dict[str, Any],
              artifacts: list[Path] | None = None) -> Any:
    from adapters.mlflow_registration import register_model

    return register_model(cfg, _served(model), metrics, HISTORY, artifacts or [], run_name="t")


def _aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version as strings (the SQLite registry returns versions as ints)."""
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _only_run(cfg: PipelineConfig) -> Any:
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_passing_model_becomes_champion(
    cfg: PipelineConfig, model: torch.nn.Module, report: Path
) -> None:
    import mlflow.pyfunc

    from adapters.serving import as_model_input, declared_example

    result = _register(cfg, model, PASSING, [report])
    assert result.gate.passed
    assert result.model_version == "1"
    assert result.aliases == ("challenger", "champion")

    client = _client(cfg)
    name = cfg.mlflow.model_name
    for alias in ("challenger", "champion"):
        assert str(client.get_model_version_by_alias(name, alias).version) == "1"
    version = client.get_model_version(name, "1")
    assert version.tags["gate"] == "passed"
    assert version.run_id == result.run_id

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow_tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    rows = as_model_input(declared_example(TRANSFORM), TRANSFORM)
    with torch.no_grad():
        expected = torch.sigmoid(model(TRANSFORM.transform(rows))).double().numpy()
    assert loaded.predict(rows) == pytest.approx(expected, abs=1e-6)

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((Path(cfg.state_dir) / "mlartifacts").as_uri())
    assert run.data.tags["gate"] == "passed"
    assert run.data.params["gate.min_accuracy"] == "0.75"
    assert run.data.params["mlflow.model_name"] == "test-model"
    assert "delta" not in run.data.metrics  # None is skipped, never invented
    assert "failed_clients" not in run.data.metrics and "seconds" not in run.data.metrics
    assert run.data.metrics["accuracy"] == pytest.approx(0.82)  # final value is the latest
    assert run.data.metrics["auc"] == pytest.approx(0.80)  # below the last round's 0.82
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert [(m.step, m.value) for m in losses] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    uploads = client.get_metric_history(result.run_id, "bytes_uploaded")
    assert sorted(m.step for m in uploads) == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(result.run_id, "reports")] == [
        "reports/audit.json"
    ]


def test_refused_model_is_challenger_only(cfg: PipelineConfig, model: torch.nn.Module) -> None:
    client = _client(cfg)
    name = cfg.mlflow.model_name

    first = _register(cfg, model, REFUSED)
    assert not first.gate.passed and first.aliases == ("challenger",)
    assert _aliases(client, name) == {"challenger": "1"}  # no champion

    _register(cfg, model, PASSING)
    third = _register(cfg, model, REFUSED)
    assert third.model_version == "3"
    assert _aliases(client, name) == {"challenger": "3", "champion": "2"}  # champion unchanged
    tags = client.get_model_version(name, "3").tags
    assert tags["gate"] == "refused"
    assert "accuracy" in tags["gate_reasons"]
    run_tags = client.get_run(third.run_id).data.tags
    assert run_tags["gate"] == "refused" and run_tags["gate_reasons"] == tags["gate_reasons"]


def test_privacy_failure_is_recorded_on_the_version(
    cfg: PipelineConfig, model: torch.nn.Module
) -> None:
    result = _register(cfg, model, {**PASSING, "empirical_epsilon_lower_bound": 2.0})
    assert result.aliases == ("challenger",)
    tags = _client(cfg).get_model_version(cfg.mlflow.model_name, "1").tags
    assert tags["gate"] == "refused" and "privacy failure" in tags["gate_reasons"]


def test_alias_failure_leaves_nothing_registered(
    cfg: PipelineConfig, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    def broken(self: Any, name: str, alias: str, version: Any) -> None:
        raise ConnectionError("registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(ConnectionError, match="registry went away"):  # not swallowed or wrapped
        _register(cfg, model, PASSING)

    client = _client(cfg)
    assert client.search_model_versions(f"name='{cfg.mlflow.model_name}'") == []
    assert client.search_registered_models() == []  # the model it created is gone too
    assert _only_run(cfg).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_failure_restores_previous_aliases(
    cfg: PipelineConfig, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    _register(cfg, model, PASSING)  # version 1: challenger + champion
    original = MlflowClient.set_registered_model_alias

    def flaky(self: Any, name: str, alias: str, version: Any) -> None:
        if alias == "champion" and str(version) != "1":
            raise TimeoutError("champion alias timed out")
        original(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(TimeoutError):
        _register(cfg, model, PASSING)  # version 2 gets challenger, then champion fails

    client = _client(cfg)
    name = cfg.mlflow.model_name
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert _aliases(client, name) == {"challenger": "1", "champion": "1"}
    statuses = sorted(r.info.status for r in client.search_runs(
        [client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]


def test_rollback_leaves_a_concurrent_runs_promotion(
    cfg: PipelineConfig, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run B creates version 2 and makes it challenger and champion; before B finishes, run C
    promotes version 3; then B fails. B's undo is compare-and-set: it puts back only what
    still points at its own version, so C's champion stays."""
    from mlflow import MlflowClient

    _register(cfg, model, PASSING)  # version 1
    name = cfg.mlflow.model_name
    original_set_tag = MlflowClient.set_tag
    state = {"done": False}

    def concurrent_promotion_then_crash(self: Any, run_id: str, key: str, value: Any) -> None:
        if key == "model_version" and not state["done"]:
            state["done"] = True
            monkeypatch.setattr(MlflowClient, "set_tag", original_set_tag)
            _register(cfg, model, PASSING)  # run C: version 3, challenger + champion
            raise ConnectionError("run B lost the tracking server")
        original_set_tag(self, run_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_tag", concurrent_promotion_then_crash)
    with pytest.raises(ConnectionError, match="run B lost"):
        _register(cfg, model, PASSING)  # run B: version 2
    client = _client(cfg)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'")) \
        == ["1", "3"]  # B's version is gone
    assert _aliases(client, name) == {"challenger": "3", "champion": "3"}  # C's stand


def test_rollback_puts_back_what_still_points_at_its_version(
    cfg: PipelineConfig, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    _register(cfg, model, PASSING)  # version 1: challenger + champion
    original_set_tag = MlflowClient.set_tag

    def crash(self: Any, run_id: str, key: str, value: Any) -> None:
        if key == "model_version":
            raise ConnectionError("tracking server gone")
        original_set_tag(self, run_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_tag", crash)
    with pytest.raises(ConnectionError):
        _register(cfg, model, PASSING)  # version 2 got both aliases, then the run failed
    assert _aliases(_client(cfg), cfg.mlflow.model_name) == {"challenger": "1", "champion": "1"}


@pytest.mark.slow
def test_two_first_runs_initialise_a_fresh_store_without_a_race(tmp_path: Path) -> None:
    """Four processes open the same fresh SQLite store at once: all succeed and see one
    schema (before the lock, MLflow's table creation raced: `table ... already exists`)."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = ("from adapters.mlflow_registration import open_store\n"
            f"c = open_store({uri!r})\n"
            "print(len(c.search_experiments()))\n")
    from tests.conftest import ROOT

    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-800:] for _, e in outs]
    assert all(o.strip().splitlines()[-1] == "1" for o, _ in outs)  # the Default experiment


def test_bad_inputs_fail_before_any_run(cfg: PipelineConfig, model: torch.nn.Module) -> None:
    from adapters.mlflow_registration import register_model

    with pytest.raises(ValueError, match="round"):
        register_model(cfg, _served(model), PASSING, [{"accuracy": 0.8}], [])
    with pytest.raises(FileNotFoundError):
        register_model(cfg, _served(model), PASSING, HISTORY, [Path(cfg.state_dir) / "nope"])
    client = _client(cfg)
    assert client.get_experiment_by_name(cfg.mlflow.experiment) is None


# --- the round log (sites mode) -------------------------------------------------------------


def _run_log(tmp_path: Path) -> Any:
    """A sites-mode run's round log holding one round, and the coordinator's key."""
    from adapters.round_log import RunLog, append_round
    from fl_core.federation.identity import new_private_key
    from fl_core.federation.round_log import RoundEntry

    key = new_private_key()
    path = tmp_path / "run" / "reports" / "round_log.jsonl"
    append_round(path, RoundEntry(1, ("hungary",), (), "ab" * 32), run_id="run1",
                 coordinator_key=key)
    return RunLog(path, "run1", key)


def test_the_decision_goes_into_the_round_log_and_its_head_tags_the_version(
    cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path
) -> None:
    from mlflow.artifacts import download_artifacts

    from adapters.mlflow_registration import register_model
    from adapters.round_log import HEAD_TAG, read_log
    from fl_core.federation.round_log import verify

    _register(cfg, model, PASSING)  # version 1: challenger + champion, no log
    run_log = _run_log(tmp_path)
    result = register_model(cfg, _served(model), REFUSED, HISTORY, [], round_log=run_log)
    records = read_log(run_log.path)
    assert [r.kind for r in records] == ["round", "decision"]
    assert records[1].body == {"model": cfg.mlflow.model_name, "version": "2",
                               "verdict": "refused", "reasons": list(result.gate.reasons),
                               "alias_moves": [{"alias": "challenger", "version": "2",
                                                "previous": "1"}]}
    head = records[-1].hash
    verify(records, coordinator_public_key=run_log.coordinator_key.public_key(), head=head)
    client = _client(cfg)
    assert client.get_model_version(cfg.mlflow.model_name, "2").tags[HEAD_TAG] == head
    assert client.get_run(result.run_id).data.tags[HEAD_TAG] == head
    logged = download_artifacts(run_id=result.run_id, artifact_path="reports/round_log.jsonl",
                                tracking_uri=cfg.mlflow_tracking_uri, dst_path=str(tmp_path))
    assert Path(logged).read_bytes() == run_log.path.read_bytes()  # with its decision
    assert HEAD_TAG not in client.get_model_version(cfg.mlflow.model_name, "1").tags


def test_a_registration_undone_after_its_decision_is_logged_says_so(
    cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from adapters.mlflow_registration import register_model
    from adapters.round_log import read_log
    from fl_core.federation.round_log import verify

    _register(cfg, model, PASSING)  # version 1: challenger + champion
    original_set_tag = MlflowClient.set_tag

    def crash(self: Any, run_id: str, key: str, value: Any) -> None:
        if key == "model_version":
            raise ConnectionError("tracking server gone")
        original_set_tag(self, run_id, key, value)

    monkeypatch.setattr(MlflowClient, "set_tag", crash)
    run_log = _run_log(tmp_path)
    with pytest.raises(ConnectionError):
        register_model(cfg, _served(model), PASSING, HISTORY, [], round_log=run_log)
    records = read_log(run_log.path)
    assert [(r.kind, r.body.get("verdict")) for r in records] == [
        ("round", None), ("decision", "passed"), ("decision", "undone")]
    assert records[1].body["alias_moves"] == [
        {"alias": "challenger", "version": "2", "previous": "1"},
        {"alias": "champion", "version": "2", "previous": "1"}]
    assert records[2].body["alias_moves"] == [
        {"alias": "challenger", "version": "1", "previous": "2"},
        {"alias": "champion", "version": "1", "previous": "2"}]
    assert "tracking server gone" in records[2].body["reasons"][0]
    verify(records, coordinator_public_key=run_log.coordinator_key.public_key())
    assert _aliases(_client(cfg), cfg.mlflow.model_name) == {"challenger": "1", "champion": "1"}
