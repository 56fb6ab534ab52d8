"""A registered model's lifecycle after registration: roll the champion back, retire a version.

The registration (:mod:`adapters.mlflow_registration`) moves ``challenger`` to every new
version and ``champion`` to each one that passes the gate; nothing else moved them, so a bad
champion (a model of another table, or one found wrong in use) stayed until a better run
replaced it, and a run with other input columns was refused for as long as it stayed.

``fedpriv model rollback`` moves ``champion`` back to the previous champion (the latest
earlier version that passed the gate and is not retired) or to a version named with
``--to`` (it must have passed the gate). ``fedpriv model retire --version V`` takes every
alias off V (``champion`` and ``challenger``: a retired version is neither served nor
compared against) and tags it ``retired``. Each move is recorded as tags on the versions
concerned (who, when, why) and, in sites mode, as a decision record in the model's round log
(the published ``reports/round_log.jsonl``, signed with the endpoint's key like the
registration's records), whose new head then tags the version that carried the old one, so
``fedpriv log verify --head`` still holds. The privacy ledger is untouched: no patient's data
is used.

Errors are :class:`~fl_core.config.model.ConfigError` (exit 2), one line each.
"""

from __future__ import annotations

import datetime
import getpass
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.metrics import record_alias_change
from adapters.mlflow_registration import CHALLENGER, CHAMPION, COMPLETE, STATE, open_store
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.federation.round_log import AliasMove, DecisionEntry

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from adapters.round_log import RunLog

RETIRED = "retired"
"""Version tag ``"true"`` on a retired version; ``retired.by``, ``.at``, ``.reason`` say more."""
ROLLED_BACK = "rolled back"
"""The round log's verdict for a rollback (``retired`` for a retirement)."""


@dataclass(frozen=True)
class LifecycleChange:
    """What a rollback or a retirement did."""

    model: str
    action: str  # rollback | retire
    version: str  # the new champion (rollback) or the retired version
    moves: tuple[AliasMove, ...]
    round_log: Path | None = None  # the log that got the record, if any
    round_log_head: str | None = None

    def text(self) -> str:
        """What ``fedpriv model`` prints."""
        moved = "; ".join(f"{m.alias}: {m.previous or 'none'} → {m.version or 'none'}"
                          for m in self.moves) or "no alias moved"
        what = (f"{self.model}: champion is now version {self.version}" if self.action ==
                "rollback" else f"{self.model}: version {self.version} retired")
        logged = (f"; round log {self.round_log} head {self.round_log_head}"
                  if self.round_log else "; no round log (simulation or none published)")
        return f"{what} ({moved}){logged}"


def rollback(cfg: PipelineConfig, root: str | Path = ".", *, model: str | None = None,
             to: str | None = None, reason: str = "", who: str | None = None
             ) -> LifecycleChange:
    """Move ``champion`` back to the previous champion, or to version ``to``."""
    client, name = _open(cfg, root, model)
    run_log = model_round_log(cfg, root, name)  # a damaged log: refused before anything
    aliases = _aliases(client, name)
    current = aliases.get(CHAMPION)
    target = _checked_target(client, name, to, current) if to else \
        _previous_champion(client, name, current)
    moves = (AliasMove(CHAMPION, target, current or ""),)
    stamp = _stamp(who, reason)
    client.set_registered_model_alias(name, CHAMPION, target)
    head = _log_or_undo(client, cfg, root, name, run_log, aliases, moves, DecisionEntry(
        model=name, version=target, verdict=ROLLED_BACK, reasons=stamp.reasons(),
        alias_moves=moves))
    _tag(client, name, target, "champion.restored", stamp, extra={"from": current or ""})
    if current:
        _tag(client, name, current, "champion.removed", stamp, extra={"for": target})
    change = LifecycleChange(name, "rollback", target, moves,
                             run_log.path if run_log else None, head)
    record_alias_change(cfg, change.action, name, [m.alias for m in moves])  # monitoring on
    return change


