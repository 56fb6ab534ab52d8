"""What a kill leaves in the published locations, and how the next start repairs it: a
half-finished publish is rolled forward to one whole run's view, a killed run whose
registration completed is published, dead writers' temp files are removed, and nothing that
belongs to a live process or to the user is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.artifacts import (
    PUBLISH_JOURNAL,
    Paths,
    atomic_path,
    finish_interrupted_publish,
    owner_record,
    reap_dead_temp_files,
    reap_dead_workspaces,
    write_json_atomic,
)
from adapters.config_files import load_config
from tests.killing import kill_when

ROOT = Path(__file__).resolve().parents[2]
FILES = ("validation.json", "train.json", "audit.json", "metrics.json", "registration.json")


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _workspace(project: Path, run_id: str, tag: str, owner_pid: int | None = None) -> Paths:
    """A finished run's workspace: every report says ``tag``."""
    import socket

    cfg = load_config(project / "params.yaml", [])
    work = Paths.of(cfg, project, run_id)
    for name in FILES:
        write_json_atomic(work.reports / name, {"run": tag})
    write_json_atomic(work.partition, {"run": tag})
    write_json_atomic(work.model, {"run": tag})
    if owner_pid is not None:
        write_json_atomic(owner_record(work), {"host": socket.gethostname(),
                                               "pid": owner_pid, "flow_run_id": None})
    return work


def _published_runs(project: Path) -> set[str]:
    cfg = load_config(project / "params.yaml", [])
    published = Paths.of(cfg, project)
    files = [published.reports / n for n in FILES] + [published.partition, published.model]
    return {json.loads(f.read_text())["run"] if f.exists() else "missing" for f in files}


SLOW_PUBLISH = """
import shutil, sys, time
from pathlib import Path
import adapters.artifacts as artifacts
from adapters.config_files import load_config
copy = shutil.copyfile
def slow_copy(source, target):
    copy(source, target)
    time.sleep(0.3)  # widen the window between two files
artifacts.shutil.copyfile = slow_copy
root = Path(sys.argv[1])
artifacts.publish_run(load_config(root / "params.yaml", []), root, sys.argv[2])
"""


