"""The rules of one site's channel to the federation endpoint: what a message's envelope says,
which envelopes the endpoint accepts, and how a large message is rebuilt from its chunks.

Every message that crosses the network is fedpriv's framed message
(:mod:`fl_core.federation.messages`) preceded by a :class:`Envelope`: the run, the site, the
sequence number the coordinator gave the instruction it answers, the round, the size and
SHA-256 of the message, and (site → coordinator) the site's signature over
``(run, round, site, sha256)`` (:func:`fl_core.federation.round_log.reply_message`). The
envelope is small canonical JSON with a fixed set of typed fields; anything else is refused
before a byte of the message is read.

The endpoint accepts a site's reply only when (:func:`check_reply`) it is for this run, names
the site its certificate names, answers the one instruction the site currently owes, for that
instruction's round, and declares a size under the cap. So a reply replayed from an earlier
round (its sequence number is spent, or its round differs), from an earlier run, or sent in
another site's name is refused, and a site can address only its own mailbox. The size is
checked against the cap before anything is allocated; :class:`ChunkAssembler` then refuses a
stream that sends more than it declared, less, or bytes whose hash differs.

Nothing here does I/O: the gRPC endpoint and the site's channel are in ``adapters/``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

MAX_ENVELOPE_BYTES = 4096
CHUNK_BYTES = 1 << 20  # 1 MiB per stream message: well under gRPC's 4 MiB default
READY_SEQ = 0  # a session's start-up report answers no instruction
_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{0,512}$")


class Kind(enum.Enum):
    PULL = "pull"  # site → endpoint: "my next instruction after seq"
    INSTRUCTION = "instruction"  # endpoint → site
    IDLE = "idle"  # endpoint → site: nothing yet (a heartbeat; pull again)
    READY = "ready"  # site → endpoint: its start-up report (SiteReady or Failure)
    REPLY = "reply"  # site → endpoint: the answer to one instruction


class Refusal(enum.Enum):
    """Why the endpoint refused a call; also the ``reason`` label a monitor counts."""

    MALFORMED = "malformed envelope"
    IDENTITY = "peer certificate refused"
    OLD_TLS = "negotiated below TLS 1.3"
    WRONG_SITE = "claims another site than its certificate"
    OTHER_RUN = "for another run"
    REPLAY = "replayed or already answered"
    UNEXPECTED = "answers no instruction sent"
    LATE = "after the round deadline"
    TOO_LARGE = "larger than the message cap"
    TRUNCATED = "ended before its declared size"
    BAD_HASH = "bytes differ from the declared hash"
    BAD_SIGNATURE = "site signature does not verify"
    BUSY = "too many calls in flight for this site"
    UNKNOWN_SITE = "site not in this run"


class ChannelRefusedError(ValueError):
    """One call refused; ``reason`` is the category, the text says what exactly."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Envelope:
    """What precedes each message on the wire (see the module docstring)."""

    kind: Kind
    run_id: str
    site: str
    seq: int = 0
    round: int = -1
    size: int = 0
    sha256: str = ""
    signature: str = ""  # hex; the site's, on READY and REPLY

    def encode(self) -> bytes:
        raw = {**asdict(self), "kind": self.kind.value}
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


_FIELD_TYPES = {"kind": str, "run_id": str, "site": str, "seq": int, "round": int,
                "size": int, "sha256": str, "signature": str}


def _field_problem(raw: dict[str, Any]) -> str | None:
    if set(raw) != set(_FIELD_TYPES):
        return f"fields {sorted(raw)} are not {sorted(_FIELD_TYPES)}"
    for name, kind in _FIELD_TYPES.items():
        value = raw[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} is not a {kind.__name__}"
    if raw["kind"] not in {k.value for k in Kind}:
        return f"unknown kind {raw['kind']!r}"
    if not _RUN_ID.match(raw["run_id"]) or not 0 < len(raw["site"]) <= 64:
        return "run id or site malformed"
    if raw["seq"] < 0 or raw["size"] < 0 or raw["round"] < -1:
        return "negative sequence number, size or round"
    if raw["sha256"] and not _SHA256.match(raw["sha256"]):
        return "sha256 is not 64 hex digits"
    if not _SIGNATURE.match(raw["signature"]):
        return "signature is not hex"
    return None