def retire(cfg: PipelineConfig, root: str | Path = ".", *, version: str,
           model: str | None = None, reason: str = "", who: str | None = None
           ) -> LifecycleChange:
    """Take every alias off ``version`` and tag it retired."""
    client, name = _open(cfg, root, model)
    run_log = model_round_log(cfg, root, name)  # a damaged log: refused before anything
    tags = _version_tags(client, name, version)
    if tags.get(RETIRED) == "true":
        raise ConfigError(f"{name} version {version} is already retired "
                          f"({tags.get(RETIRED + '.reason') or 'no reason given'})")
    aliases = _aliases(client, name)
    moves = tuple(AliasMove(alias, "", version) for alias in (CHAMPION, CHALLENGER)
                  if aliases.get(alias) == version)
    stamp = _stamp(who, reason)
    for move in moves:
        client.delete_registered_model_alias(name, move.alias)
    head = _log_or_undo(client, cfg, root, name, run_log, aliases, moves, DecisionEntry(
        model=name, version=version, verdict=RETIRED, reasons=stamp.reasons(),
        alias_moves=moves))
    client.set_model_version_tag(name, version, RETIRED, "true")
    _tag(client, name, version, RETIRED, stamp)
    change = LifecycleChange(name, "retire", version, moves,
                             run_log.path if run_log else None, head)
    record_alias_change(cfg, change.action, name, [m.alias for m in moves])  # monitoring on
    return change


# --- the registry ---------------------------------------------------------------------------


def _open(cfg: PipelineConfig, root: str | Path, model: str | None) -> tuple[MlflowClient, str]:
    """The store (located from the project root, as the registration does) and the model's
    name, which must exist."""
    from mlflow.exceptions import MlflowException

    state = Path(root).resolve() / cfg.state_dir
    cfg = cfg.model_copy(update={"state_dir": str(state)})
    uri = cfg.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ConfigError(f"no MLflow store at {uri}: nothing is registered yet")
    client = open_store(uri)
    name = model or cfg.mlflow.model_name
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(f"no registered model {name!r} in {uri} (--model NAME names "
                          f"another; default mlflow.model_name)") from None
    return client, name


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """alias → version, as strings (the SQLite registry returns versions as ints)."""
    return {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}


def _version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise ConfigError(f"{name}: version {version!r} is not a version number")
    try:
        return dict(client.get_model_version(name, str(version)).tags or {})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(f"{name} has no version {version}") from None


def _unfit(tags: dict[str, str]) -> str | None:
    """Why a version with these tags may not be champion, or None."""
    if tags.get("gate") != "passed":
        return f"it did not pass the gate (gate: {tags.get('gate', 'not recorded')})"
    if tags.get(STATE, COMPLETE) != COMPLETE:
        return "its registration never completed"
    if tags.get(RETIRED) == "true":
        return f"it is retired ({tags.get(RETIRED + '.reason') or 'no reason given'})"
    return None


def _checked_target(client: MlflowClient, name: str, to: str, current: str | None) -> str:
    why = _unfit(_version_tags(client, name, to))
    if why:
        raise ConfigError(f"{name} version {to} cannot be champion: {why}")
    if to == current:
        raise ConfigError(f"{name} version {to} is already the champion")
    return str(to)


def _previous_champion(client: MlflowClient, name: str, current: str | None) -> str:
    """The latest version before ``current`` (any, if there is no champion) that passed the
    gate and is not retired: every such version was champion after its registration."""
    below = int(current) if current else None
    candidates = sorted((int(mv.version) for mv in
                         client.search_model_versions(f"name='{name}'")
                         if (below is None or int(mv.version) < below)
                         and _unfit(dict(mv.tags or {})) is None), reverse=True)
    if not candidates:
        now = f"champion: version {current}" if current else "no champion"
        raise ConfigError(f"{name}: nothing to roll back to ({now}; no earlier version that "
                          f"passed the gate and is not retired); `fedpriv model retire` "
                          f"removes a champion without a replacement")
    return str(candidates[0])


