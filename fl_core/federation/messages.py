"""Typed, versioned messages between the coordinator and a site, as bytes. No pickle.

Everything that crosses the site boundary is one of these dataclasses, framed as

    magic "FPMS" | version u8 | kind u8 | reserved u16 | meta_len u32 | blob_len u32
    | meta (UTF-8 JSON object, at most 64 KiB) | blob (raw bytes) | crc32 u32

``meta`` carries scalars only (ids, counts, losses, ε); ``blob`` carries the one binary field
(a codec payload, or an evaluation histogram as little-endian uint32). :func:`decode_message`
checks the frame, the declared lengths against the bytes actually present, the checksum and
every field's type *before* building anything; a message it refuses raises
:class:`MessageError` naming the site it was attributed to.

**Evaluation replies are aggregates only** (:class:`EvaluateReply`): loss sum, count,
confusion counts at the 0.5 threshold and, per label, a histogram of predicted probabilities
in :data:`HISTOGRAM_BINS` equal bins. Its size does not depend on the number of patients, no
patient's score or label is in it, and the pooled AUC computed from merged histograms
(:func:`fl_core.model.metrics.histogram_auc`) differs from the exact AUC only through pairs that
share a bin (each counted as a tie, ½).

**Membership-audit replies are aggregates too** (:class:`AuditReply`, the answer to an
:class:`AuditInstruction` in sites mode): for each attack in :data:`AUDIT_ATTACKS` and each
population (the site's members, its non-members) a histogram of the attack's score mapped to
``[0, 1]`` by a fixed monotone map (:mod:`fl_core.audit.federated` documents the maps), in
``bins`` equal bins. The counts are signed 32-bit on the wire so that a negative count is
representable and refused; each population's histogram must sum to its declared count.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from fl_core.codec.framing import CRC, crc_intact, seal

MAGIC = b"FPMS"
PROTOCOL_VERSION = 1
FRAME = struct.Struct("<4sBBHII")
MAX_META_BYTES = 64 * 1024
HISTOGRAM_BINS = 4096
AUDIT_BINS = 4096
AUDIT_ATTACKS = ("loss_threshold", "lira")  # the histograms' first axis, in this order
MAX_BINS = 1 << 20


class MessageError(ValueError):
    """A message was refused; the text names the site it came from (when known) and why."""

    def __init__(self, reason: str, site: str | None = None) -> None:
        super().__init__(f"message from site {site!r}: {reason}" if site else reason)
        self.site = site
        self.reason = reason


@dataclass(frozen=True)
class FitInstruction:
    """Coordinator → site: train from this global model for round ``round``."""

    KIND: ClassVar[int] = 1
    run_id: str
    round: int
    model: bytes  # a codec payload (fl_core.codec.topk)
    local_epochs: int


@dataclass(frozen=True)
class EvaluateInstruction:
    """Coordinator → site: score this (dense) global model on your held-out patients."""

    KIND: ClassVar[int] = 5
    run_id: str
    round: int
    model: bytes  # a dense codec payload


@dataclass(frozen=True)
class FitReply:
    """Site → coordinator: the encoded update and what it cost."""

    KIND: ClassVar[int] = 2
    site: str
    round: int
    update: bytes  # a codec payload of (local − global)
    num_patients: int
    train_loss: float
    epsilon: float | None  # DP-SGD ε spent so far by this site (None: not private)
    dp_steps: int


@dataclass(frozen=True)
class EvaluateReply:
    """Site → coordinator: the global model on the site's held-out patients, aggregated.

    ``confusion`` is (true positives, false positives, true negatives, false negatives) at
    probability 0.5; ``histogram`` is ``[2, bins]`` counts of predicted probabilities of the
    label-0 and label-1 patients (bin ``b`` holds ``[b/bins, (b+1)/bins)``, 1.0 in the last).
    """

    KIND: ClassVar[int] = 3
    site: str
    round: int
    loss_sum: float
    count: int
    confusion: tuple[int, int, int, int]
    histogram: torch.Tensor

    @classmethod
    def from_logits(cls, site: str, round_idx: int, logits: torch.Tensor,
                    labels: torch.Tensor, bins: int = HISTOGRAM_BINS) -> EvaluateReply:
        """Aggregate a site's predictions: the only evaluation a site sends."""
        logits, labels = logits.detach().reshape(-1).double(), labels.detach().reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels.double(), reduction="sum")
        predicted, actual = logits > 0, labels > 0.5
        confusion = tuple(int(v) for v in (
            (predicted & actual).sum(), (predicted & ~actual).sum(),
            (~predicted & ~actual).sum(), (~predicted & actual).sum()))
        which = (torch.sigmoid(logits) * bins).long().clamp(0, bins - 1)
        histogram = torch.bincount(actual.long() * bins + which, minlength=2 * bins)
        return cls(site, round_idx, float(loss), int(labels.numel()),
                   confusion, histogram.view(2, bins))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, EvaluateReply) and _scalars(self) == _scalars(other)
                and torch.equal(self.histogram, other.histogram))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Failure:
    """Site → coordinator: the site could not do what it was asked, and why."""

    KIND: ClassVar[int] = 4
    site: str
    round: int
    reason: str


