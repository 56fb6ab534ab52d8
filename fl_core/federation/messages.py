"""Typed, versioned messages between the coordinator and a site, as bytes. No pickle.

Everything that crosses the site boundary is one of these dataclasses, framed as

    magic "FPMS" | version u8 | kind u8 | reserved u16 | meta_len u32 | blob_len u32
    | meta (UTF-8 JSON object, at most 64 KiB) | blob (raw bytes) | crc32 u32

``meta`` carries scalars only (ids, counts, losses, ε); ``blob`` carries the one binary field
(a codec payload, or noisy histograms as little-endian float64). :func:`decode_message`
checks the frame, the declared lengths against the bytes actually present, the checksum and
every field's type *before* building anything; a message it refuses raises
:class:`MessageError` naming the site it was attributed to.

**Evaluation replies are noisy histograms only** (:class:`EvaluateReply`, protocol version 2):
per label, a histogram of predicted probabilities in ``bins`` equal bins (default
:data:`HISTOGRAM_BINS`; 0.5 is a bin edge) in which each test patient weighs 1 (``1/r`` per
record), plus Gaussian noise of standard deviation ``noise`` per cell from the site's own
randomness (:mod:`fl_core.privacy.release`). The cells are floats, possibly negative: the
coordinator computes count, confusion at 0.5, accuracy, loss (bin centres) and AUC from them
(:func:`fl_core.privacy.release.histogram_figures`, post-processing). Version 1's exact loss
sum, count and confusion, and its 4096 exact bins in which most test patients sat alone (their
label readable by whoever knew their features), are gone.

**Membership-audit replies are noisy histograms too** (:class:`AuditReply`, the answer to an
:class:`AuditInstruction` in sites mode, protocol version 3): for the one attack a site runs,
:data:`AUDIT_ATTACKS` ``= ("loss_threshold",)``, and each population (the site's members, its
non-members) a histogram of the attack's score mapped to ``[0, 1]`` by a fixed monotone map
(:mod:`fl_core.audit.federated`), in ``bins`` equal bins, one unit per patient, plus Gaussian
noise ``noise`` per cell. The populations' sizes (``members``, ``non_members``) are site
sizes, public by declaration. A patient's loss-threshold score depends on the model and that
patient only, so the histogram's sensitivity is 1. Version 2 also carried a site-local LiRA
row whose shadows trained on the site's own patients (one patient moved every other
patient's score: no bounded sensitivity, not releasable under DP); version 3 has no LiRA row
and its :class:`AuditInstruction` asks for no shadow model.

**Train loss** (:class:`FitReply`) is ``None`` when the site trains with DP-SGD: a loss
computed without noise is not released.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from fl_core.codec.framing import CRC, crc_intact, seal
from fl_core.privacy.randomness import RandomSource
from fl_core.privacy.release import (
    EvaluationRelease,
    HistogramFigures,
    evaluation_histogram,
    gaussian_release,
    histogram_figures,
    unit_bins,
)

MAGIC = b"FPMS"
PROTOCOL_VERSION = 3  # 2: noisy float histograms, no exact evaluation, optional train loss;
#                       3: the audit releases the loss-threshold attack only (no site LiRA)
FRAME = struct.Struct("<4sBBHII")
MAX_META_BYTES = 64 * 1024
HISTOGRAM_BINS = 4  # per label (privacy.evaluation_bins); even, so that 0.5 is a bin edge
AUDIT_BINS = 8  # privacy.audit_bins
AUDIT_ATTACKS = ("loss_threshold",)  # the histograms' first axis: sensitivity 1 per patient
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
    num_patients: int  # a site size: public by declaration (docs/privacy.md)
    train_loss: float | None  # None: trained with DP-SGD, the exact loss is not released
    epsilon: float | None  # DP-SGD ε spent so far by this site (None: not private)
    dp_steps: int


@dataclass(frozen=True)
class EvaluateReply:
    """Site → coordinator: the global model on the site's held-out patients, as a noisy
    histogram.

    ``histogram`` is ``[2, bins]`` float64: per label (row 0: label 0, row 1: label 1), the
    test patients' weight by predicted probability (bin ``b`` holds ``[b/bins, (b+1)/bins)``,
    1.0 in the last; each patient weighs 1 in total), plus ``N(0, noise²)`` per cell. The
    figures (:meth:`figures`) are computed from it.
    """

    KIND: ClassVar[int] = 3
    site: str
    round: int
    noise: float
    histogram: torch.Tensor

    def __post_init__(self) -> None:
        problem = histogram_problem(self.histogram, (2,), self.noise)
        if problem:
            raise MessageError(problem, self.site)

    @classmethod
    def from_logits(cls, site: str, round_idx: int, logits: torch.Tensor,
                    labels: torch.Tensor, patients: torch.Tensor, *,
                    release: EvaluationRelease, random: RandomSource | None
                    ) -> EvaluateReply:
        """The only evaluation a site sends: its patients' noisy histogram
        (:func:`fl_core.privacy.release.evaluation_histogram`)."""
        histogram = evaluation_histogram(logits, labels, patients, release, random)
        return cls(site, round_idx, float(release.noise), histogram)

    def figures(self) -> HistogramFigures:
        """Count, confusion at 0.5, accuracy and loss sum from the (clamped) histogram."""
        return histogram_figures(self.histogram)

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
    """Coordinator → site: audit this (dense) final model on your own patients with the
    loss-threshold attack. No shadow model trains at a site: shadows trained on the site's
    own patients would make every patient's score depend on every other patient, and such a
    histogram cannot be released under DP (docs/privacy.md)."""

    KIND: ClassVar[int] = 6
    site: str
    round: int
    model: bytes  # a dense codec payload, as EvaluateInstruction carries


@dataclass(frozen=True)
class AuditReply:
    """Site → coordinator: the membership attacks' scores on the site's patients, as noisy
    histograms.

    ``histograms[a, p, b]`` is the number of patients of population ``p`` (0: the ``members``
    training patients, 1: the ``non_members`` held-out patients) whose score under attack
    ``AUDIT_ATTACKS[a]``, mapped to ``[0, 1]``, falls in bin ``b`` (``[b/bins,
    (b+1)/bins)``, 1.0 in the last), plus ``N(0, noise²)`` (float64). The population sizes
    are site sizes (public by declaration). Its size depends on ``bins`` only.
    """

    KIND: ClassVar[int] = 7
    site: str
    round: int
    members: int
    non_members: int
    noise: float
    histograms: torch.Tensor  # float64 [len(AUDIT_ATTACKS), 2, bins]

    def __post_init__(self) -> None:
        problem = audit_histogram_problem(self.histograms, self.members, self.non_members,
                                          self.noise)
        if problem:
            raise MessageError(problem, self.site)

    @classmethod
    def from_unit_scores(
        cls, site: str, round_idx: int, scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
        *, bins: int = AUDIT_BINS, noise: float, random: RandomSource | None,
    ) -> AuditReply:
        """Histogram per-patient scores already in ``[0, 1]`` (one unit per patient) and add
        the noise: ``scores[attack]`` is (members' scores, non-members' scores) for every
        attack of :data:`AUDIT_ATTACKS`."""
        if set(scores) != set(AUDIT_ATTACKS):
            raise ValueError(f"scores for {sorted(scores)}, expected {list(AUDIT_ATTACKS)}")
        rows = []
        for attack in AUDIT_ATTACKS:
            rows.append(torch.stack([unit_histogram(u, bins) for u in scores[attack]]))
        members, non_members = (int(t.numel()) for t in scores[AUDIT_ATTACKS[0]])
        noisy = gaussian_release(torch.stack(rows), noise, random)
        return cls(site, round_idx, members, non_members, float(noise), noisy)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AuditReply) and _scalars(self) == _scalars(other)
                and torch.equal(self.histograms, other.histograms))

    __hash__ = None  # type: ignore[assignment]


def unit_histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``values`` in ``[0, 1]`` over ``bins`` equal bins (1.0 in the last), as
    float64."""
    return torch.bincount(unit_bins(values, bins), minlength=bins).to(torch.float64)


