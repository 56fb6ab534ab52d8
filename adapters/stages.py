"""The one table of the pipeline's stages, and the one table of exit codes.

:data:`STAGES` names each stage's function in ``adapters/``: ``fedpriv stage <name>`` runs it
(and so do ``dvc.yaml``'s commands, which are ``fedpriv stage <name>``; a test checks that
the two lists agree), and the flow ``fl-pipeline`` runs the same function as a Prefect task
(``tasks/``). The flow's other steps are not stages one can run alone: the DP audit is the
command ``fedpriv audit-dp`` (:func:`adapters.dp_audit.run_dp_audit`), and sites mode runs
the coordinator's side within the flow (``tasks/at_sites.py``).

:func:`exit_codes` maps each error ``fedpriv`` reports in one line to its exit code and the
words before its message (docs/errors.md); anything else is a traceback.

A stage is named by ``"module:function"`` and imported when it runs, so that a command that
runs none (``fedpriv budget``, ``fedpriv schema``) does not load torch, GX or MLflow.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its function and what ``fedpriv stage`` checks before it."""

    name: str
    target: str  # "adapters.<module>:<function>", called as function(cfg, root)
    preflight: bool = False  # it trains or registers: the stores are checked first
    simulation_only: bool = False  # in sites mode it runs at the sites, within `fedpriv run`
    in_dvc: bool = True  # a stage of dvc.yaml

    @property
    def function(self) -> Callable[..., Any]:
        module, name = self.target.split(":")
        function: Callable[..., Any] = getattr(importlib.import_module(module), name)
        return function


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("validate", "adapters.validate:validate_data", simulation_only=True),
    Stage("partition", "adapters.partition:partition_data", simulation_only=True),
    Stage("train", "adapters.train:train_model", preflight=True, simulation_only=True),
    Stage("audit", "adapters.audit:audit_model", simulation_only=True),
    # registration on demand (and the flow's last stage); not a DVC stage
    Stage("register", "adapters.publish:publish_results", preflight=True, in_dvc=False),
    # the DVC pipeline's last stage: it registers only with mlflow.register_from_dvc
    Stage("publish", "adapters.publish:publish_for_dvc"),
)}


@dataclass(frozen=True)
class ExitCode:
    """The exit code of an error ``fedpriv`` reports in one line, and how it words it."""

    errors: tuple[type[BaseException], ...]
    code: int
    label: str  # before the error's message: "fedpriv: <label>: <message>" ("" for none)
    describe: Callable[[BaseException], str] = str


def data_error_text(exc: BaseException) -> str:
    """One line for a failure of the file as a whole, else the full validation message."""
    from fl_core.data.validation import ALL_SITES, DataValidationError

    if isinstance(exc, DataValidationError) and len(exc.report.failures) == 1 \
            and exc.report.failures[0].site == ALL_SITES:
        return f"{exc.path}: {exc.report.failures[0].detail}"
    return str(exc)


@functools.cache
def exit_codes() -> tuple[ExitCode, ...]:
    """Errors reported in one line, the first that matches wins; 0 is success, 1 anything
    else. (Imported here, once an error is to be reported, to keep the table's import light.)"""
    from adapters.artifacts import UnpublishedError
    from adapters.ledger_store import LedgerIntegrityError
    from adapters.preflight import PreflightError
    from fl_core.config.model import ConfigError
    from fl_core.data.tables import DataError
    from fl_core.data.validation import DataValidationError
    from fl_core.federation.coordinator import RoundFailedError
    from fl_core.privacy.ledger import BudgetExceededError, MissingChargeError

    return (
        ExitCode((BudgetExceededError, MissingChargeError, LedgerIntegrityError), 5,
                 "privacy refusal"),
        # before data errors: a schema the data contradict (SchemaMismatchError) is both
        ExitCode((ConfigError,), 2, "configuration error"),
        ExitCode((DataValidationError, DataError), 3, "data error", data_error_text),
        ExitCode((RoundFailedError,), 4, "training failed"),
        ExitCode((PreflightError,), 6, "preflight failed"),
        ExitCode((UnpublishedError,), 7, "registered, not published"),
        ExitCode((FileNotFoundError,), 1, ""),  # a stage run before the one it reads
    )


PRIVACY_FAILURE_EXIT = 8
"""``fedpriv audit-dp`` found a PRIVACY FAILURE (ε lower bound above the accountant's ε)."""

LOG_TAMPERED_EXIT = 9
"""``fedpriv log verify``: a record of the round log was altered, removed, reordered or
inserted, or a signature in it does not verify."""

GATE_REFUSED_EXIT = 10
"""``gate.refusal_exit=true`` only: the run finished (model registered as challenger, reports
published) but the gate refused champion; a scheduler sees the refusal without parsing
``reports/registration.json``. Off by default: a refusal is an outcome, not a failure."""


def finished_exit(cfg: Any, gate_passed: bool) -> int:
    """The exit code of a run or stage that registered or published: 0, or
    :data:`GATE_REFUSED_EXIT` when the gate refused and ``gate.refusal_exit`` asks for it."""
    return GATE_REFUSED_EXIT if cfg.gate.refusal_exit and not gate_passed else 0


def reported_errors() -> tuple[type[BaseException], ...]:
    """Every error type of :func:`exit_codes`."""
    return tuple(error for entry in exit_codes() for error in entry.errors)


def exit_code(exc: BaseException) -> tuple[int, str]:
    """The exit code of one of :func:`reported_errors` and its one line for stderr."""
    entry = next(e for e in exit_codes() if isinstance(exc, e.errors))
    label = f"{entry.label}: " if entry.label else ""
    return entry.code, f"fedpriv: {label}{entry.describe(exc)}"
