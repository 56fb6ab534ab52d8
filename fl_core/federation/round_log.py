"""The round log: one hash-chained, signed record per round and per decision.

Pure: records are built, serialised and checked here; :mod:`adapters.round_log` appends them
to a file, one canonical JSON line each.

A record's ``hash`` is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8, no
floats) of everything but ``hash`` and ``signature``; that includes its ``index`` and the
previous record's hash (``prev_hash``; :data:`GENESIS` for the first), so each record pins
all the records before it. The coordinator signs the hash with its endpoint key; a reply's
site signs ``(run, round, site, sha256 of the reply)`` with its certificate's key
(:func:`sign_reply`), and that signature is copied into the round's record. So:

- an edited record no longer matches its hash, and a record re-hashed after an edit no longer
  matches the coordinator's signature (nobody without the coordinator's key can re-sign);
- a deleted, swapped or inserted record breaks the index sequence and the chain;
- a reply the coordinator invented fails its site's signature.

Dropping the last records leaves a valid shorter chain: that is caught against the head hash
recorded elsewhere (the model version's tag), which :func:`verify` takes as ``head``.
Signatures are ECDSA with SHA-256 (the certificates' P-256 keys) or Ed25519.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fl_core.config.model import site_slug

FORMAT = 1
GENESIS = "0" * 64
KINDS = ("round", "decision")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_RECORD_KEYS = {"v", "index", "kind", "run_id", "time", "body", "prev_hash", "hash", "signature"}
_LOG_DOMAIN = b"fedpriv round log record v1\x00"
_REPLY_DOMAIN = "fedpriv reply v1"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class LogIntegrityError(ValueError):
    """The log is not intact; ``position`` is the record's 0-based place in the file."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"record {position} (line {position + 1}): {reason}")
        self.position = position
        self.reason = reason


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no spaces, UTF-8, floats refused."""
    _refuse_floats(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _refuse_floats(obj: Any) -> None:
    # a float's text is not one canonical string across writers; the log holds none
    if isinstance(obj, float):
        raise TypeError("the round log holds no floats (write them as strings)")
    if isinstance(obj, Mapping):
        for v in obj.values():
            _refuse_floats(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _refuse_floats(v)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def signature_valid(key: PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # a malformed DER signature too
        return False
    return True


PublicKeys = PublicKey | Sequence[PublicKey]
"""One key, or several (the keys a party had over the log's life: a renewed certificate may
carry a new key); a signature is accepted if any of them verifies it."""


def any_valid(keys: PublicKeys, signature: bytes, data: bytes) -> bool:
    candidates = keys if isinstance(keys, Sequence) else (keys,)
    return any(signature_valid(k, signature, data) for k in candidates)


def reply_message(run_id: str, round_number: int, site: str, reply_sha256: str) -> bytes:
    """What a site signs for one reply: bound to its run, round and its own id."""
    return canonical({"domain": _REPLY_DOMAIN, "run_id": run_id, "round": round_number,
                      "site": site, "reply_sha256": reply_sha256})


def sign_reply(key: PrivateKey, *, run_id: str, round_number: int, site: str,
               reply: bytes) -> tuple[str, bytes]:
    """At the site: the reply's SHA-256 (hex) and the site's signature over it."""
    digest = sha256_hex(reply)
    return digest, sign(key, reply_message(run_id, round_number, site, digest))


@dataclass(frozen=True)
class SignedReply:
    site: str
    sha256: str  # of the reply's bytes as the coordinator received them
    signature: bytes  # the site's, over reply_message(run, round, site, sha256)


@dataclass(frozen=True)
class RoundEntry:
    """What one round's record holds. ``dropouts``, ``flags`` and ``exclusions`` map a site to
    why (a deadline missed, an anomaly flag, a rule that excluded its update)."""

    round: int
    participants: tuple[str, ...]
    replies: tuple[SignedReply, ...]
    aggregate_sha256: str
    dropouts: Mapping[str, str] = field(default_factory=dict)
    flags: Mapping[str, str] = field(default_factory=dict)
    exclusions: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"round": self.round, "participants": sorted(self.participants),
                "replies": [{"site": r.site, "sha256": r.sha256, "signature": r.signature.hex()}
                            for r in sorted(self.replies, key=lambda r: r.site)],
                "aggregate_sha256": self.aggregate_sha256, "dropouts": dict(self.dropouts),
                "flags": dict(self.flags), "exclusions": dict(self.exclusions)}


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: str  # the version the alias now points to ("" when the alias was removed)
    previous: str  # where it pointed before ("" for none)


@dataclass(frozen=True)
class DecisionEntry:
    """A promotion decision: the gate's verdict and reasons, and the aliases it moved."""

    model: str
    version: str
    verdict: str  # passed | refused | undone (its registration rolled back after this)
    #   | rolled back | retired (`fedpriv model`: adapters.model_lifecycle)
    reasons: tuple[str, ...] = ()
    alias_moves: tuple[AliasMove, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "verdict": self.verdict,
                "reasons": list(self.reasons),
                "alias_moves": [{"alias": m.alias, "version": m.version,
                                 "previous": m.previous} for m in self.alias_moves]}