def histogram_problem(histogram: torch.Tensor, lead: tuple[int, ...], noise: float) -> str:
    """Why ``histogram`` is not a valid noisy histogram of shape ``(*lead, bins)`` released
    at ``noise`` ("" when it is)."""
    shape = tuple(histogram.shape)
    if len(shape) != len(lead) + 1 or shape[:-1] != lead or not 1 <= shape[-1] <= MAX_BINS:
        return f"histogram of shape {shape}, expected {(*lead, 'bins')}"
    if histogram.dtype != torch.float64:
        return f"histogram of dtype {histogram.dtype}, expected float64"
    if not bool(torch.isfinite(histogram).all()):
        return "histogram holds a non-finite value"
    if isinstance(noise, bool) or not isinstance(noise, float | int) or not (
            math.isfinite(noise) and noise >= 0):
        return f"noise={noise!r}: a finite σ ≥ 0"
    if noise == 0 and bool((histogram < 0).any()):
        return "an exact histogram (noise 0) holds a negative count"
    return ""


def audit_histogram_problem(histograms: torch.Tensor, members: int, non_members: int,
                            noise: float) -> str:
    """Why ``histograms`` is not a valid :class:`AuditReply` payload ("" when it is)."""
    problem = histogram_problem(histograms, (len(AUDIT_ATTACKS), 2), noise)
    if problem:
        return "audit " + problem
    if members < 0 or non_members < 0:
        return f"negative population size (members {members}, non-members {non_members})"
    if noise == 0:  # exact: each population's histogram holds its patients, once
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
    # the head of the site's hash-chained ledger (SHA-256 hex; "" when not reported): the
    # coordinator records it, so a ledger reset at the site is visible in the run's record
    ledger_head: str = ""


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
    "num_patients": (int,), "dp_steps": (int,), "count": (int,),
    "epsilon": (float, int, type(None)),
    "passed": (bool,), "validation": (str,), "ledger_run_id": (str,),
    "budget_left": (float, int), "ledger_head": (str,),
    "noise": (float, int), "train_loss": (float, int, type(None)),
}


