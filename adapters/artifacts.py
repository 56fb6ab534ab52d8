"""Where a run's files live and how they are written: atomically, never half-done."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_core.config.model import PipelineConfig
from fl_core.results import (
    SitesValidation,
    TrainingReport,
    ValidationSummary,
    validation_from_dict,
)


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes.

    Without a ``run_id`` these are the *published* locations (``reports/``, ``data/processed``,
    ``data/models``): what ``dvc repro`` and ``fedpriv stage`` use (DVC's own lock serialises
    its runs). A flow run passes its ``run_id`` and works in its own workspace
    ``<state_dir>/runs/<run_id>/``, so two runs in one checkout never see each other's files;
    :func:`publish_run` copies a successful run's outputs to the published locations at the
    end. The MLflow store and the ledger (``state``) are shared by design.
    """

    root: Path
    reports: Path
    state: Path
    data: Path

    @classmethod
    def of(cls, cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None) -> Paths:
        root = Path(root).resolve()
        state = root / cfg.state_dir
        if run_id is None:
            return cls(root=root, reports=root / cfg.reports_dir, state=state, data=root / "data")
        if not run_id.isalnum():
            raise ValueError(f"run id {run_id!r} must be alphanumeric")
        work = state / "runs" / run_id
        return cls(root=root, reports=work / "reports", state=state, data=work / "data")

    @property
    def workspace(self) -> Path:
        return self.reports.parent

    @property
    def validation(self) -> Path:
        return self.reports / "validation.json"

    @property
    def partition(self) -> Path:
        return self.data / "processed" / "partition.json"

    @property
    def model(self) -> Path:
        return self.data / "models" / "model.pt"

    @property
    def train_summary(self) -> Path:
        return self.reports / "train.json"

    @property
    def rounds_csv(self) -> Path:
        return self.reports / "rounds.csv"

    @property
    def round_log(self) -> Path:
        """Sites mode's signed, hash-chained round log (:mod:`adapters.round_log`)."""
        return self.reports / "round_log.jsonl"

    @property
    def audit(self) -> Path:
        return self.reports / "audit.json"

    @property
    def audit_dp(self) -> Path:
        return self.reports / "audit_dp.json"

    @property
    def roc_plot(self) -> Path:
        return self.reports / "mia_roc.png"

    @property
    def training_plot(self) -> Path:
        return self.reports / "training_curves.png"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"


TEMP_SUFFIX = ".tmp"
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid are in the name: a later run removes a killed writer's temps
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST_TAG}-{os.getpid()}.",
                               suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    write_text_atomic(target, text + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path, stage: str) -> Any:
    """Read a previous stage's output, with an error that says which stage to run first."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the '{stage}' stage first")
    return json.loads(path.read_text())


def read_training(paths: Paths) -> TrainingReport:
    """The train stage's result as the later stages read it (``train.json``)."""
    try:
        return TrainingReport.from_dict(read_json(paths.train_summary, "train"))
    except ValueError as exc:
        raise FileNotFoundError(f"{paths.train_summary}: {exc}") from None


def read_validation(paths: Paths) -> ValidationSummary | SitesValidation:
    """The validate stage's result (``validation.json``, either mode's)."""
    try:
        return validation_from_dict(read_json(paths.validation, "validate"))
    except ValueError as exc:
        raise FileNotFoundError(f"{paths.validation}: {exc}") from None


def new_run_id() -> str:
    """A fresh workspace id: time-ordered, unique across processes."""
    return f"{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:8]}"


def publish_run(cfg: PipelineConfig, root: str | Path, run_id: str) -> Paths:
    """Make a finished run's outputs the published view, then remove its workspace.

    Under an exclusive lock (two runs finishing together publish one after the other), a
    journal names the run before anything is copied; each file is copied atomically (temp
    file + rename); the workspace is renamed away, the journal removed, the workspace deleted.
    A kill anywhere in between is rolled forward by the next start
    (:func:`finish_interrupted_publish`): the published view ends up wholly this run's.
    Returns the published paths.
    """
    published = Paths.of(cfg, root)
    published.state.mkdir(parents=True, exist_ok=True)
    with _publish_lock(published):
        write_json_atomic(published.state / PUBLISH_JOURNAL, {"run_id": run_id})
        _copy_and_retire(cfg, root, run_id)
    return published