@dataclass(frozen=True)
class LogRecord:
    index: int
    kind: str  # round | decision
    run_id: str
    time: str  # ISO 8601, the coordinator's clock
    body: Mapping[str, Any]
    prev_hash: str
    hash: str
    signature: str  # hex, the coordinator's over signed_bytes(hash)

    def content(self) -> dict[str, Any]:
        """What the hash covers."""
        return {"v": FORMAT, "index": self.index, "kind": self.kind, "run_id": self.run_id,
                "time": self.time, "body": self.body, "prev_hash": self.prev_hash}

    def line(self) -> bytes:
        """The record as one canonical JSON line (without the newline)."""
        return canonical({**self.content(), "hash": self.hash, "signature": self.signature})


def signed_bytes(record_hash: str) -> bytes:
    """What the coordinator signs for a record (domain-separated from a site's signature)."""
    return _LOG_DOMAIN + record_hash.encode("ascii")


def append(previous: LogRecord | None, *, kind: str, run_id: str, time: str,
           body: Mapping[str, Any], coordinator_key: PrivateKey) -> LogRecord:
    """The record that follows ``previous`` (``None``: the first), hashed and signed."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    draft = LogRecord(index=0 if previous is None else previous.index + 1, kind=kind,
                      run_id=run_id, time=time, body=json.loads(canonical(body)),
                      prev_hash=GENESIS if previous is None else previous.hash, hash="",
                      signature="")
    digest = sha256_hex(canonical(draft.content()))
    return dataclasses.replace(draft, hash=digest,
                               signature=sign(coordinator_key, signed_bytes(digest)).hex())


def round_record(previous: LogRecord | None, entry: RoundEntry, *, run_id: str, time: str,
                 coordinator_key: PrivateKey) -> LogRecord:
    return append(previous, kind="round", run_id=run_id, time=time, body=entry.body(),
                  coordinator_key=coordinator_key)


def decision_record(previous: LogRecord | None, entry: DecisionEntry, *, run_id: str,
                    time: str, coordinator_key: PrivateKey) -> LogRecord:
    return append(previous, kind="decision", run_id=run_id, time=time, body=entry.body(),
                  coordinator_key=coordinator_key)


def _check_fields(raw: Any, position: int) -> None:
    if not isinstance(raw, dict) or set(raw) != _RECORD_KEYS:
        raise LogIntegrityError(position, "not a round-log record (fields missing or extra)")
    checks = (("v", raw["v"] == FORMAT), ("index", type(raw["index"]) is int),
              ("kind", raw["kind"] in KINDS), ("run_id", isinstance(raw["run_id"], str)),
              ("time", isinstance(raw["time"], str)), ("body", isinstance(raw["body"], dict)),
              ("prev_hash", isinstance(raw["prev_hash"], str)
               and bool(_HEX64.fullmatch(raw["prev_hash"]))),
              ("hash", isinstance(raw["hash"], str) and bool(_HEX64.fullmatch(raw["hash"]))),
              ("signature", isinstance(raw["signature"], str)
               and bool(_HEX.fullmatch(raw["signature"]))))
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise LogIntegrityError(position, f"malformed field(s) {', '.join(bad)} (edited)")


def parse_line(line: bytes, position: int) -> LogRecord:
    """A record from its line; any byte that differs from the canonical form is an edit."""
    try:
        raw = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LogIntegrityError(position, "not valid JSON (edited or truncated)") from None
    _check_fields(raw, position)
    record = LogRecord(**{k: v for k, v in raw.items() if k != "v"})
    try:
        same = record.line() == line
    except (TypeError, ValueError):
        same = False
    if not same:
        raise LogIntegrityError(position, "not in canonical form (edited)")
    return record


def parse_lines(lines: Sequence[bytes]) -> list[LogRecord]:
    return [parse_line(line, i) for i, line in enumerate(lines)]


@dataclass(frozen=True)
class Verification:
    records: int
    head: str  # the last record's hash (GENESIS for an empty log)
    site_signatures: int  # how many were checked
    unchecked_sites: tuple[str, ...]  # sites whose replies were not checked (no key given)


def _reply_rows(record: LogRecord, position: int) -> list[tuple[str, str, bytes]]:
    replies = record.body.get("replies")
    rnd = record.body.get("round")
    if not isinstance(replies, list) or type(rnd) is not int:
        raise LogIntegrityError(position, "a round record without a round number or replies")
    rows = []
    for r in replies:
        ok = isinstance(r, dict) and isinstance(r.get("site"), str) and \
            isinstance(r.get("sha256"), str) and isinstance(r.get("signature"), str) and \
            _HEX.fullmatch(r["signature"])
        if not ok:
            raise LogIntegrityError(position, f"malformed reply entry {r!r}")
        rows.append((r["site"], r["sha256"], bytes.fromhex(r["signature"])))
    return rows


def _check_sites(record: LogRecord, position: int, site_keys: Mapping[str, PublicKeys],
                 unchecked: set[str]) -> int:
    """Check every reply's site signature for which a key is given; count them. A key is
    looked up by the site's id as the record names it (the configuration's, which the site
    signed over: ``St. Mary's North``), else by its slug (``st-mary-s-north``: a
    certificate's subject names a site so, as the endpoint reads it)."""
    checked = 0
    for site, digest, signature in _reply_rows(record, position):
        key = site_keys.get(site) or site_keys.get(site_slug(site))
        if key is None:
            unchecked.add(site)
            continue
        message = reply_message(record.run_id, record.body["round"], site, digest)
        if not any_valid(key, signature, message):
            raise LogIntegrityError(position, f"site {site!r}'s signature over its reply does "
                                              f"not verify with that site's key (forged)")
        checked += 1
    return checked


