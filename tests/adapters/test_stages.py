"""The one table of stages (adapters.stages) drives `fedpriv stage`, the flow's tasks and
dvc.yaml's commands; the one table of exit codes drives what `fedpriv` prints and returns."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from adapters.stages import PRIVACY_FAILURE_EXIT, STAGES, exit_code, exit_codes

ROOT = Path(__file__).resolve().parents[2]


def test_every_dvc_stage_runs_a_stage_of_the_table_and_back() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {name: shlex.split(stage["cmd"]) for name, stage in dvc.items()}
    for name, cmd in commands.items():
        assert cmd[:2] == ["fedpriv", "stage"] and len(cmd) == 3, (name, cmd)
        assert cmd[2] in STAGES, f"dvc.yaml stage {name} runs {cmd[2]!r}, not in the table"
        assert cmd[2] == name  # the DVC stage is named for the stage it runs
    in_dvc = {name for name, stage in STAGES.items() if stage.in_dvc}
    assert in_dvc == {cmd[2] for cmd in commands.values()}
    assert set(STAGES) - in_dvc == {"register"}  # registration on demand only


def test_every_stage_names_a_function_of_adapters() -> None:
    for name, stage in STAGES.items():
        assert stage.target.startswith("adapters."), name
        assert callable(stage.function), name


def test_the_cli_offers_exactly_the_tables_stages() -> None:
    from flows.cli import build_parser

    parser = build_parser()
    stage = parser._subparsers._group_actions[0].choices["stage"]  # noqa: SLF001
    (name,) = [a for a in stage._actions if a.dest == "name"]  # noqa: SLF001
    assert list(name.choices) == list(STAGES)


def test_the_flows_tasks_wrap_the_tables_functions() -> None:
    from tasks.audit import audit
    from tasks.partition import partition
    from tasks.publish import publish
    from tasks.train import train
    from tasks.validate import validate

    for task, name in ((validate, "validate"), (partition, "partition"), (train, "train"),
                       (audit, "audit"), (publish, "register")):
        assert task.fn is STAGES[name].function, name


@pytest.mark.parametrize(("error", "code", "line"), [
    ("budget", 5, "fedpriv: privacy refusal: over"),
    ("config", 2, "fedpriv: configuration error: bad"),
    ("schema", 2, "fedpriv: configuration error: "),  # a schema the data contradict
    ("data", 3, "fedpriv: data error: no rows"),
    ("round", 4, "fedpriv: training failed: no site"),
    ("preflight", 6, "fedpriv: preflight failed: no store"),
    ("unpublished", 7, "fedpriv: registered, not published: later"),
    ("missing", 1, "fedpriv: run 'train' first"),
])
def test_each_error_has_its_exit_code_and_wording(error: str, code: int, line: str) -> None:
    from adapters.artifacts import UnpublishedError
    from adapters.preflight import PreflightError
    from fl_core.config.model import ConfigError
    from fl_core.data.tables import DataError
    from fl_core.data.validation import SchemaMismatchError, ValidationReport
    from fl_core.federation.coordinator import RoundFailedError
    from fl_core.privacy.ledger import BudgetExceededError

    errors = {
        "budget": BudgetExceededError("over", 1.0), "config": ConfigError("bad"),
        "schema": SchemaMismatchError("data.csv", ValidationReport(False, (), {}, {})),
        "data": DataError("no rows"), "round": RoundFailedError("no site"),
        "preflight": PreflightError("no store"), "unpublished": UnpublishedError("later"),
        "missing": FileNotFoundError("run 'train' first")}
    got_code, got_line = exit_code(errors[error])
    assert got_code == code and got_line.startswith(line)


def test_the_exit_codes_are_the_ones_the_help_lists() -> None:
    from flows.cli import EPILOG

    codes = sorted({entry.code for entry in exit_codes()} | {PRIVACY_FAILURE_EXIT})
    assert codes == [1, 2, 3, 4, 5, 6, 7, 8]
    for code in codes:
        assert f"{code} " in EPILOG.split("exit codes:")[1]


def test_a_refused_promotion_exits_10_only_when_asked() -> None:
    from adapters.config_files import build_config
    from adapters.stages import GATE_REFUSED_EXIT, finished_exit

    default, asked = build_config({}), build_config({"gate": {"refusal_exit": True}})
    assert GATE_REFUSED_EXIT == 10
    assert finished_exit(default, gate_passed=False) == 0  # a refusal is an outcome
    assert finished_exit(asked, gate_passed=False) == GATE_REFUSED_EXIT
    assert finished_exit(asked, gate_passed=True) == 0
    assert GATE_REFUSED_EXIT not in {entry.code for entry in exit_codes()}
