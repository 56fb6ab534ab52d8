"""Real local servers for integration tests: a Prefect API server and process workers, on
127.0.0.1, each in its own process group, stopped by PID afterwards (reused by every test that
needs them)."""

from __future__ import annotations

import base64
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from adapters.prefect_api import client_environment, server_command

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, timeout: float = 120, *, ca_file: Path | None = None,
                 auth_string: str | None = None) -> None:
    """Wait for ``GET {api}/health``; over https the server's certificate is checked against
    ``ca_file`` (a certificate that does not verify fails at once instead of at the timeout),
    and ``auth_string`` is sent as basic auth (Prefect lets health checks through without)."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    request = urllib.request.Request(f"{api}/health")
    if auth_string is not None:
        token = base64.b64encode(auth_string.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
                raise
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
                line = " ".join(child.cmdline())  # Prefect's engine, or the site's
                if "prefect.engine" in line or "flows.site_engine" in line:
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


def _server_launch(port: int, home: Path, auth_string: str | None,
                   tls: tuple[Path, Path, Path] | None) -> tuple[list[str], dict[str, str],
                                                                  dict[str, str]]:
    """The server's command, its own settings, and the settings its clients need."""
    if tls is None:
        argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                "--port", str(port)]
        if auth_string is None:
            return argv, {}, {}
        return (argv, {"PREFECT_SERVER_API_AUTH_STRING": auth_string},
                {"PREFECT_API_AUTH_STRING": auth_string})
    if auth_string is None:
        raise ValueError("a TLS Prefect server here always has an auth string")
    cert, key, ca = tls
    launch = server_command(host="127.0.0.1", port=port, auth_string=auth_string,
                            cert_file=cert, key_file=key, home=home)
    return launch.argv, launch.env, client_environment(api_url=launch.api_url,
                                                       auth_string=auth_string, ca_file=ca)


@contextmanager
def prefect_server(tmp: Path, *, auth_string: str | None = None,
                   tls: tuple[Path, Path, Path] | None = None) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free 127.0.0.1 port with its own PREFECT_HOME.

    ``auth_string`` turns on the API's basic auth; ``tls`` (cert, key, CA) serves it over https
    with that certificate (uvicorn on Prefect's app factory, see ``adapters.prefect_api``; needs
    ``auth_string``). The env handed back carries what clients need: the URL, the auth string
    and the CA."""
    port = free_port()
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    argv, server_env, client_env = _server_launch(port, home, auth_string, tls)
    api = client_env.get("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **client_env}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen(argv, env={**env, **server_env}, stdout=log, stderr=log,
                              start_new_session=True)
    handle = PrefectServer(api, env, home)
    try:
        wait_healthy(api, ca_file=tls[2] if tls else None, auth_string=auth_string)
        yield handle
    finally:
        for worker in handle.workers.values():
            stop(worker)
        stop(server)
