"""Real local servers for integration tests: a Prefect API server and process workers, on
127.0.0.1, each in its own process group, stopped by PID afterwards (reused by every test that
needs them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api} not healthy after {timeout}s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with ``start_new_session=True`` and its whole group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass


@dataclass
class PrefectServer:
    api: str
    env: dict[str, str]
    home: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self, name: str, pool: str, cwd: Path, extra_env: dict[str, str],
                     log: Path) -> subprocess.Popen:
        """A process worker polling ``pool``, started in ``cwd`` with ``extra_env``."""
        out = log.open("w")
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            cwd=cwd, env={**self.env, **extra_env}, stdout=out, stderr=out,
            start_new_session=True)
        self.workers[name] = proc
        return proc

    def kill_flow_runs(self, name: str) -> int:
        """SIGKILL the flow-run processes the worker started, not the worker: the session
        crashes, the worker stays up. Returns how many were killed."""
        import psutil

        killed = 0
        for child in psutil.Process(self.workers[name].pid).children(recursive=True):
            with suppress(psutil.NoSuchProcess):
                if "prefect.engine" in " ".join(child.cmdline()):
                    child.kill()
                    killed += 1
        return killed

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and every process it started (its flow runs may run in their
        own process groups): the site's machine going down."""
        import psutil

        proc = self.workers[name]
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            with suppress(psutil.NoSuchProcess):
                member.kill()
        proc.wait(timeout=20)


@contextmanager
def prefect_server(tmp: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=log,
                              start_new_session=True)
    handle = PrefectServer(api, env, home)
    try:
        wait_healthy(api)
        yield handle
    finally:
        for worker in handle.workers.values():
            stop(worker)
        stop(server)
