"""Register a trained model in MLflow and apply the promotion gate, all or nothing.

One MLflow run holds the configuration (params), the per-round curves (metrics with
``step=round``), the final metrics, the report files and the model. The model becomes a new
version of ``cfg.mlflow.model_name`` with alias ``challenger``; it also gets ``champion`` only
if :func:`fl_core.audit.gate.evaluate_gate` passes. If any step fails after the version was created,
the version is deleted, the aliases are put back as they were and the run ends ``FAILED``;
the exception is re-raised unchanged so the caller can tell transient faults from others.

A sites-mode run passes its round log (:class:`adapters.round_log.RunLog`): once the aliases
have moved, the decision (the gate's verdict, the aliases moved) is appended to it, the file
is logged to the run and the version is tagged ``round_log_head`` with the new head's hash.
The log is append-only: a registration undone after that gets a second decision record
saying so (verdict ``undone``, the aliases moved back).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.artifacts import owner_is_dead
from fl_core.audit.gate import GateDecision, evaluate_gate, gate_thresholds
from fl_core.config.model import PipelineConfig
from fl_core.federation.round_log import AliasMove, DecisionEntry

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from adapters.model_card import CardWriter
    from adapters.round_log import RunLog
    from adapters.serving import ServedModel

log = logging.getLogger(__name__)

# Kill safety: a run records its owner (host, pid) and the aliases it found; its version is
# tagged pending until the last step marks it complete. The next registration reaps the runs
# whose owner died: compare-and-set undo of their aliases, delete their versions, mark FAILED.
OWNER_HOST, OWNER_PID = "fedpriv.host", "fedpriv.pid"
ALIASES_BEFORE = "fedpriv.aliases_before"
STATE, PENDING, COMPLETE = "fedpriv.state", "pending", "complete"
CHALLENGER = "challenger"
CHAMPION = "champion"
ALIASES = (CHALLENGER, CHAMPION)
_MAX_TAG_VALUE = 5000  # below MLflow's run-tag limit (8000)


@dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_model` did: the run, the new version and the aliases it now holds."""

    run_id: str
    model_name: str
    model_version: str | None
    aliases: tuple[str, ...]
    gate: GateDecision


def register_model(
    cfg: PipelineConfig,
    served: ServedModel,
    metrics: Mapping[str, float | int | None],
    history: Sequence[Mapping[str, object]],
    artifacts: Sequence[Path],
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    round_log: RunLog | None = None,
    card: CardWriter | None = None,
) -> RegistrationResult:
    """Log one run; register the model as ``challenger``; if the gate passes, also ``champion``.

    The registered model is ``served`` as an MLflow pyfunc (:mod:`adapters.serving`): raw
    clinical rows in, the probability of disease out, the declared transform among its
    artifacts.

    Nothing is left half-done: on failure no new model version remains, the aliases are as
    before and the run is ``FAILED``. Exceptions propagate. ``round_log`` (sites mode) gets
    the decision, see the module docstring. ``card``
    (:meth:`adapters.model_card.ModelCard.writer`) writes the version's model card once its
    number and aliases are known, before the version's final mark: a version never survives
    without its card.
    """
    steps = _validated_steps(history)
    missing = [str(p) for p in artifacts if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"artifact(s) to log do not exist: {', '.join(missing)}")
    decision = evaluate_gate(metrics, gate_thresholds(cfg))

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    state_dir = Path(cfg.state_dir).resolve()
    artifact_root = state_dir / "mlartifacts"
    artifact_root.mkdir(parents=True, exist_ok=True)
    uri = cfg.mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)  # mlflow.pyfunc.log_model resolves the store globally
    mlflow.set_registry_uri(uri)  # ... and models:/ URIs the registry: never another's
    client = open_store(uri)
    experiment_id = _ensure_experiment(client, cfg.mlflow.experiment, artifact_root.as_uri())
    name = cfg.mlflow.model_name
    reap_killed_runs(client, experiment_id, name)

    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, nested=mlflow.active_run() is not None,
        tags={OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid())},
    )
    run_id = run.info.run_id
    registry_before: _RegistryState | None = None
    try:
        _log_params(client, run_id, cfg.flat())
        stamp = int(time.time() * 1000)
        last_round = _log_history(client, run_id, history, steps, stamp)
        # One millisecond later, so that the final figures win over the last round's.
        _log_final_metrics(client, run_id, metrics, last_round, stamp + 1)
        for path in map(Path, artifacts):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=f"reports/{path.name}")
            else:
                client.log_artifact(run_id, str(path), artifact_path="reports")
        from adapters.serving import log_served_model

        info = log_served_model(served, step=last_round)

        registry_before = _RegistryState.capture(client, name)
        gate_tags = _gate_tags(decision)
        # what a reaper needs to undo this version if the process dies from here on
        client.set_tag(run_id, ALIASES_BEFORE, json.dumps(dict(registry_before.aliases)))
        version = client.create_model_version(
            name=name, source=info.model_uri, run_id=run_id,
            tags={**gate_tags, **(tags or {}), STATE: PENDING}, model_id=info.model_id,
        ).version
        registry_before.version = str(version)
        aliases: tuple[str, ...] = ()
        for alias in (CHALLENGER, CHAMPION) if decision.passed else (CHALLENGER,):
            client.set_registered_model_alias(name, alias, version)
            aliases += (alias,)
            registry_before.set_by_us.append(alias)
        if round_log is not None:
            registry_before.round_log = round_log
            _log_decision(client, round_log, registry_before, decision, run_id)
        if card is not None:
            card(client, run_id, str(version), decision, aliases)
        client.set_tag(run_id, "model_version", str(version))
        for key, value in {**gate_tags, **(tags or {})}.items():
            client.set_tag(run_id, key, value)
        client.set_model_version_tag(name, str(version), STATE, COMPLETE)  # the final mark
        mlflow.end_run(status="FINISHED")
    except BaseException as exc:
        if registry_before is not None:
            registry_before.restore(client, run_id, exc)
        _end_failed(run_id, exc)
        raise
    log.info("registered %s version %s (%s) from run %s", name, version, ", ".join(aliases), run_id)
    return RegistrationResult(run_id, name, str(version), aliases, decision)


