"""Where a run's files live and how they are written: atomically, never half-done."""

from __future__ import annotations

import json
import os
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

from fl_core.config import PipelineConfig
from fl_core.reports import TrainingSummary


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
    def audit(self) -> Path:
        return self.reports / "audit.json"

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


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; move it into place only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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


def read_training(paths: Paths) -> TrainingSummary:
    """The train stage's typed result (``train.json``)."""
    try:
        return TrainingSummary.from_dict(read_json(paths.train_summary, "train"))
    except ValueError as exc:
        raise FileNotFoundError(f"{paths.train_summary}: {exc}") from None


def new_run_id() -> str:
    """A fresh workspace id: time-ordered, unique across processes."""
    return f"{time.strftime('%Y%m%d%H%M%S')}{uuid.uuid4().hex[:8]}"


def publish_run(cfg: PipelineConfig, root: str | Path, run_id: str) -> Paths:
    """Make a finished run's outputs the published view: each file copied atomically (temp
    file + rename) under an exclusive lock, so two runs finishing together publish one after
    the other, never interleaved; then the workspace is removed. Returns the published paths.
    """
    import fcntl

    work, published = Paths.of(cfg, root, run_id), Paths.of(cfg, root)
    pairs = [(work.partition, published.partition), (work.model, published.model)]
    pairs += [(f, published.reports / f.name) for f in sorted(work.reports.glob("*"))
              if f.is_file() and not f.name.startswith(".")]
    published.state.mkdir(parents=True, exist_ok=True)
    with (published.state / "publish.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for source, target in pairs:
            if source.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(source, tmp)
    if work.workspace.parent == published.state / "runs":  # never anything but a workspace
        shutil.rmtree(work.workspace, ignore_errors=True)
    return published


OWNER_FILE = "owner.json"


def claim_workspace(paths: Paths, flow_run_id: str | None) -> None:
    """Create the run's workspace and record who owns it (host, pid, orchestrator run id), so
    that a later run can tell a killed run's leftovers from a live one's."""
    paths.workspace.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.workspace / OWNER_FILE, {
        "host": socket.gethostname(), "pid": os.getpid(), "flow_run_id": flow_run_id})


def end_workspace(paths: Paths, how: str) -> None:
    """Record that the run ended (``failed``): its workspace stays for its reports and is
    never mistaken for a killed run's."""
    owner_file = paths.workspace / OWNER_FILE
    if owner_file.exists():
        owner = json.loads(owner_file.read_text())
        write_json_atomic(owner_file, {**owner, "ended": how})


def reap_dead_workspaces(cfg: PipelineConfig, root: str | Path) -> list[dict[str, Any]]:
    """Remove the workspaces of runs whose process died (same host, pid gone); returns their
    owner records (the caller marks their orchestrator runs crashed). Workspaces without an
    owner record or owned elsewhere are left alone."""
    runs = Paths.of(cfg, root).state / "runs"
    reaped = []
    for workspace in sorted(runs.glob("*")) if runs.is_dir() else []:
        try:
            owner = json.loads((workspace / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        ended = owner.get("ended") is not None  # failed, and kept for its reports
        if ended or not owner_is_dead(owner.get("host"), owner.get("pid")):
            continue
        shutil.rmtree(workspace, ignore_errors=True)
        reaped.append({**owner, "workspace": str(workspace)})
    return reaped


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