@dataclass(frozen=True)
class AuditInstruction:
    """Coordinator → site: audit this (dense) final model on your own patients, with
    ``shadow_models`` shadows trained at the site; ``seed`` fixes the shadows' halves."""

    KIND: ClassVar[int] = 6
    site: str
    round: int
    model: bytes  # a dense codec payload, as EvaluateInstruction carries
    shadow_models: int
    seed: int

    def __post_init__(self) -> None:
        if self.shadow_models < 2:
            raise MessageError(f"shadow_models={self.shadow_models}: LiRA needs at least 2",
                               self.site)


@dataclass(frozen=True)
class AuditReply:
    """Site → coordinator: the membership attacks' scores on the site's patients, aggregated.

    ``histograms[a, p, b]`` counts the patients of population ``p`` (0: the ``members``
    training patients, 1: the ``non_members`` held-out patients) whose score under attack
    ``AUDIT_ATTACKS[a]``, mapped to ``[0, 1]``, falls in bin ``b`` (``[b/bins,
    (b+1)/bins)``, 1.0 in the last). Its size depends on ``bins`` only, never on the patients.
    """

    KIND: ClassVar[int] = 7
    site: str
    round: int
    members: int
    non_members: int
    histograms: torch.Tensor  # int64 [len(AUDIT_ATTACKS), 2, bins]

    def __post_init__(self) -> None:
        problem = audit_histogram_problem(self.histograms, self.members, self.non_members)
        if problem:
            raise MessageError(problem, self.site)

    @classmethod
    def from_unit_scores(
        cls, site: str, round_idx: int, scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
        bins: int = AUDIT_BINS,
    ) -> AuditReply:
        """Histogram per-patient scores already in ``[0, 1]``: ``scores[attack]`` is
        (members' scores, non-members' scores) for every attack of :data:`AUDIT_ATTACKS`."""
        if set(scores) != set(AUDIT_ATTACKS):
            raise ValueError(f"scores for {sorted(scores)}, expected {list(AUDIT_ATTACKS)}")
        rows = []
        for attack in AUDIT_ATTACKS:
            rows.append(torch.stack([unit_histogram(u, bins) for u in scores[attack]]))
        members, non_members = (int(t.numel()) for t in scores[AUDIT_ATTACKS[0]])
        return cls(site, round_idx, members, non_members, torch.stack(rows))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AuditReply) and _scalars(self) == _scalars(other)
                and torch.equal(self.histograms, other.histograms))

    __hash__ = None  # type: ignore[assignment]