def _scalars(message: Message) -> dict[str, Any]:
    blob = _BLOB_FIELD.get(type(message))
    return {f.name: getattr(message, f.name) for f in fields(message) if f.name != blob}


def _blob(message: Message, meta: dict[str, Any]) -> bytes:
    """The message's binary field as bytes (histograms: declaring ``bins`` in ``meta``)."""
    if isinstance(message, EvaluateReply | AuditReply):
        histogram = message.histogram if isinstance(message, EvaluateReply) \
            else message.histograms
        meta["bins"] = int(histogram.shape[-1])
        return bytes(histogram.to(torch.float64).contiguous().numpy().astype("<f8").tobytes())
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


def _histogram_from_blob(blob: bytes, lead: tuple[int, ...], bins: int, site: str | None,
                         what: str) -> torch.Tensor:
    cells = math.prod(lead) * bins if 1 <= bins <= MAX_BINS else -1
    if cells < 0 or len(blob) != cells * 8:
        raise MessageError(f"{what} of {len(blob)} bytes do not hold "
                           f"{' × '.join(map(str, lead))} × {bins} float64 cells", site)
    return torch.frombuffer(bytearray(blob), dtype=torch.float64).view(*lead, bins)


def _build_audit_reply(meta: dict[str, Any], blob: bytes, site: str | None) -> AuditReply:
    bins = meta.pop("bins")
    histograms = _histogram_from_blob(blob, (len(AUDIT_ATTACKS), 2), bins, site,
                                      "audit histograms")
    _check_finite(meta, site)
    problem = audit_histogram_problem(histograms, meta["members"], meta["non_members"],
                                      meta["noise"])
    if problem:
        raise MessageError(problem, site)
    return AuditReply(histograms=histograms, **meta)


def _build_evaluate_reply(meta: dict[str, Any], blob: bytes, site: str | None) -> EvaluateReply:
    bins = meta.pop("bins")
    histogram = _histogram_from_blob(blob, (2,), bins, site, "histogram")
    _check_finite(meta, site)
    problem = histogram_problem(histogram, (2,), meta["noise"])
    if problem:
        raise MessageError(problem, site)
    return EvaluateReply(histogram=histogram, **meta)


def _build(cls: type, meta: dict[str, Any], blob: bytes, site: str | None) -> Message:
    if cls is AuditReply:
        return _build_audit_reply(meta, blob, site)
    if cls is EvaluateReply:
        return _build_evaluate_reply(meta, blob, site)
    if cls in _BLOB_FIELD:
        meta[_BLOB_FIELD[cls]] = blob
    elif blob:
        raise MessageError(f"{cls.__name__} carries no binary field", site)
    _check_finite(meta, site)
    return cls(**meta)


def _check_finite(meta: dict[str, Any], site: str | None) -> None:
    for name in ("train_loss", "epsilon", "budget_left", "noise"):
        value = meta.get(name)
        if isinstance(value, float) and math.isinf(value):
            raise MessageError(f"field {name!r} is infinite", site)
        if name in meta and isinstance(value, int):
            meta[name] = float(value)