class UnpublishedError(RuntimeError):
    """The model is registered (the registry is final) but the published view could not be
    updated; the run's workspace is kept and published by the next start."""


PUBLISH_JOURNAL = "publish.json"
LAST_PUBLISHED = "published.json"
_RETIRED = ".retired-"


@contextmanager
def _publish_lock(published: Paths) -> Iterator[None]:
    import fcntl

    with (published.state / "publish.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _copy_and_retire(cfg: PipelineConfig, root: str | Path, run_id: str) -> None:
    """The journaled part of :func:`publish_run` (idempotent: rerun after a kill)."""
    work, published = Paths.of(cfg, root, run_id), Paths.of(cfg, root)
    runs = published.state / "runs"
    if work.workspace.is_dir():
        pairs = [(work.partition, published.partition), (work.model, published.model)]
        pairs += [(f, published.reports / f.name) for f in sorted(work.reports.glob("*"))
                  if f.is_file() and not f.name.startswith(".")]
        for source, target in pairs:
            if source.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
        os.replace(work.workspace, runs / f"{_RETIRED}{run_id}")  # one atomic step
    write_json_atomic(published.state / LAST_PUBLISHED, {"run_id": run_id})
    (published.state / PUBLISH_JOURNAL).unlink(missing_ok=True)
    shutil.rmtree(runs / f"{_RETIRED}{run_id}", ignore_errors=True)


def finish_interrupted_publish(cfg: PipelineConfig, root: str | Path) -> str | None:
    """Roll forward a :func:`publish_run` that was interrupted (its journal is still there:
    its process was killed, or it failed and marked its run ``unpublished``) and delete
    retired workspaces. Returns the run id it finished, or None. A publish whose owner is
    alive and has not ended is left alone."""
    published = Paths.of(cfg, root)
    if not published.state.is_dir():
        return None
    with _publish_lock(published):
        finished = _journaled_run(published.state / PUBLISH_JOURNAL)
        if finished is not None:
            owner = _read_owner(owner_record(Paths.of(cfg, root, finished)))
            if owner and owner.get("ended") is None and not _dead(owner):
                finished = None  # a live publisher (it holds the lock only while copying)
        if finished is not None:
            try:
                _copy_and_retire(cfg, root, finished)
            except OSError as exc:  # still failing: keep the journal, try again next time
                print(f"run {finished} is registered but still cannot be published: {exc}")
                finished = None
        for retired in (published.state / "runs").glob(f"{_RETIRED}*"):
            shutil.rmtree(retired, ignore_errors=True)
    return finished


def _journaled_run(journal: Path) -> str | None:
    """The run id in the publish journal; a garbled journal is removed (no publish of ours
    wrote it)."""
    if not journal.exists():
        return None
    try:
        run_id = json.loads(journal.read_text())["run_id"]
        if isinstance(run_id, str) and run_id.isalnum():
            return run_id
    except (OSError, ValueError, KeyError, TypeError):
        pass
    journal.unlink(missing_ok=True)
    return None


def owner_record(paths: Paths) -> Path:
    """Where a flow run's owner record lives: outside its workspace, so that it outlives the
    workspace's publication and a run killed after publishing is still found."""
    return paths.state / "owners" / f"{paths.workspace.name}.json"


def _read_owner(record: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _dead(owner: dict[str, Any]) -> bool:
    return owner_is_dead(owner.get("host"), owner.get("pid"))


def claim_workspace(paths: Paths, flow_run_id: str | None) -> None:
    """Create the run's workspace and record who owns it (host, pid, orchestrator run id), so
    that a later run can tell a killed run's leftovers from a live one's."""
    paths.workspace.mkdir(parents=True, exist_ok=True)
    write_json_atomic(owner_record(paths), {
        "host": socket.gethostname(), "pid": os.getpid(), "flow_run_id": flow_run_id})


def end_workspace(paths: Paths, how: str) -> None:
    """Record how the run ended early (``failed``: its workspace stays for its reports;
    ``unpublished``: registered, to be published by the next start), so that it is never
    mistaken for a killed run."""
    owner = _read_owner(owner_record(paths))
    if owner is not None:
        write_json_atomic(owner_record(paths), {**owner, "ended": how})


def release_workspace(paths: Paths) -> None:
    """The run finished and published: forget its owner record (its workspace is gone)."""
    owner_record(paths).unlink(missing_ok=True)


def reap_dead_workspaces(cfg: PipelineConfig, root: str | Path) -> list[dict[str, Any]]:
    """Clean up after killed runs, at the start of a run, from the owner records: finish an
    interrupted publish; publish the workspace of a killed run whose registration had
    completed (its ``registration.json`` is written once the registry is final, so the
    published view agrees with the registry); remove the other workspaces of runs whose
    process died (same host, pid gone); publish a registered run that could not publish
    (unless a later run has been published since); remove dead writers' temp files. Returns
    the owner records of the runs dealt with, with ``workspace``, ``published`` and
    ``killed`` (the caller marks killed runs' orchestrator runs crashed). Records owned
    elsewhere, live, or of failed runs are left alone."""
    finish_interrupted_publish(cfg, root)
    owners = Paths.of(cfg, root).state / "owners"
    reaped = []
    for record in sorted(owners.glob("[!.]*.json")) if owners.is_dir() else []:
        owner, run_id = _read_owner(record), record.stem
        if owner is None or not run_id.isalnum():
            continue
        workspace = Paths.of(cfg, root, run_id).workspace
        if owner.get("ended") == "unpublished":
            if _superseded(cfg, root, run_id):  # a later run published since: drop it
                shutil.rmtree(workspace, ignore_errors=True)
            elif _try_publish(cfg, root, run_id):
                reaped.append({**owner, "workspace": str(workspace), "published": True,
                               "killed": False})
            else:
                continue
        elif owner.get("ended") is not None or not _dead(owner):
            continue
        else:
            reaped.append({**owner, "workspace": str(workspace),
                           "published": _roll_forward_or_remove(cfg, root, workspace),
                           "killed": True})
        record.unlink(missing_ok=True)
    reap_dead_temp_files(cfg, root)
    return reaped


def _roll_forward_or_remove(cfg: PipelineConfig, root: str | Path, workspace: Path) -> bool:
    """A killed run's workspace: published if its registration had completed, else removed.
    Returns whether its results are published (also when it died after publishing)."""
    if not workspace.exists():
        return True  # killed after its publish: the workspace went last
    if (workspace / "reports" / "registration.json").exists():
        publish_run(cfg, root, workspace.name)
        return True
    shutil.rmtree(workspace, ignore_errors=True)
    return False


def _superseded(cfg: PipelineConfig, root: str | Path, run_id: str) -> bool:
    """Whether a later run (ids are time-ordered) has been published since ``run_id``."""
    try:
        last = json.loads((Paths.of(cfg, root).state / LAST_PUBLISHED).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return str(last) > run_id


def _try_publish(cfg: PipelineConfig, root: str | Path, run_id: str) -> bool:
    """Publish a registered run left unpublished; if that fails again, keep it for later."""
    try:
        publish_run(cfg, root, run_id)
    except OSError as exc:
        print(f"run {run_id} is registered but still cannot be published: {exc}")
        return False
    return True


def reap_dead_temp_files(cfg: PipelineConfig, root: str | Path) -> list[Path]:
    """Remove the temp files of :func:`atomic_path` in the published locations whose writer
    (this host, that pid) is gone: what a kill in the middle of a stage's write or of
    :func:`publish_run` leaves. Returns what was removed."""
    published = Paths.of(cfg, root)
    removed = []
    for directory in (published.reports, published.partition.parent, published.model.parent,
                      published.state):
        for path in directory.glob(f".*{TEMP_SUFFIX}") if directory.is_dir() else []:
            match = _TEMP_NAME.match(path.name)
            if match is None or match["host"] != _HOST_TAG:
                continue
            if owner_is_dead(socket.gethostname(), match["pid"]):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def owner_is_dead(host: object, pid: object) -> bool:
    """Whether the process that owned a run is gone: decidable only on its own host, and only
    ``True`` when that pid no longer exists (a pid we may not signal is alive)."""
    if host != socket.gethostname() or not str(pid).isdigit():
        return False
    try:
        os.kill(int(str(pid)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