def unit_histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``values`` in ``[0, 1]`` over ``bins`` equal bins (1.0 in the last)."""
    values = values.detach().double().reshape(-1)
    if not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails too
        raise ValueError("scores to histogram must lie in [0, 1]")
    which = (values * bins).long().clamp(0, bins - 1)
    return torch.bincount(which, minlength=bins)


def audit_histogram_problem(histograms: torch.Tensor, members: int, non_members: int) -> str:
    """Why ``histograms`` is not a valid :class:`AuditReply` payload ("" when it is)."""
    shape = tuple(histograms.shape)
    if len(shape) != 3 or shape[:2] != (len(AUDIT_ATTACKS), 2) or not 1 <= shape[2] <= MAX_BINS:
        return f"audit histograms of shape {shape}, expected ({len(AUDIT_ATTACKS)}, 2, bins)"
    if histograms.dtype.is_floating_point or histograms.dtype == torch.bool:
        return f"audit histograms of dtype {histograms.dtype}, expected integer counts"
    if members < 0 or non_members < 0:
        return f"negative population size (members {members}, non-members {non_members})"
    if bool((histograms < 0).any()):
        return "audit histograms hold a negative count"
    sums = histograms.sum(dim=2)
    expected = torch.tensor([members, non_members], dtype=sums.dtype)
    if not bool((sums == expected).all()):
        return (f"audit histograms sum to {sums.tolist()} per attack, not members "
                f"{members} / non-members {non_members}")
    return ""


@dataclass(frozen=True)
class SiteReady:
    """Site → coordinator, once per session: the site checked and split its own data.

    ``validation`` is a JSON summary of the site's GX validation (pass/fail, counts, the
    failed expectations without any cell value; the full result stays at the site). The
    coordinator treats it as untrusted text: it parses it as JSON and only reports it.
    """

    KIND: ClassVar[int] = 10
    site: str
    round: int  # -1: not a round's message
    passed: bool
    num_features: int
    train_patients: int
    test_patients: int
    validation: str
    ledger_run_id: str  # the site's own ledger charge for this run ("" when not private)
    # the site's budget left before this run: its policy's lifetime ε minus its most exposed
    # patient's spending (what the site reports of its ledger; one number, no patient)
    budget_left: float = 0.0


@dataclass(frozen=True)
class Shutdown:
    """Coordinator → site: the run is over (or abandoned); end the session."""

    KIND: ClassVar[int] = 11
    run_id: str
    round: int
    reason: str


Message = (FitInstruction | EvaluateInstruction | FitReply | EvaluateReply | Failure
           | AuditInstruction | AuditReply | SiteReady | Shutdown)
_KINDS: dict[int, type] = {c.KIND: c for c in (FitInstruction, EvaluateInstruction, FitReply,
                                              EvaluateReply, Failure, AuditInstruction,
                                              AuditReply, SiteReady, Shutdown)}
_BLOB_FIELD = {FitInstruction: "model", EvaluateInstruction: "model", FitReply: "update",
               EvaluateReply: "histogram", AuditInstruction: "model", AuditReply: "histograms"}
_BINNED = (EvaluateReply, AuditReply)  # their metadata also declares "bins"
# the JSON type each scalar field must have once decoded (int fields refuse bools and floats)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "site": (str,), "reason": (str,), "round": (int,), "local_epochs": (int,),
    "num_patients": (int,), "dp_steps": (int,), "count": (int,), "train_loss": (float, int),
    "loss_sum": (float, int), "epsilon": (float, int, type(None)), "confusion": (list,),
    "passed": (bool,), "validation": (str,), "ledger_run_id": (str,),
    "budget_left": (float, int),
}


def _scalars(message: Message) -> dict[str, Any]:
    blob = _BLOB_FIELD.get(type(message))
    return {f.name: getattr(message, f.name) for f in fields(message) if f.name != blob}


def _blob(message: Message, meta: dict[str, Any]) -> bytes:
    """The message's binary field as bytes (histograms: declaring ``bins`` in ``meta``)."""
    if isinstance(message, EvaluateReply):
        meta["bins"] = int(message.histogram.shape[1])
        blob = message.histogram.to(torch.int64).clamp(0, 2**32 - 1).to(torch.int32)
        return bytes(blob.numpy().astype("<u4").tobytes())
    if isinstance(message, AuditReply):
        meta["bins"] = int(message.histograms.shape[2])
        counts = message.histograms.to(torch.int64)
        if bool((counts > 2**31 - 1).any()):
            raise MessageError("an audit histogram count exceeds 2^31 - 1", message.site)
        return bytes(counts.numpy().astype("<i4").tobytes())
    field_name = _BLOB_FIELD.get(type(message))
    return getattr(message, field_name) if field_name else b""


