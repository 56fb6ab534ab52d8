"""``fedpriv model rollback`` and ``retire`` against a real local SQLite MLflow store: the
aliases move, the versions are tagged with who, when and why, and in sites mode the move is
a signed record in the round log, which still verifies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.config_files import build_config
from adapters.model_lifecycle import RETIRED, ROLLED_BACK, retire, rollback
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.model.networks import build_model
from tests.adapters.test_mlflow_registration import (
    HISTORY,
    PASSING,
    REFUSED,
    TRANSFORM,
    _aliases,
    _client,
    _served,
)

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
NAME = "test-model"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def _config(tmp_path: Path, migrated: Path, **extra: Any) -> PipelineConfig:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    shutil.copy(migrated, state / "mlflow.db")
    return build_config({"state_dir": str(state), "gate": {"min_accuracy": 0.75},
                         "mlflow": {"experiment": "test-exp", "model_name": NAME}, **extra})


@pytest.fixture
def cfg(tmp_path: Path, migrated: Path) -> PipelineConfig:
    return _config(tmp_path, migrated)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("mlp", len(TRANSFORM.columns()), hidden_units=8, seed=3)


@pytest.fixture(autouse=True)
def gate_by_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's verdict from the accuracy alone: these tests are about what happens after
    it (its rules: tests/fl_core/audit/test_gate.py)."""
    from fl_core.audit.gate import GateDecision

    def verdict(metrics: Any, thresholds: Any) -> GateDecision:
        passed = metrics["accuracy"] >= 0.75
        return GateDecision(passed, () if passed else ("accuracy below 0.75",))

    monkeypatch.setattr("adapters.mlflow_registration.evaluate_gate", verdict)


def _register(cfg: PipelineConfig, model: torch.nn.Module, metrics: dict[str, Any],
              round_log: Any = None) -> Any:
    from adapters.mlflow_registration import register_model

    return register_model(cfg, _served(model), metrics, HISTORY, [], run_name="t",
                          round_log=round_log)


def _tags(cfg: PipelineConfig, version: str) -> dict[str, str]:
    return dict(_client(cfg).get_model_version(NAME, version).tags)


@pytest.mark.slow
def test_rollback_moves_champion_back_past_refused_versions(
        cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path) -> None:
    for metrics in (PASSING, REFUSED, PASSING):  # 1 champion, 2 refused, 3 champion
        _register(cfg, model, metrics)
    assert _aliases(_client(cfg), NAME) == {"challenger": "3", "champion": "3"}
    change = rollback(cfg, tmp_path, reason="wrong in use", who="alice@ward")
    assert change.version == "1" and change.round_log is None
    assert _aliases(_client(cfg), NAME) == {"challenger": "3", "champion": "1"}
    restored, removed = _tags(cfg, "1"), _tags(cfg, "3")
    assert restored["champion.restored.by"] == "alice@ward"
    assert restored["champion.restored.reason"] == "wrong in use"
    assert restored["champion.restored.from"] == "3" and restored["champion.restored.at"]
    assert removed["champion.removed.for"] == "1"
    assert "champion: 3 → 1" in change.text()
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback(cfg, tmp_path)  # nothing passed before version 1
    assert rollback(cfg, tmp_path, to="3").version == "3"  # forward again, by name
    assert _aliases(_client(cfg), NAME)["champion"] == "3"


@pytest.mark.slow
def test_rollback_to_refuses_what_cannot_be_champion(
        cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path) -> None:
    _register(cfg, model, PASSING)
    _register(cfg, model, REFUSED)
    with pytest.raises(ConfigError, match="version 2 cannot be champion: it did not pass "
                                          "the gate"):
        rollback(cfg, tmp_path, to="2")
    with pytest.raises(ConfigError, match=f"{NAME} has no version 9"):
        rollback(cfg, tmp_path, to="9")
    with pytest.raises(ConfigError, match="already the champion"):
        rollback(cfg, tmp_path, to="1")
    with pytest.raises(ConfigError, match="no registered model 'other'"):
        rollback(cfg, tmp_path, model="other")
    assert _aliases(_client(cfg), NAME) == {"challenger": "2", "champion": "1"}


@pytest.mark.slow
def test_retire_takes_the_aliases_off_and_tags_the_version(
        cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path) -> None:
    _register(cfg, model, PASSING)
    _register(cfg, model, PASSING)
    change = retire(cfg, tmp_path, version="2", reason="took the wrong columns", who="bob")
    assert {(m.alias, m.version, m.previous) for m in change.moves} == {
        ("champion", "", "2"), ("challenger", "", "2")}
    assert _aliases(_client(cfg), NAME) == {}
    tags = _tags(cfg, "2")
    assert tags[RETIRED] == "true" and tags["retired.reason"] == "took the wrong columns"
    assert tags["retired.by"] == "bob"
    with pytest.raises(ConfigError, match="already retired"):
        retire(cfg, tmp_path, version="2")
    with pytest.raises(ConfigError, match="cannot be champion: it is retired"):
        rollback(cfg, tmp_path, to="2")
    assert rollback(cfg, tmp_path).version == "1"  # no champion: the latest fit version
    with pytest.raises(ConfigError, match="not a version number"):
        retire(cfg, tmp_path, version="latest")