def check_serving_contract(cfg: PipelineConfig, uri: str) -> None:
    """Refuse (:class:`~fl_core.config.model.ConfigError`, exit 2) a run whose model would take
    other input columns than a version that ``cfg.mlflow.model_name``'s aliases already point at:
    whoever calls ``models:/<name>@champion`` sends the rows that version's signature names,
    and a model of another table under the same name would answer them wrongly or not at
    all. Checked before training (preflight), where nothing is trained or charged yet."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from adapters.serving import signature
    from fl_core.config.model import ConfigError
    from fl_core.data.transform import TabularTransform

    ours = signature(TabularTransform.from_config(cfg.data)).inputs
    name = cfg.mlflow.model_name
    mlflow.set_tracking_uri(uri)  # models:/ resolves through the global URIs
    mlflow.set_registry_uri(uri)
    for alias in (CHAMPION, CHALLENGER):
        try:
            info = get_model_info(f"models:/{name}@{alias}")
        except MlflowException:
            continue  # no such model or alias yet
        theirs = info.signature.inputs if info.signature else None
        if theirs is None or theirs.to_dict() == ours.to_dict():
            continue
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
        raise ConfigError(
            f"mlflow.model_name={name}: its {alias} takes the columns "
            f"{', '.join(theirs.input_names())}; this run's model (dataset "
            f"{cfg.data.spec.id!r}) takes {', '.join(ours.input_names())}. Registering it "
            f"there would break every caller of models:/{name}@{alias}: register under "
            f"another name (--set mlflow.model_name=NEW_NAME), or, if version {version} is "
            f"not to be served, retire it first: `fedpriv model retire --model {name} "
            f"--version {version} --reason TEXT`")


# --- inputs ---------------------------------------------------------------------------------


def _validated_steps(history: Sequence[Mapping[str, object]]) -> list[int]:
    """Each row's ``round`` as an int step; a row without one is an error, not a guess."""
    steps = []
    for i, row in enumerate(history):
        step = row.get("round")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral | float) or (
            isinstance(step, float) and not step.is_integer()
        ):
            raise ValueError(f"history row {i} has no integer 'round' (got {step!r})")
        steps.append(int(step))
    return steps


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --- logging --------------------------------------------------------------------------------


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str) -> str:
    """The experiment's id; created with local artifacts under ``artifact_location`` if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # created concurrently by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if experiment.artifact_location != artifact_location:
        log.warning("experiment %r keeps its artifacts at %s, not %s",
                    name, experiment.artifact_location, artifact_location)
    return experiment.experiment_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    def text(value: Any) -> str:
        s = value if isinstance(value, str) else json.dumps(value)
        return s if len(s) <= MAX_PARAM_VAL_LENGTH else s[: MAX_PARAM_VAL_LENGTH - 3] + "..."

    client.log_batch(run_id, params=[Param(k, text(v)) for k, v in params.items()])


def _log_history(
    client: MlflowClient,
    run_id: str,
    history: Sequence[Mapping[str, object]],
    steps: list[int],
    timestamp: int,
) -> int:
    """Log each row's finite numeric fields at ``step=round``; return the last round (or 0)."""
    from mlflow.entities import Metric

    batch = []
    for row, step in zip(history, steps, strict=True):
        for key, raw in row.items():
            if key != "round" and (value := _finite(raw)) is not None:
                batch.append(Metric(key, value, timestamp, step))
    if batch:
        client.log_batch(run_id, metrics=batch)
    return max(steps, default=0)


