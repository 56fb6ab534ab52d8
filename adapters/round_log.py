"""The round log's file: one canonical JSON line per record, appended, never rewritten.

Records are built and checked in :mod:`fl_core.federation.round_log`. Appending takes an
exclusive lock on the file, re-reads its last record (the new one chains to it; a damaged
last line is refused rather than built upon) and writes the new line with ``O_APPEND`` and
an fsync. ``fedpriv log verify`` reads the file back with :func:`verify_file`.

In ``federation.mode=sites`` the run's log is ``<state_dir>/runs/<run>/reports/round_log.jsonl``
(published to ``reports/`` with the run's other reports), signed with the federation
endpoint's key: :func:`round_log_sink` appends one record per round as the round engine
finishes it, and the registration (:mod:`adapters.mlflow_registration`) one per promotion
decision through a :class:`RunLog`, then logs the file to the MLflow run and tags the model
version with its head hash (:data:`HEAD_TAG`). Simulation runs keep no log: nobody signs
their replies.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
    SignedReply,
    Verification,
    decision_record,
    parse_line,
    parse_lines,
    round_record,
    verify,
)

if TYPE_CHECKING:  # not imported at run time: `fedpriv log verify` needs no torch
    from fl_core.federation.coordinator import RoundRecord, RoundSink

__all__ = ["HEAD_TAG", "RunLog", "append_decision", "append_round",
           "load_signing_key", "public_key_of", "read_log", "round_entry", "round_log_sink",
           "verify_file"]

HEAD_TAG = "round_log_head"
"""The model version tag (and run tag) holding the hash of the log's last record: what
``fedpriv log verify --head`` checks, so records cut off the end are caught too."""


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


# ---- a sites-mode run's log ------------------------------------------------------------------

Receipts = Callable[[int], Sequence[SignedReply]]
"""Round number → the signed hashes of the replies accepted for it
(:meth:`adapters.federation_endpoint.FederationEndpoint.receipts`)."""

REJECTED = "update rejected: its norm is over aggregation.max_norm_factor × the round's median"
EXCLUDED = "excluded by reputation: flagged in too many rounds"
FLAGGED = "flagged as anomalous (robust z-score over anomaly.z_threshold)"


def round_entry(record: RoundRecord, replies: Sequence[SignedReply]) -> RoundEntry:
    """The log's view of one finished round: the sites whose updates were aggregated, every
    accepted reply's signed hash (training and evaluation), the new model's hash, and who
    dropped out, was flagged or was excluded, and why."""
    exclusions = {site: REJECTED for site in record.rejected_clients}
    exclusions.update({site: EXCLUDED for site in record.excluded_clients})
    return RoundEntry(round=record.round, participants=tuple(record.aggregated_clients),
                      replies=tuple(replies), aggregate_sha256=record.aggregate_sha256,
                      dropouts=dict(record.failure_reasons),
                      flags={site: FLAGGED for site in record.flagged_clients},
                      exclusions=exclusions)


def round_log_sink(path: Path, *, run_id: str, coordinator_key: PrivateKey,
                   receipts: Receipts) -> RoundSink:
    """A round sink that appends each finished round's record to the log at ``path``.

    Called after the round's evaluation, so ``receipts(round)`` holds every reply the round
    accepted; a reply that comes after its deadline is refused by the endpoint and is in no
    record. ``run_id`` must be the endpoint's: the sites signed their replies over it."""
    def sink(record: RoundRecord) -> None:
        entry = round_entry(record, receipts(record.round))
        append_round(path, entry, run_id=run_id, coordinator_key=coordinator_key)
    return sink


@dataclass(frozen=True)
class RunLog:
    """One run's round log, as the registration appends its decision to it."""

    path: Path
    run_id: str
    coordinator_key: PrivateKey

    @classmethod
    def of_run(cls, path: Path, run_id: str, key_path: Path) -> RunLog:
        return cls(Path(path), run_id, load_signing_key(key_path))

    def decide(self, entry: DecisionEntry) -> LogRecord:
        """Append a promotion decision; the record returned is the log's new head."""
        return append_decision(self.path, entry, run_id=self.run_id,
                               coordinator_key=self.coordinator_key)
