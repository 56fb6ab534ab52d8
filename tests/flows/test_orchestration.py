"""Prefect behaviour: retries for transient faults only, and a real server + worker + deployment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fl_core.data.validation import DataValidationError
from tasks.common import TransientError, is_transient, task_options
from tests.servers import free_port, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("exc, transient", [
    (ConnectionError("reset"), True),
    (TimeoutError(), True),
    (TransientError("busy"), True),
    (OSError("disk hiccup"), True),
    (FileNotFoundError("gone"), False),
    (ValueError("bad"), False),
    (DataValidationError.__new__(DataValidationError), False),
    (None, False),
])
def test_transient_classification(exc: BaseException | None, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.slow
def test_tasks_retry_transient_faults_only(prefect_harness) -> None:
    from prefect import flow, task

    calls = {"flaky": 0, "bad": 0}

    @task(**task_options("flaky"))
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("site briefly unreachable")
        return "ok"

    @task(**task_options("bad"))
    def bad() -> None:
        calls["bad"] += 1
        raise ValueError("row 7: age 150 out of range")

    @flow
    def probe() -> str:
        return flaky()

    @flow
    def probe_bad() -> None:
        bad()

    assert probe() == "ok" and calls["flaky"] == 2
    with pytest.raises(ValueError, match="age 150"):
        probe_bad()
    assert calls["bad"] == 1  # not retried


@pytest.mark.slow
@pytest.mark.integration
def test_deployment_runs_on_real_server_and_worker(tmp_path: Path) -> None:
    """prefect server start + a process work pool + a worker + `prefect deployment run`."""
    project = tmp_path / "project"
    for item in ("fl_core", "adapters", "tasks", "flows", "params.yaml", "data/raw",
                 "data/schemas"):
        src = ROOT / item
        dst = project / item
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "FEDPRIV_ROOT": str(project), "DO_NOT_TRACK": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=log,
                              start_new_session=True)
    worker = None
    try:
        wait_healthy(api)

        def prefect(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=project,
                                  capture_output=True, text=True, timeout=timeout)

        created = prefect("work-pool", "create", "local", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file",
                           "flows/prefect.yaml")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        wlog = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local"],
                                  env=env, cwd=project, stdout=wlog, stderr=wlog,
                                  start_new_session=True)
        ran = prefect("deployment", "run", "fl-pipeline/nightly", "--watch",
                      "--param", 'overrides=["rounds=2"]', timeout=400)
        worker_log = (tmp_path / "worker.log").read_text()
        assert ran.returncode == 0, ran.stdout + ran.stderr + worker_log[-4000:]
        assert "Completed" in ran.stdout
        metrics = json.loads((project / "reports" / "metrics.json").read_text())
        assert metrics["rounds"] == 2
        schedules = prefect("deployment", "inspect", "fl-pipeline/nightly")
        assert "0 2 * * *" in schedules.stdout
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        log.close()