def test_a_publish_killed_between_files_is_rolled_forward(project: Path) -> None:
    cfg = load_config(project / "params.yaml", [])
    old = _workspace(project, "old", "old")
    from adapters.artifacts import publish_run

    publish_run(cfg, project, "old")
    assert not old.workspace.exists() and _published_runs(project) == {"old"}
    _workspace(project, "new", "new")

    published = Paths.of(cfg, project)
    killed, _ = kill_when(
        [sys.executable, "-c", SLOW_PUBLISH, str(project), "new"],
        lambda: json.loads(published.partition.read_text())["run"] == "new",
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed
    assert _published_runs(project) == {"old", "new"}  # mixed: the kill was mid-publish
    assert (published.state / PUBLISH_JOURNAL).exists()

    assert finish_interrupted_publish(cfg, project) == "new"
    assert _published_runs(project) == {"new"}
    assert not (published.state / PUBLISH_JOURNAL).exists()
    assert list((published.state / "runs").iterdir()) == []
    left = reap_dead_temp_files(cfg, project)  # the killed writer's temp (mid-copy)
    assert len(left) <= 1 and all(p.name.endswith(".tmp") for p in left)
    assert not [p for d in (published.reports, published.model.parent, published.state)
                for p in d.glob(".*.tmp")]
    assert finish_interrupted_publish(cfg, project) is None  # idempotent


def test_a_garbled_journal_publishes_nothing(project: Path) -> None:
    cfg = load_config(project / "params.yaml", [])
    state = Paths.of(cfg, project).state
    state.mkdir(parents=True)
    (state / PUBLISH_JOURNAL).write_text('{"run_id": "../../etc"}')
    assert finish_interrupted_publish(cfg, project) is None
    assert not (state / PUBLISH_JOURNAL).exists()
    assert _published_runs(project) == {"missing"}


def test_killed_runs_are_published_only_if_their_registration_completed(project: Path) -> None:
    cfg = load_config(project / "params.yaml", [])
    registered = _workspace(project, "registered", "registered", owner_pid=_dead_pid())
    unregistered = _workspace(project, "unregistered", "unregistered", owner_pid=_dead_pid())
    (unregistered.reports / "registration.json").unlink()
    alive = _workspace(project, "alive", "alive", owner_pid=os.getpid())

    reaped = reap_dead_workspaces(cfg, project)
    assert {Path(r["workspace"]).name: r["published"] for r in reaped} == {
        "registered": True, "unregistered": False}
    assert not registered.workspace.exists() and not unregistered.workspace.exists()
    assert alive.workspace.exists()  # a live run's workspace is never touched
    assert _published_runs(project) == {"registered"}
    assert reap_dead_workspaces(cfg, project) == []  # the records of reaped runs are gone


def test_an_unpublished_run_superseded_by_a_later_publish_is_dropped(project: Path) -> None:
    """A registered run that could not publish is published later, unless a newer run has
    been published since (the newer run's registration is the registry's latest)."""
    from adapters.artifacts import end_workspace, publish_run

    cfg = load_config(project / "params.yaml", [])
    older = _workspace(project, "20260101000000aaaa", "older", owner_pid=_dead_pid())
    end_workspace(older, "unpublished")
    _workspace(project, "20260102000000bbbb", "newer")
    publish_run(cfg, project, "20260102000000bbbb")
    assert reap_dead_workspaces(cfg, project) == []
    assert not older.workspace.exists()
    assert _published_runs(project) == {"newer"}


HOLD_A_TEMP = """
import sys, time
from pathlib import Path
from adapters.artifacts import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("half")
    time.sleep(60)
"""


def test_temp_files_of_killed_writers_are_removed_and_no_others(project: Path) -> None:
    cfg = load_config(project / "params.yaml", [])
    reports = Paths.of(cfg, project).reports
    reports.mkdir(parents=True)
    killed, _ = kill_when(
        [sys.executable, "-c", HOLD_A_TEMP, str(reports / "metrics.json")],
        lambda: any(reports.glob(".metrics.json.*.tmp")),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed
    dead = list(reports.glob(".metrics.json.*.tmp"))
    assert len(dead) == 1
    users_own = reports / ".notes.tmp"
    users_own.write_text("mine")
    foreign_host = reports / ".metrics.json.00000000-1.abc.tmp"  # another host's writer
    foreign_host.write_text("theirs")
    with atomic_path(reports / "audit.json") as live:
        live.write_text("in progress")
        assert reap_dead_temp_files(cfg, project) == dead
        assert live.exists()  # this (live) process's temp stays
    assert users_own.exists() and foreign_host.exists()
    assert not (reports / "metrics.json").exists()


@pytest.mark.slow
def test_a_registered_run_that_cannot_publish_exits_7_and_is_published_later(
        project: Path) -> None:
    """reports/ breaks after registration (here metrics.json is a directory): the run exits 7
    naming the registered version, keeps its workspace, and the next start publishes it, so
    reports/ and the registry agree."""
    from mlflow import MlflowClient

    cfg = load_config(project / "params.yaml", [])
    (project / "reports" / "metrics.json").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(project / ".fedpriv" / "prefect")})
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--root", str(project), "--set", "rounds=2",
         "--set", "audit.shadow_models=2", "--set", "gate.min_auc_lower=0",
         "--set", "gate.min_balanced_accuracy_lower=0"],  # 2 rounds: champion, whatever AUC
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 7, done.stderr[-2000:]
    assert "fedpriv: registered, not published: model fedpriv-heart v1 is registered " \
           "(aliases: challenger, champion)" in done.stderr
    uri = f"sqlite:///{project / '.fedpriv' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("fedpriv-heart", "champion").version) == "1"
    (workspace,) = (project / ".fedpriv" / "runs").iterdir()
    cfg_paths = Paths.of(cfg, project, workspace.name)
    assert json.loads(owner_record(cfg_paths).read_text())["ended"] == "unpublished"

    (project / "reports" / "metrics.json").rmdir()
    (reaped,) = reap_dead_workspaces(cfg, project)
    assert reaped["published"] and not reaped["killed"]
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert str(registration["model_version"]) == "1"
    assert json.loads((project / "reports" / "metrics.json").read_text())["rounds"] == 2
    assert not workspace.exists()