# --- who, when, why -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stamp:
    who: str
    when: str
    why: str

    def reasons(self) -> tuple[str, ...]:
        return (self.why or "no reason given", f"by {self.who}")


def _stamp(who: str | None, reason: str) -> _Stamp:
    if who is None:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (a container's uid)
            user = f"uid {os.getuid()}"
        who = f"{user}@{socket.gethostname()}"
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return _Stamp(who, when, reason.strip())


def _tag(client: MlflowClient, name: str, version: str, prefix: str, stamp: _Stamp,
         extra: dict[str, str] | None = None) -> None:
    values = {"by": stamp.who, "at": stamp.when, "reason": stamp.why or "no reason given",
              **(extra or {})}
    for key, value in values.items():
        client.set_model_version_tag(name, version, f"{prefix}.{key}", value)


# --- the round log (sites mode) -------------------------------------------------------------


def model_round_log(cfg: PipelineConfig, root: str | Path, name: str) -> RunLog | None:
    """The model's round log: in sites mode, the published ``reports/round_log.jsonl`` if
    it holds a decision about ``name``; signed with the endpoint's key. None otherwise
    (a simulation keeps no log)."""
    from adapters.artifacts import Paths
    from adapters.pki import endpoint_files
    from adapters.round_log import RunLog, load_signing_key, read_log
    from fl_core.federation.identity import PkiError

    if cfg.federation.mode != "sites":
        return None
    path = Paths.of(cfg, root).round_log
    if not path.is_file():
        return None
    records = read_log(path)  # a damaged log is refused, never built upon
    if not any(r.kind == "decision" and r.body.get("model") == name for r in records):
        return None
    key_path = endpoint_files(cfg, Path(root).resolve()).server_key
    try:
        key = load_signing_key(key_path)
    except PkiError as exc:
        raise ConfigError(f"the round log {path} is signed with the endpoint's key: {exc}") \
            from None
    return RunLog(path, records[-1].run_id, key)


def _log_or_undo(client: MlflowClient, cfg: PipelineConfig, root: str | Path, name: str,
                 run_log: RunLog | None, before: dict[str, str],
                 moves: tuple[AliasMove, ...], entry: DecisionEntry) -> str | None:
    """Append ``entry`` to the round log and move the head tag; if that fails, put the
    aliases back as they were (compare-and-set) and re-raise."""
    if run_log is None:
        return None
    try:
        return _append(client, run_log, name, entry)
    except BaseException:
        now = _aliases(client, name)
        for move in moves:
            if now.get(move.alias, "") != move.version:
                continue  # moved by someone else since: theirs stands
            if move.previous:
                client.set_registered_model_alias(name, move.alias, move.previous)
            else:
                client.delete_registered_model_alias(name, move.alias)
        raise


def _append(client: MlflowClient, run_log: RunLog, name: str, entry: DecisionEntry) -> str:
    """The record appended; the versions whose head tag named the log's old head get the new
    one (and their run the file), so ``fedpriv log verify --head`` holds for them."""
    from adapters.round_log import HEAD_TAG, read_log

    old = read_log(run_log.path)[-1].hash
    head = run_log.decide(entry).hash
    for mv in client.search_model_versions(f"name='{name}'"):
        if (mv.tags or {}).get(HEAD_TAG) != old:
            continue
        client.set_model_version_tag(name, str(mv.version), HEAD_TAG, head)
        if mv.run_id:
            _relog(client, mv.run_id, run_log.path, HEAD_TAG, head)
    return head


def _relog(client: MlflowClient, run_id: str, path: Path, tag: str, head: str) -> None:
    """The run's copy of the log and its head tag, brought up to date."""
    client.log_artifact(run_id, str(path), artifact_path="reports")
    client.set_tag(run_id, tag, head)