def decode_envelope(data: bytes) -> Envelope:
    """The envelope in ``data``, or :class:`ChannelRefusedError` (MALFORMED) saying why not."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ChannelRefusedError(Refusal.MALFORMED, f"envelope of {len(data)} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[…"
        raise ChannelRefusedError(Refusal.MALFORMED, "envelope is not JSON") from None
    if not isinstance(raw, dict):
        raise ChannelRefusedError(Refusal.MALFORMED, "envelope is not an object")
    problem = _field_problem(raw)
    if problem:
        raise ChannelRefusedError(Refusal.MALFORMED, problem)
    return Envelope(**{**raw, "kind": Kind(raw["kind"])})


@dataclass(frozen=True)
class SiteCredentials:
    """A site's TLS material, as bytes: its key and certificate, and the project CA."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


@dataclass(frozen=True)
class Owed:
    """The instruction a site currently owes an answer to."""

    seq: int
    round: int
    expired: bool = False  # its round's deadline passed: a reply now is late


def check_envelope(envelope: Envelope, *, peer_site: str, run_id: str, max_bytes: int) -> None:
    """Checks every call's envelope passes, whatever it carries."""
    if envelope.site != peer_site:
        raise ChannelRefusedError(Refusal.WRONG_SITE, f"certificate of {peer_site!r}, "
                                                      f"envelope names {envelope.site!r}")
    if envelope.run_id != run_id:
        raise ChannelRefusedError(Refusal.OTHER_RUN, f"run {envelope.run_id!r}, this is "
                                                     f"{run_id!r}")
    if envelope.size > max_bytes:
        raise ChannelRefusedError(Refusal.TOO_LARGE, f"declares {envelope.size} bytes, the cap "
                                                     f"is {max_bytes}")


def check_reply(envelope: Envelope, owed: Owed | None, *, answered: int) -> None:
    """Whether a REPLY answers what the site owes: ``owed`` (None: nothing), ``answered`` the
    highest sequence number this site has already answered or let expire."""
    if envelope.kind is not Kind.REPLY:
        raise ChannelRefusedError(Refusal.MALFORMED, f"a {envelope.kind.value} is not a reply")
    if owed is None or envelope.seq != owed.seq:
        if envelope.seq <= answered or (owed is not None and envelope.seq < owed.seq):
            raise ChannelRefusedError(Refusal.REPLAY, f"sequence number {envelope.seq} is spent")
        raise ChannelRefusedError(Refusal.UNEXPECTED, f"no instruction {envelope.seq} was sent")
    if envelope.round != owed.round:
        raise ChannelRefusedError(Refusal.REPLAY, f"round {envelope.round} in an answer to "
                                                  f"round {owed.round}'s instruction")
    if owed.expired:
        raise ChannelRefusedError(Refusal.LATE, f"instruction {owed.seq} (round {owed.round})")


class ChunkAssembler:
    """Rebuilds one message from its chunks, refusing the first chunk that would take it past
    its declared size (already checked against the cap): a stream can never make it hold more.
    The chunks are hashed as they come and joined once at the end (one copy)."""

    def __init__(self, envelope: Envelope) -> None:
        self._envelope = envelope
        self._chunks: list[bytes] = []
        self._filled = 0
        self._hash = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        if self._filled + len(chunk) > self._envelope.size:
            raise ChannelRefusedError(Refusal.TOO_LARGE, f"more than the {self._envelope.size} "
                                                         f"bytes declared")
        self._chunks.append(chunk)
        self._hash.update(chunk)
        self._filled += len(chunk)

    def finish(self) -> bytes:
        if self._filled != self._envelope.size:
            raise ChannelRefusedError(Refusal.TRUNCATED, f"{self._filled} of "
                                                         f"{self._envelope.size} bytes")
        if self._hash.hexdigest() != self._envelope.sha256:
            raise ChannelRefusedError(Refusal.BAD_HASH, "sha256 mismatch")
        return b"".join(self._chunks)


def chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes (none for empty data), cut as they are
    sent: a 40 MB update is not copied whole a second time."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start:start + size])
