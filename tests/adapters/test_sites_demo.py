"""``make sites-demo``'s helpers: a site's file pointed at the Prefect API, processes started in
their own session with SIGINT restored (a Prefect worker stops on SIGTERM by sending itself
SIGINT), every descendant stopped, the API's start given up when its process is gone. The
demo itself (infra/sites-demo.sh) takes minutes: docs/sites-mode.md reports its runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from adapters import pki
from adapters.config_files import load_site_config
from adapters.site_worker import write_site_config
from adapters.sites_demo import set_prefect, stop, wait_healthy
from tests.servers import free_port


def test_set_prefect_points_the_site_file_at_the_api_and_keeps_the_rest(tmp_path: Path) -> None:
    for name in ("north.csv", "north.key", "north.crt", "ca.crt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "prefect-auth").write_text("demo:secret\n")
    (tmp_path / "prefect-auth").chmod(0o600)
    site_file = write_site_config(tmp_path, site="North", data="north.csv")
    set_prefect(site_file, api_url="https://127.0.0.1:4300/api", auth_file="prefect-auth")
    assert site_file.read_text().startswith("# fedpriv site configuration")
    files = load_site_config(site_file)
    assert (files.config.site, files.data.name) == ("North", "north.csv")
    env = files.prefect_environment()
    assert env["PREFECT_API_URL"] == "https://127.0.0.1:4300/api"
    assert env["PREFECT_API_AUTH_STRING"] == "demo:secret"
    assert env["PREFECT_API_SSL_CERT_FILE"] == str(tmp_path / "ca.crt")


# what a shell script's `&` does to its background commands: SIGINT ignored, then exec (an
# ignored signal stays ignored across exec; no preexec_fn, unsafe in a threaded test process)
IGNORING_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def test_detach_gives_a_session_of_its_own_and_sigint_back() -> None:
    probe = ("import os, signal; print(os.getsid(0) == os.getpid(), "
             "signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    done = subprocess.run([sys.executable, "-c", IGNORING_SIGINT, "-m", "adapters.sites_demo",
                           "detach", sys.executable, "-c", probe], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "True"]


# a parent that starts a child in a session of its own (as Prefect's worker starts a flow
# run) and one that ignores SIGTERM; prints their PIDs
FAMILY = """
import signal, subprocess, sys, time
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
stubborn = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)"]
own = subprocess.Popen(sleeper, start_new_session=True)
deaf = subprocess.Popen(stubborn, stdout=subprocess.PIPE, text=True)
deaf.stdout.readline()
print(own.pid, deaf.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_stop_ends_every_descendant_whatever_its_session() -> None:
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    own, deaf = map(int, parent.stdout.readline().split())
    assert os.getsid(own) != os.getsid(parent.pid)
    started = time.monotonic()
    killed = stop([parent.pid], grace_s=2)
    parent.wait(timeout=10)
    assert killed == [deaf] and time.monotonic() - started < 10
    for pid in (own, deaf):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert stop([parent.pid]) == []  # gone already: nothing to do


def test_waiting_for_the_api_gives_up_once_its_process_is_gone(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ca = pki.init_ca(tmp_path / "ca", name="test CA", days=1)
    started = time.monotonic()
    with pytest.raises(SystemExit, match="exited while starting"):
        wait_healthy(f"https://127.0.0.1:{free_port()}/api", ca_file=ca, pid=gone.pid,
                     timeout_s=30)
    assert time.monotonic() - started < 5
