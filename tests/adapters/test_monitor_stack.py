"""``make monitor`` (adapters/monitor_stack.py): without the Debian packages it prints the
apt command and fails; with them it starts both servers on loopback, prints where runs push and
where Grafana points, and stops both on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from adapters import monitor_stack
from tests.monitoring import require_tools
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_missing_packages_print_the_apt_command(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(monitor_stack.shutil, "which", lambda name: None)
    assert monitor_stack.main(["--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "prometheus, prometheus-pushgateway" in err and monitor_stack.APT_COMMAND in err
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_make_monitor_starts_both_prints_the_settings_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    require_tools("prometheus", "prometheus-pushgateway")
    prometheus, pushgateway = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.monitor_stack", "--prometheus-port", str(prometheus),
         "--pushgateway-port", str(pushgateway), "--dir", str(tmp_path / "monitor")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("Ctrl-C"):
                break
        out = "".join(lines)
        assert f"--set monitoring.pushgateway=127.0.0.1:{pushgateway}" in out, out
        assert f"http://127.0.0.1:{prometheus}" in out
        assert str(tmp_path / "monitor" / "grafana" / "provisioning") in out
        assert _listening(prometheus) and _listening(pushgateway)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not _listening(prometheus) and not _listening(pushgateway)
        assert (tmp_path / "monitor" / "prometheus" / "tsdb").is_dir()
    finally:
        if proc.poll() is None:  # the servers run in sessions of their own: kill them by PID
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