def _log_final_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, object], step: int, timestamp: int
) -> None:
    """The final figures at the last round's step, so they are the run's latest values.

    None (a stage that did not run) is skipped, never replaced by a made-up number.
    """
    from mlflow.entities import Metric

    values = {key: _finite(raw) for key, raw in metrics.items()}
    batch = [Metric(k, v, timestamp, step) for k, v in values.items() if v is not None]
    if batch:
        client.log_batch(run_id, metrics=batch)


def _log_decision(client: MlflowClient, round_log: RunLog, registry: _RegistryState,
                  decision: GateDecision, run_id: str) -> None:
    """Append the decision to the run's round log, log the file to the run, and tag the
    version (and the run) with the log's new head hash."""
    from adapters.round_log import HEAD_TAG

    head = round_log.decide(DecisionEntry(
        model=registry.name, version=str(registry.version),
        verdict="passed" if decision.passed else "refused", reasons=tuple(decision.reasons),
        alias_moves=registry.moves()))
    registry.decided = True
    client.log_artifact(run_id, str(round_log.path), artifact_path="reports")
    client.set_model_version_tag(registry.name, str(registry.version), HEAD_TAG, head.hash)
    client.set_tag(run_id, HEAD_TAG, head.hash)


def _gate_tags(decision: GateDecision) -> dict[str, str]:
    if decision.passed:
        return {"gate": "passed"}
    return {"gate": "refused", "gate_reasons": "; ".join(decision.reasons)[:_MAX_TAG_VALUE]}


# --- undo -----------------------------------------------------------------------------------