def encode_message(message: Message) -> bytes:
    """The message as one checksummed frame."""
    meta = _scalars(message)
    blob_bytes = _blob(message, meta)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    if len(meta_bytes) > MAX_META_BYTES:
        raise MessageError(f"metadata of {len(meta_bytes)} bytes exceeds {MAX_META_BYTES}")
    head = FRAME.pack(MAGIC, PROTOCOL_VERSION, message.KIND, 0, len(meta_bytes), len(blob_bytes))
    return seal(head, meta_bytes + blob_bytes)


def _frame(data: bytes, site: str | None) -> tuple[type, int, int]:
    """The frame's message class and its declared meta and blob lengths, checked against the
    bytes present (not the checksum)."""
    if not isinstance(data, bytes | bytearray):
        raise MessageError(f"a {type(data).__name__}, not bytes", site)
    if len(data) < FRAME.size + CRC.size:
        raise MessageError(f"truncated: {len(data)} bytes, the frame alone needs "
                           f"{FRAME.size + CRC.size}", site)
    magic, version, kind, _, meta_len, blob_len = FRAME.unpack_from(data)
    if magic != MAGIC:
        raise MessageError(f"bad magic {bytes(magic)!r}: not a fedpriv message", site)
    if version != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {version}, this build speaks "
                           f"{PROTOCOL_VERSION}", site)
    if kind not in _KINDS:
        raise MessageError(f"unknown message kind {kind}", site)
    if meta_len > MAX_META_BYTES or FRAME.size + meta_len + blob_len + CRC.size != len(data):
        raise MessageError(f"declared sizes (meta {meta_len}, blob {blob_len}) do not match "
                           f"the {len(data)} bytes received", site)
    return _KINDS[kind], meta_len, blob_len


def peek_message(data: bytes, *, site: str | None = None) -> tuple[type, dict[str, Any]]:
    """The frame's message class and its checked scalar fields, without touching the blob or
    the checksum: what a transport needs to route a message (its round, the site it claims)
    without copying a 40 MB update. :func:`decode_message` still checks everything."""
    cls, meta_len, _ = _frame(data, site)
    meta = _meta(bytes(data[FRAME.size : FRAME.size + meta_len]), cls, site)
    claimed = meta.get("site")
    if site is not None and claimed is not None and claimed != site:
        raise MessageError(f"claims to come from site {claimed!r}", site)
    return cls, meta


def decode_message(data: bytes, *, site: str | None = None,
                   expect: type | tuple[type, ...] | None = None) -> Message:
    """Check and decode one frame; ``site`` names the sender in errors (and must match the
    message's own ``site`` field), ``expect`` the message type(s) acceptable here."""
    cls, meta_len, blob_len = _frame(data, site)
    if not crc_intact(data):
        raise MessageError("checksum mismatch: corrupted in transit", site)
    if expect is not None and not issubclass(cls, expect):
        raise MessageError(f"unexpected {cls.__name__} here", site)
    meta = _meta(bytes(data[FRAME.size : FRAME.size + meta_len]), cls, site)
    blob = bytes(data[FRAME.size + meta_len : FRAME.size + meta_len + blob_len])
    message = _build(cls, meta, blob, site)
    claimed = getattr(message, "site", None)
    if site is not None and claimed is not None and claimed != site:
        raise MessageError(f"claims to come from site {claimed!r}", site)
    return message