def _check_record(record: LogRecord, position: int, coordinator_key: PublicKeys) -> None:
    if sha256_hex(canonical(record.content())) != record.hash:
        raise LogIntegrityError(position, "its content does not match its hash (edited)")
    if not any_valid(coordinator_key, bytes.fromhex(record.signature),
                     signed_bytes(record.hash)):
        raise LogIntegrityError(position, "the coordinator's signature does not verify with "
                                          "the coordinator's key (forged or re-hashed)")


def _check_place(records: Sequence[LogRecord], position: int) -> None:
    """The record at ``position`` must be record number ``position``; if not, say what the
    sequence of indices suggests happened."""
    index = records[position].index
    if index == position:
        return
    if any(r.index == index for r in records[:position]):
        what = "a second copy of it is already above (inserted)"
    elif index < position or any(r.index == position for r in records[position + 1:]):
        what = "records out of order (swapped)"
    else:
        what = f"record(s) {position}..{index - 1} missing before it (deleted)"
    raise LogIntegrityError(position, f"it is record {index}: {what}")


def verify(records: Sequence[LogRecord], *, coordinator_public_key: PublicKeys,
           site_public_keys: Mapping[str, PublicKeys] | None = None,
           head: str | None = None) -> Verification:
    """Check the whole log; :class:`LogIntegrityError` names the first record that fails.

    ``coordinator_public_key`` may be several keys (a renewed endpoint key), and so may each
    site's. ``site_public_keys`` maps a site id to its key(s): each reply of a site given is
    checked;
    the others are listed in :attr:`Verification.unchecked_sites`. ``head``, the hash the
    log's last record must have (from the model version's tag), catches records removed at
    the end."""
    previous, checked = GENESIS, 0
    unchecked: set[str] = set()
    for position, record in enumerate(records):
        _check_record(record, position, coordinator_public_key)
        _check_place(records, position)
        if record.prev_hash != previous:
            raise LogIntegrityError(position, "it does not follow the record before it "
                                              "(chain broken: a record inserted or replaced)")
        if record.kind == "round":
            checked += _check_sites(record, position, site_public_keys or {}, unchecked)
        previous = record.hash
    if head is not None and previous != head:
        raise LogIntegrityError(max(len(records) - 1, 0),
                                f"the last record's hash {previous[:16]}… is not the expected "
                                f"head {head[:16]}… (records removed or added at the end)")
    return Verification(len(records), previous, checked, tuple(sorted(unchecked)))
