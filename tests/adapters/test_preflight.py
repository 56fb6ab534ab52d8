"""Preflight: the MLflow store, the ledger and the reports directory, checked before training."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.config_files import load_config
from adapters.preflight import PreflightError, check_tracking_uri, preflight
from fl_core.config.model import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_defaults_pass_and_create_nothing(project: Path) -> None:
    cfg = load_config(project / "params.yaml")
    preflight(cfg, project)
    assert not (project / "reports").exists() and not (project / ".fedpriv").exists()


def test_closed_http_port_is_refused_after_one_bounded_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One GET of /health with the preflight's timeout, no retries (MLflow's own client
    retries for minutes): refused in seconds by construction, not by a stopwatch."""
    import urllib.request

    from adapters.preflight import TIMEOUT_S

    calls: list[tuple[str, float]] = []
    real = urllib.request.urlopen

    def spy(url: str, timeout: float) -> object:
        calls.append((url, timeout))
        return real(url, timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    uri = f"http://127.0.0.1:{_closed_port()}/"
    with pytest.raises(PreflightError, match="mlflow.tracking_uri") as err:
        check_tracking_uri(uri)
    assert calls == [(f"{uri}health", TIMEOUT_S)] and TIMEOUT_S <= 10
    assert "unreachable" in str(err.value) and uri in str(err.value)


def test_a_server_that_never_answers_is_refused_naming_the_timeout() -> None:
    """A port that accepts the connection and then says nothing: the bounded wait ends in a
    refusal that says so."""
    from adapters.preflight import http_reachable

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(PreflightError) as err:
            http_reachable(uri, "mlflow.tracking_uri", timeout=0.2)
    assert str(err.value) == (f"mlflow.tracking_uri: the MLflow tracking server {uri} is "
                              f"unreachable (GET {uri}/health: no answer within 0.2 s)")


def test_http_server_that_answers_passes() -> None:
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_uri(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()


def test_unsupported_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="mlflow.tracking_uri.*unsupported scheme 'ftp'"):
        check_tracking_uri("ftp://example.org/mlruns")
    with pytest.raises(ConfigError, match="no host"):
        check_tracking_uri("http:///path")


def test_database_port_closed_is_refused() -> None:
    with pytest.raises(PreflightError, match=r"MLflow database .* unreachable"):
        check_tracking_uri(f"postgresql://u:p@127.0.0.1:{_closed_port()}/mlflow")


def test_sqlite_store_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(PreflightError, match="mlflow.tracking_uri.*is not a directory"):
        check_tracking_uri(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}")
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # can be created
    check_tracking_uri(f"file://{tmp_path / 'mlruns'}")


def test_reports_dir_that_is_a_file_is_refused(project: Path) -> None:
    (project / "reports").write_text("a file, not a directory")
    cfg = load_config(project / "params.yaml")
    with pytest.raises(PreflightError, match="reports_dir: the reports directory"):
        preflight(cfg, project)


def test_ledger_that_is_not_sqlite_is_refused(project: Path) -> None:
    ledger = project / "ledger.sqlite"
    ledger.write_bytes(b"garbage, not an SQLite database" * 100)
    cfg = load_config(project / "params.yaml", [f"privacy.ledger={ledger}"])
    with pytest.raises(PreflightError, match="privacy.ledger: the privacy ledger .* cannot be "):
        preflight(cfg, project)
    ledger.unlink()
    sqlite3.connect(ledger).close()  # an empty database is fine
    preflight(cfg, project)


def _fedpriv(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--root", str(project)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _ledger_rows(project: Path) -> int:
    ledger = project / ".fedpriv" / "privacy_ledger.sqlite"
    if not ledger.exists():
        return 0
    with sqlite3.connect(ledger) as db:
        return int(db.execute("SELECT COUNT(*) FROM ledger_charges").fetchone()[0])


@pytest.mark.slow
def test_run_with_unreachable_tracking_uri_exits_6_before_the_flow_starts(
        project: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}/"
    out = _fedpriv(project, "run", "--set", f"mlflow.tracking_uri={uri}")
    assert out.returncode == 6, out.stderr
    # refused before the flow started: no training run's folder, no round printed
    assert not (project / ".fedpriv" / "runs").exists()
    assert "round " not in out.stdout
    assert "mlflow.tracking_uri" in out.stderr and "unreachable" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (project / "data" / "models" / "model.pt").exists()
    assert not (project / "reports" / "train.json").exists()
    assert _ledger_rows(project) == 0


@pytest.mark.slow
def test_stage_train_checks_before_training(project: Path) -> None:
    for stage in ("validate", "partition"):
        assert _fedpriv(project, "stage", stage).returncode == 0
    uri = f"http://127.0.0.1:{_closed_port()}/"
    out = _fedpriv(project, "stage", "train", "--set", f"mlflow.tracking_uri={uri}")
    assert out.returncode == 6, out.stderr
    assert "mlflow.tracking_uri" in out.stderr and "Traceback" not in out.stderr
    assert not (project / "data" / "models" / "model.pt").exists()
    assert _ledger_rows(project) == 0
