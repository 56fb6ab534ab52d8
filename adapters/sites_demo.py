"""The pieces of ``make sites-demo`` (``infra/sites-demo.sh``) that a shell does badly: serve
the Prefect API with the demo's certificate and secret, wait until it answers over TLS, point
a site's ``site.yaml`` at it, and stop every process the demo started, their flow runs too.

Run as ``python -m adapters.sites_demo ACTION ...``. The secret comes from the environment
(``FEDPRIV_DEMO_AUTH``), never from the command line, where ``ps`` shows it to every user.
Prefect's process worker starts a flow run in a session of its own, so killing the worker's
process group would leave the session behind: :func:`stop` kills each process's descendants,
collected before anything is killed (an orphan can no longer be found from its parent). A
script's background commands ignore SIGINT, and a Prefect worker stops on SIGTERM by sending
itself SIGINT: :func:`detach` restores it, or the worker would never stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import ssl
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from adapters.artifacts import write_text_atomic
from adapters.prefect_api import server_command

AUTH_ENV = "FEDPRIV_DEMO_AUTH"


def detach(argv: list[str]) -> None:
    """Replace this process with ``argv`` in a session (and process group) of its own, with
    SIGINT and SIGQUIT back to their defaults (``setsid``, which macOS lacks, keeps them
    ignored)."""
    _own_session()
    os.execvp(argv[0], argv)


def _own_session() -> None:
    os.setsid()
    for number in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(number, signal.SIG_DFL)


def serve(*, host: str, port: int, pki: Path, home: Path) -> None:
    """Replace this process with the Prefect API on ``host:port`` (uvicorn, the PKI's server
    certificate, the secret from ``FEDPRIV_DEMO_AUTH``): the caller's PID is the server's."""
    launch = server_command(host=host, port=port, auth_string=os.environ[AUTH_ENV],
                            cert_file=pki / "server" / "server.crt",
                            key_file=pki / "server" / "server.key", home=home)
    env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
    _own_session()
    os.execvpe(launch.argv[0], launch.argv, {**env, **launch.env})


def wait_healthy(api_url: str, *, ca_file: Path, pid: int, timeout_s: float = 180) -> None:
    """Until ``GET {api_url}/health`` answers 200 over TLS checked against ``ca_file``; gives
    up at once if process ``pid`` (the server) has exited, and at ``timeout_s``."""
    context = ssl.create_default_context(cafile=str(ca_file))
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2,
                                        context=context) as answer:
                if answer.status == 200:
                    return
        except OSError as exc:
            if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
                raise SystemExit(f"the Prefect API's certificate: {exc}") from None
        if not _alive(pid):
            raise SystemExit("the Prefect API exited while starting")
        time.sleep(0.5)
    raise SystemExit(f"the Prefect API at {api_url} did not answer within {timeout_s:g} s")


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def set_prefect(site_file: Path, *, api_url: str, auth_file: str) -> None:
    """Point a site's ``site.yaml`` at the coordinator's Prefect API and the site's secret
    file (relative to the site's folder); the file's other settings and its header comment
    are kept."""
    text = site_file.read_text(encoding="utf-8")
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    tree = yaml.safe_load(text)
    tree["prefect"] = {**(tree.get("prefect") or {}), "api_url": api_url,
                       "auth_string_file": auth_file}
    write_text_atomic(site_file, header + yaml.safe_dump(tree, sort_keys=False))


def stop(pids: list[int], grace_s: float = 15, signal_number: int = signal.SIGTERM) -> list[int]:
    """Send ``signal_number`` to every process in ``pids`` and all their descendants
    (whatever their process group or session), SIGKILL those still alive after ``grace_s``.
    Returns the PIDs that had to be killed."""
    import psutil

    family: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            top = psutil.Process(pid)
            family.update({p.pid: p for p in [top, *top.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for process in family.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal_number)
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.sites_demo",
                                     description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    start = actions.add_parser("detach", help="exec a command in a session of its own")
    start.add_argument("command", nargs=argparse.REMAINDER)
    server = actions.add_parser("serve", help="exec the Prefect API in a session of its own "
                                              "(its secret: FEDPRIV_DEMO_AUTH)")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--pki", type=Path, required=True, help="holds server/server.{key,crt}")
    server.add_argument("--home", type=Path, required=True, help="the server's PREFECT_HOME")
    wait = actions.add_parser("wait", help="wait until the API answers /health over TLS")
    wait.add_argument("api_url")
    wait.add_argument("--ca", type=Path, required=True)
    wait.add_argument("--pid", type=int, required=True, help="the server's process")
    site = actions.add_parser("site", help="point site.yaml at the API and the secret file")
    site.add_argument("site_file", type=Path)
    site.add_argument("--api-url", required=True)
    site.add_argument("--auth-file", required=True, help="relative to the site's folder")
    halt = actions.add_parser("stop", help="stop processes and all their descendants")
    halt.add_argument("pids", type=int, nargs="*")
    halt.add_argument("--grace", type=float, default=15, help="seconds before SIGKILL")
    halt.add_argument("--signal", choices=["TERM", "INT"], default="TERM",
                      help="what to send first (INT: a Python program's clean-up runs)")
    args = parser.parse_args(argv)
    if args.action == "detach":
        detach(args.command)
    elif args.action == "serve":
        serve(host="127.0.0.1", port=args.port, pki=args.pki, home=args.home)
    elif args.action == "wait":
        wait_healthy(args.api_url, ca_file=args.ca, pid=args.pid)
    elif args.action == "site":
        set_prefect(args.site_file, api_url=args.api_url, auth_file=args.auth_file)
    else:
        killed = stop(args.pids, grace_s=args.grace,
                      signal_number=signal.Signals[f"SIG{args.signal}"])
        if killed:
            print(f"killed (did not stop on SIGTERM): {killed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
