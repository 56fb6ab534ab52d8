"""Preflight: what training depends on afterwards is checked before it starts (seconds).

Today's failure modes it catches: an MLflow tracking/registry URI that nothing answers (a
run that trained for minutes and then retried registration for minutes more), a ledger that
cannot be opened (or was deleted, replaced or truncated since the MLflow store recorded its
head: :func:`adapters.ledger_anchor.check_recorded_head`), a reports directory that cannot be
written, and a model name whose aliased
versions take other input columns (:func:`adapters.mlflow_registration.check_serving_contract`,
a configuration error). Each failure raises
:class:`PreflightError` naming the config key and what was found; a URI that is malformed or
of an unsupported scheme is a configuration error (:class:`~fl_core.config.model.ConfigError`).
Nothing here creates a directory or a store: a directory is probed by writing one temporary
file in it (or its nearest existing parent) and removing it, which also catches a read-only
file system that ``os.access`` reports writable to root.
"""

from __future__ import annotations

import socket
import sqlite3
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from adapters.artifacts import Paths
from fl_core.config.model import ConfigError, PipelineConfig

TIMEOUT_S = 5.0
# SQLAlchemy database schemes MLflow accepts as a tracking store (checked with a TCP connect)
DB_SCHEMES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# hosted stores that need credentials to probe: not checked here
UNCHECKED_SCHEMES = ("databricks", "databricks-uc", "uc")


class PreflightError(RuntimeError):
    """A store or directory the run needs later is unreachable or not writable."""


def writable_dir(directory: Path, key: str, what: str) -> None:
    """Raise unless ``directory`` exists and is writable, or could be created writable."""
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{key}: {what} {directory} cannot be created: {probe} is not a "
                             f"directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PreflightError(f"{key}: {what} {directory} is not writable "
                             f"({exc.strerror or type(exc).__name__} in {probe})") from None


def sqlite_file(path: Path, key: str, what: str) -> None:
    """``path`` can hold an SQLite database: its directory is writable and, if it exists,
    it opens as one."""
    writable_dir(path.parent, key, f"the directory of {what}")
    if not path.exists():
        return
    if not path.is_file():
        raise PreflightError(f"{key}: {what} {path} is not a file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=TIMEOUT_S)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise PreflightError(f"{key}: {what} {path} cannot be opened ({exc})") from None


def http_reachable(uri: str, key: str, timeout: float = TIMEOUT_S) -> None:
    """An MLflow server answers ``GET <uri>/health`` within ``timeout`` seconds.

    Any HTTP answer below 500 counts as reachable (a proxy may not route ``/health``);
    a refused or timed-out connection or a server error does not.
    """
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (scheme checked)
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        inner = getattr(exc, "reason", exc)
        timed_out = isinstance(inner, TimeoutError)
        reason = f"no answer within {timeout:g} s" if timed_out else str(inner)
    raise PreflightError(f"{key}: the MLflow tracking server {uri} is unreachable "
                         f"(GET {url}: {reason})")


def tcp_reachable(host: str, port: int, uri: str, key: str,
                  timeout: float = TIMEOUT_S) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise PreflightError(f"{key}: the MLflow database {uri} is unreachable "
                             f"({host}:{port}: {reason})") from None


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri") -> None:
    """The MLflow tracking (and registry: the same URI) store can be reached or created."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2 → postgresql
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ConfigError(f"{key}={uri!r}: no host in the URI")
        http_reachable(uri, key)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            sqlite_file(path, key, "the MLflow store")
    elif base in DB_SCHEMES:
        if not parts.hostname:
            raise ConfigError(f"{key}={uri!r}: no host in the URI")
        tcp_reachable(parts.hostname, parts.port or DB_SCHEMES[base], uri, key)
    elif scheme in ("", "file") or len(scheme) == 1:  # a path (C: on Windows)
        path = Path(unquote(parts.path) if scheme == "file" else uri)
        writable_dir(path, key, "the MLflow file store")
    elif scheme not in UNCHECKED_SCHEMES:
        raise ConfigError(f"{key}={uri!r}: unsupported scheme {scheme!r}; use sqlite:///PATH, "
                          f"http(s)://HOST[:PORT], file:///PATH or a database URI")


def preflight(cfg: PipelineConfig, root: str | Path = ".", tracking: bool = True) -> None:
    """Check, in seconds, what a run needs after training: raise :class:`PreflightError`.

    The reports directory and the ledger are always checked; the MLflow store when
    ``tracking`` (the pipeline, ``stage train`` and ``stage register``).
    """
    paths = Paths.of(cfg, root)
    writable_dir(paths.reports, "reports_dir", "the reports directory")
    ledger = cfg.ledger_path if cfg.ledger_path.is_absolute() else paths.root / cfg.ledger_path
    sqlite_file(ledger, "privacy.ledger" if cfg.privacy.ledger else "state_dir",
                "the privacy ledger")
    if tracking:
        # the MLflow store lives under the project root, as adapters.publish places it
        located = cfg.model_copy(update={"state_dir": str(paths.state)})
        key = "mlflow.tracking_uri" if cfg.mlflow.tracking_uri else "state_dir"
        uri = located.mlflow_tracking_uri
        check_tracking_uri(uri, key)
        if _store_exists(uri):
            from adapters.ledger_anchor import check_recorded_head
            from adapters.mlflow_registration import check_serving_contract

            check_serving_contract(located, uri)
            # the ledger still holds the head the store last recorded: not deleted, replaced
            # or truncated (exit 6 when missing, 5 otherwise)
            check_recorded_head(located, paths.root, uri)


def _store_exists(uri: str) -> bool:
    """Whether the store may hold registered models (a missing SQLite file is not created
    here: nothing is registered in it yet)."""
    if uri.startswith("sqlite:"):
        path = _sqlite_path(uri)
        return path is not None and path.is_file()
    return urlsplit(uri).scheme.lower() in ("http", "https", *DB_SCHEMES)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI; None for an in-memory or pathless one."""
    path = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
    return Path(path) if path and path != ":memory:" else None