@dataclass
class _RegistryState:
    """The registered model as this registration found it, and what the registration changed.

    Undo is compare-and-set: an alias is put back only if it still points at *this* run's
    version; if a concurrent run moved it since, that run's promotion stands.
    """

    name: str
    existed: bool
    aliases: Mapping[str, str]  # alias -> version, before this registration
    version: str | None = None  # the version this registration created
    set_by_us: list[str] = field(default_factory=list)
    round_log: RunLog | None = None  # set once the decision may be in it
    decided: bool = False  # the decision record was appended
    put_back: list[str] = field(default_factory=list)  # aliases the undo moved back

    def moves(self, *, back: bool = False) -> tuple[AliasMove, ...]:
        """The aliases this registration moved, or (``back``) those its undo moved back
        (a concurrent run's later move stands and is not undone)."""
        assert self.version is not None
        moved = [(alias, self.version, str(self.aliases.get(alias, "")))
                 for alias in (self.put_back if back else self.set_by_us)]
        return tuple(AliasMove(a, before, now) if back else AliasMove(a, now, before)
                     for a, now, before in moved)

    @classmethod
    def capture(cls, client: MlflowClient, name: str) -> _RegistryState:
        from mlflow.exceptions import MlflowException

        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                client.create_registered_model(name)
            except MlflowException as created:  # created concurrently by another run
                if created.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return cls.capture(client, name)
            return cls(name, existed=False, aliases={})
        aliases = {a: v for a, v in (model.aliases or {}).items() if a in ALIASES}
        return cls(name, existed=True, aliases=aliases)

    def restore(self, client: MlflowClient, run_id: str, error: BaseException) -> None:
        """Undo this run's aliases (compare-and-set), then delete its versions; never masks
        ``error``."""
        steps = [("restore aliases", lambda: self._restore_aliases(client)),
                 ("record the undo in the round log", lambda: self._log_undo(error)),
                 ("delete versions", lambda: self._delete_versions(client, run_id))]
        if not self.existed:
            steps.append(("delete empty model", lambda: self._delete_if_empty(client)))
        for what, undo in steps:
            try:
                undo()
            except Exception as undo_error:  # keep going; report alongside the original
                log.error("rollback of %s failed (%s): %r", self.name, what, undo_error)
                error.add_note(f"rollback step '{what}' also failed: {undo_error!r}")

    def _log_undo(self, error: BaseException) -> None:
        """The log is append-only: a decision already in it is followed by its undoing."""
        if self.round_log is None or not self.decided:
            return
        self.round_log.decide(DecisionEntry(
            model=self.name, version=str(self.version), verdict="undone",
            reasons=(f"the registration failed and was rolled back: "
                     f"{type(error).__name__}: {error}"[:_MAX_TAG_VALUE],),
            alias_moves=self.moves(back=True)))

    def _restore_aliases(self, client: MlflowClient) -> None:
        current = client.get_registered_model(self.name).aliases or {}
        for alias in self.set_by_us:
            if str(current.get(alias)) != self.version:  # SQLite returns versions as ints
                continue  # moved by a concurrent run since: theirs stands
            previous = self.aliases.get(alias)
            if previous is None:
                client.delete_registered_model_alias(self.name, alias)
            else:
                client.set_registered_model_alias(self.name, alias, previous)
            self.put_back.append(alias)

    def _delete_versions(self, client: MlflowClient, run_id: str) -> None:
        for mv in client.search_model_versions(f"name='{self.name}' and run_id='{run_id}'"):
            client.delete_model_version(self.name, mv.version)
            log.warning("deleted %s version %s of failed run %s", self.name, mv.version, run_id)

    def _delete_if_empty(self, client: MlflowClient) -> None:
        if not client.search_model_versions(f"name='{self.name}'", max_results=1):
            client.delete_registered_model(self.name)


def reap_killed_runs(client: MlflowClient, experiment_id: str, name: str) -> list[str]:
    """Clean up after registrations whose process was killed: for every RUNNING run whose
    owner is dead, undo its aliases (compare-and-set against the aliases it recorded before
    aliasing), delete its versions that never got the final mark, and mark it FAILED.
    Returns the reaped run ids."""
    reaped = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if not owner_is_dead(tags.get(OWNER_HOST), tags.get(OWNER_PID)):
            continue
        before = json.loads(tags.get(ALIASES_BEFORE, "{}"))
        for mv in client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'"):
            if mv.tags.get(STATE) == COMPLETE:
                continue
            state = _RegistryState(name, True, before, str(mv.version), list(ALIASES))
            state._restore_aliases(client)
            client.delete_model_version(name, mv.version)
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("reaped run %s of a killed process (pid %s)", run.info.run_id,
                    tags.get(OWNER_PID))
        reaped.append(run.info.run_id)
    return reaped


def open_store(uri: str) -> MlflowClient:
    """An MLflow client on ``uri``; a SQLite store is created (schema migrations) under an
    exclusive file lock, so two first runs in a fresh checkout never race on table creation.
    """
    import fcntl

    import mlflow

    if not uri.startswith("sqlite:///"):
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with (db.parent / f".{db.name}.init.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # creates/migrates the tracking tables
        client.search_registered_models(max_results=1)  # ... and the registry's
    return client


def _end_failed(run_id: str, error: BaseException) -> None:
    import mlflow

    try:
        mlflow.end_run(status="FAILED")
    except Exception as end_error:
        log.error("could not mark run %s FAILED: %r", run_id, end_error)
        error.add_note(f"marking run {run_id} FAILED also failed: {end_error!r}")
