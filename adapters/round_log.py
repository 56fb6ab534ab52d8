"""The round log's file: one canonical JSON line per record, appended, never rewritten.

Records are built and checked in :mod:`fl_core.federation.round_log`. Appending takes an
exclusive lock on the file, re-reads its last record (the new one chains to it; a damaged
last line is refused rather than built upon) and writes the new line with ``O_APPEND`` and
an fsync. ``fedpriv log verify`` reads the file back with :func:`verify_file`.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fl_core.federation.identity import PkiError, check_site_id, common_name
from fl_core.federation.round_log import (
    DecisionEntry,
    LogIntegrityError,
    LogRecord,
    PrivateKey,
    PublicKey,
    RoundEntry,
    Verification,
    decision_record,
    parse_line,
    parse_lines,
    round_record,
    verify,
)

__all__ = ["append_decision", "append_round", "load_signing_key", "public_key_of", "read_log",
           "verify_file"]


def _time(now: datetime.datetime | None) -> str:
    return (now or datetime.datetime.now(datetime.UTC)).isoformat(timespec="milliseconds")


def _lines(data: bytes) -> list[bytes]:
    """The file's lines; a last line without its newline is a torn or truncated write."""
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] != b"":
        raise LogIntegrityError(len(lines) - 1, "the last line is incomplete (no newline: "
                                                "truncated or a torn write)")
    return lines[:-1]


def read_log(path: Path) -> list[LogRecord]:
    """Every record of the log at ``path`` (:class:`LogIntegrityError` for a damaged line)."""
    return parse_lines(_lines(Path(path).read_bytes()))


Build = Callable[[LogRecord | None, str], LogRecord]


def _append(path: Path, build: Build, now: datetime.datetime | None) -> LogRecord:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, or two records share an index
        lines = _lines(path.read_bytes())
        previous = parse_line(lines[-1], len(lines) - 1) if lines else None
        record = build(previous, _time(now))
        os.write(fd, record.line() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    return record


def append_round(path: Path, entry: RoundEntry, *, run_id: str, coordinator_key: PrivateKey,
                 now: datetime.datetime | None = None) -> LogRecord:
    """Append one round's record, chained to the file's last record and signed."""
    return _append(path, lambda prev, time: round_record(
        prev, entry, run_id=run_id, time=time, coordinator_key=coordinator_key), now)


def append_decision(path: Path, entry: DecisionEntry, *, run_id: str,
                    coordinator_key: PrivateKey,
                    now: datetime.datetime | None = None) -> LogRecord:
    """Append one promotion decision's record (gate verdict, alias moves)."""
    return _append(path, lambda prev, time: decision_record(
        prev, entry, run_id=run_id, time=time, coordinator_key=coordinator_key), now)


def load_signing_key(path: Path) -> PrivateKey:
    """A PEM private key usable for the log: EC (the certificates' keys) or Ed25519."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise PkiError(f"cannot read key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path}: an EC or Ed25519 key is needed, not {type(key).__name__}")
    return key


def public_key_of(cert_path: Path) -> tuple[str, PublicKey]:
    """The subject CN and public key of the PEM certificate at ``cert_path``."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read certificate {cert_path}: {exc.strerror or exc}") from None
    except ValueError:
        raise PkiError(f"{cert_path} is not a PEM certificate") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise PkiError(f"{cert_path}: an EC or Ed25519 key is needed, not {type(key).__name__}")
    return common_name(cert.subject), key


def site_keys(cert_paths: Iterable[Path]) -> Mapping[str, list[PublicKey]]:
    """Site id → public keys, from the sites' certificates (the site id is the CN; a site
    with a renewed key may give its old and new certificates)."""
    keys: dict[str, list[PublicKey]] = {}
    for path in cert_paths:
        site, key = public_key_of(path)
        keys.setdefault(check_site_id(site), []).append(key)
    return keys


def verify_file(path: Path, *, coordinator_certs: Iterable[Path],
                site_certs: Iterable[Path] = (), head: str | None = None) -> Verification:
    """Verify the log at ``path`` with the coordinator's certificate(s) (several when its key
    was renewed over the log's life) and the sites' ones."""
    coordinator_keys = [public_key_of(p)[1] for p in coordinator_certs]
    if not coordinator_keys:
        raise PkiError("the coordinator's certificate is needed to verify the log")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read round log {path}: {exc.strerror or exc}") from None
    return verify(parse_lines(_lines(data)), coordinator_public_key=coordinator_keys,
                  site_public_keys=site_keys(site_certs), head=head)