def _meta(raw: bytes, cls: type, site: str | None) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"metadata is not JSON ({exc})", site) from None
    except RecursionError:  # "[[[[…": nesting deeper than the parser's recursion limit
        raise MessageError("metadata is not JSON (nested too deep)", site) from None
    if not isinstance(meta, dict):
        raise MessageError("metadata is not a JSON object", site)
    wanted = {f.name for f in fields(cls)} - {_BLOB_FIELD.get(cls, "")}
    wanted |= {"bins"} if cls in _BINNED else set()
    if set(meta) != wanted:
        raise MessageError(f"{cls.__name__} fields {sorted(meta)}, expected {sorted(wanted)}",
                           site)
    for name, value in meta.items():
        allowed = _FIELD_TYPES.get(name, (int,))
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise MessageError(f"field {name!r} has type {type(value).__name__}", site)
    return meta


def _build_audit_reply(meta: dict[str, Any], blob: bytes, site: str | None) -> AuditReply:
    bins = meta.pop("bins")
    cells = len(AUDIT_ATTACKS) * 2 * bins
    if not 1 <= bins <= MAX_BINS or len(blob) != cells * 4:
        raise MessageError(f"audit histograms of {len(blob)} bytes do not hold "
                           f"{len(AUDIT_ATTACKS)} × 2 × {bins} int32 counts", site)
    counts = torch.frombuffer(bytearray(blob), dtype=torch.int32).to(torch.int64)
    histograms = counts.view(len(AUDIT_ATTACKS), 2, bins)
    problem = audit_histogram_problem(histograms, meta["members"], meta["non_members"])
    if problem:
        raise MessageError(problem, site)
    return AuditReply(histograms=histograms, **meta)


def _build_evaluate_reply(meta: dict[str, Any], blob: bytes, site: str | None) -> EvaluateReply:
    bins = meta.pop("bins")
    if not 1 <= bins <= MAX_BINS or len(blob) != 2 * bins * 4:
        raise MessageError(f"histogram of {len(blob)} bytes does not hold 2 × {bins} "
                           f"uint32 counts", site)
    confusion = meta["confusion"]
    if len(confusion) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  for v in confusion):
        raise MessageError("confusion must be four non-negative counts", site)
    counts = torch.frombuffer(bytearray(blob), dtype=torch.int32).to(torch.int64)
    histogram = (counts & 0xFFFFFFFF).view(2, bins)
    if int(histogram.sum()) != meta["count"] or sum(confusion) != meta["count"]:
        raise MessageError("histogram, confusion and count disagree", site)
    meta["confusion"] = tuple(confusion)
    return EvaluateReply(histogram=histogram, **meta)


def _build(cls: type, meta: dict[str, Any], blob: bytes, site: str | None) -> Message:
    if cls is AuditReply:
        return _build_audit_reply(meta, blob, site)
    if cls is EvaluateReply:
        return _build_evaluate_reply(meta, blob, site)
    if cls is AuditInstruction and meta["shadow_models"] < 2:
        raise MessageError(f"shadow_models={meta['shadow_models']}: LiRA needs at least 2",
                           site)
    if cls in _BLOB_FIELD:
        meta[_BLOB_FIELD[cls]] = blob
    elif blob:
        raise MessageError(f"{cls.__name__} carries no binary field", site)
    _check_finite(meta, site)
    return cls(**meta)


def _check_finite(meta: dict[str, Any], site: str | None) -> None:
    for name in ("train_loss", "loss_sum", "epsilon", "budget_left"):
        value = meta.get(name)
        if isinstance(value, float) and math.isinf(value):
            raise MessageError(f"field {name!r} is infinite", site)
        if name in meta and isinstance(value, int):
            meta[name] = float(value)