@pytest.mark.slow
def test_retire_makes_the_other_columns_advice_work(
        cfg: PipelineConfig, model: torch.nn.Module, tmp_path: Path) -> None:
    from adapters.mlflow_registration import check_serving_contract

    _register(cfg, model, PASSING)  # the heart model's columns
    fewer = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"features": ["age", "sex"]})})
    with pytest.raises(ConfigError) as refused:
        check_serving_contract(fewer, cfg.mlflow_tracking_uri)
    advice = str(refused.value)
    assert f"`fedpriv model retire --model {NAME} --version 1 --reason TEXT`" in advice
    assert "mlflow.model_name=NEW_NAME" in advice and "unset" not in advice
    retire(cfg, tmp_path, version="1", reason="a model of the heart table")
    check_serving_contract(fewer, cfg.mlflow_tracking_uri)  # now passes


# --- sites mode: the round log ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.federation import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.slow
def test_rollback_and_retire_are_signed_records_of_the_round_log(
        tmp_path: Path, migrated: Path, model: torch.nn.Module, pki: Any, capsys) -> None:
    from adapters.artifacts import Paths
    from adapters.round_log import HEAD_TAG, RunLog, append_round, load_signing_key, read_log
    from fl_core.federation.round_log import RoundEntry
    from flows.cli import main

    cfg = _config(tmp_path, migrated, federation={
        "mode": "sites", "sites": [{"id": s} for s in SITES],
        "endpoint": {"pki": str(pki.root)}})
    _register(cfg, model, PASSING)  # version 1, before the log
    key = load_signing_key(pki.tls.server_key)
    path = Paths.of(cfg, tmp_path).round_log  # the published log
    append_round(path, RoundEntry(1, ("hungary",), (), "ab" * 32), run_id="run2",
                 coordinator_key=key)
    _register(cfg, model, PASSING, RunLog(path, "run2", key))  # version 2: its decision
    change = rollback(cfg, tmp_path, reason="drift at Hungary", who="carol")
    assert change.round_log == path and _aliases(_client(cfg), NAME)["champion"] == "1"
    records = read_log(path)
    assert [r.body.get("verdict") for r in records] == [None, "passed", ROLLED_BACK]
    assert records[-1].run_id == "run2"
    assert records[-1].body["alias_moves"] == [
        {"alias": "champion", "version": "1", "previous": "2"}]
    assert records[-1].body["reasons"] == ["drift at Hungary", "by carol"]
    head = _tags(cfg, "2")[HEAD_TAG]
    assert head == records[-1].hash == change.round_log_head
    assert main(["log", "verify", str(path), "--coordinator-cert", str(pki.tls.server_cert),
                 "--head", head]) == 0
    assert "intact, 3 records" in capsys.readouterr().out

    retire(cfg, tmp_path, version="2", reason="superseded")
    records = read_log(path)
    assert records[-1].body["verdict"] == RETIRED
    assert records[-1].body["alias_moves"] == [
        {"alias": "challenger", "version": "", "previous": "2"}]
    assert main(["log", "verify", str(path), "--coordinator-cert", str(pki.tls.server_cert),
                 "--head", _tags(cfg, "2")[HEAD_TAG]]) == 0

    import argparse

    from flows.cli import model_command

    path.write_bytes(path.read_bytes()[:-1])  # a torn last line: no newline
    args = argparse.Namespace(action="rollback", model=None, to="2", reason="")
    aliases = _aliases(_client(cfg), NAME)
    assert model_command(args, cfg, tmp_path) == 9  # as `fedpriv log verify` refuses it
    assert "the round log is not intact" in capsys.readouterr().err
    assert _aliases(_client(cfg), NAME) == aliases  # nothing moved


# --- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_rollback_and_its_one_line_errors(
        project: Path, migrated: Path, model: torch.nn.Module, capsys) -> None:
    from adapters.config_files import load_config
    from flows.cli import main

    sets = ["--set", f"mlflow.model_name={NAME}", "--set", "gate.min_accuracy=0.75"]
    (project / ".fedpriv").mkdir(exist_ok=True)
    cfg = load_config(project / "params.yaml", [s for s in sets if s != "--set"])
    cfg = cfg.model_copy(update={"state_dir": str(project / cfg.state_dir)})
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated, Path(cfg.state_dir) / "mlflow.db")
    _register(cfg, model, PASSING)
    _register(cfg, model, PASSING)
    root = ["--root", str(project), *sets]
    assert main(["model", "rollback", *root, "--reason", "test"]) == 0
    assert f"{NAME}: champion is now version 1" in capsys.readouterr().out
    assert main(["model", "rollback", *root]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpriv: configuration error: ") and "nothing to roll back" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["model", "retire", *root, "--version", "7"]) == 2
    assert f"{NAME} has no version 7" in capsys.readouterr().err
    assert main(["model", "retire", *root, "--version", "2"]) == 0
    assert _aliases(_client(cfg), NAME) == {"champion": "1"}
