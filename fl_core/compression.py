"""Wire codecs: how a tensor becomes the bytes that cross between client and server.

Every payload is self-describing and checks its own integrity::

    magic "FPRV" (4) | version u8 | codec u8 | reserved u16 | n_elements u32 | body | crc32 u32

The CRC-32 covers everything before it, so truncation, bit flips and a wrong version are all
refused with a :class:`PayloadError` before any value is used. :func:`decode_payload` reads
any fedpriv payload, whichever codec wrote it: the codecs are registered by name in
:data:`CODECS`, and the decoder for each header id is derived from that registry.

Codecs
------
:class:`DenseCodec`
    float32 values, ``16 + 4·n`` bytes: the baseline every ratio is measured against.
:class:`TopKQuantizer`
    keeps the ``k = max(1, round(ratio·n))`` largest-magnitude coordinates and quantizes them
    to ``b`` bits. Its body (little-endian)::

        bits u8 | index coding u8 | rice parameter r u8 | ndim u8 | k u32 | chunk u32
        | dims u32 × ndim | scales f32 × ceil(k / chunk) | index block | value block

    *Values*: signed symmetric quantization with ``L = 2^(b-1) − 1`` levels each side. Chunk
    ``c`` of kept values (in index order) has scale ``s_c = max|v| / L`` and stores
    ``q = round(v / s_c) + L`` in ``b`` bits, so ``|v − q·s_c| ≤ s_c / 2`` (``< s_c`` with
    stochastic rounding). Value block: ``ceil(k·b / 8)`` bytes.

    *Indices*: the smaller of two codings is chosen per message.
    Bitmap: ``ceil(n / 8)`` bytes, one bit per coordinate. Rice: the gaps
    ``g_i = idx_i − idx_{i−1} − 1`` (with ``idx_{−1} = −1``) are split into a quotient
    ``g >> r``, written in unary (that many 0-bits, then a 1-bit) into one bit stream, and the
    low ``r`` bits, written at fixed width into a second; the unary stream takes
    ``ceil((k + Σ g>>r) / 8)`` bytes and the remainder stream ``ceil(k·r / 8)``. Keeping the
    two streams apart lets both be written and read with vectorised operations. For a support
    of density ``p`` the gaps are close to geometric, for which Rice coding with the best
    ``r`` is within a few percent of the entropy bound ``H(p)/p`` bits per index.

    Total length: ``16 + 4 + 12 + 4·ndim + 4·ceil(k/chunk) + index block + ceil(k·b/8)``
    (the first 20 bytes are the frame); :func:`topk_payload_size` computes it.

Client side
-----------
:class:`ErrorFeedback` wraps any codec and keeps, as the residual added to the next update,
exactly what the server will not reconstruct (Seide et al. 2014; Karimireddy et al. 2019), with
optional momentum correction and factor masking (Lin et al., Deep Gradient Compression, 2018).
:func:`warmup_density` gives DGC's exponential density warm-up. :class:`ModelBroadcast` and
:class:`ModelReplica` are the two ends of the downlink: the full model first, then
(optionally compressed) deltas that keep every client's copy in step with the server's.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import torch

MAGIC = b"FPRV"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
CRC = struct.Struct("<I")
CODEC_DENSE = 0
CODEC_TOPK = 1
FRAME_BYTES = HEADER.size + CRC.size

TOPK_HEAD = struct.Struct("<BBBBII")
INDEX_BITMAP = 0
INDEX_RICE = 1
MAX_RICE_PARAMETER = 31


class PayloadError(ValueError):
    """A payload is corrupted, truncated, of another version or of another codec."""


class Codec(Protocol):
    codec_id: ClassVar[int]  # written in every payload's header

    def encode(self, tensor: torch.Tensor) -> bytes: ...

    def decode(self, payload: bytes, expected_elements: int | None = None) -> torch.Tensor: ...


def check_finite(tensor: torch.Tensor, what: str = "update") -> None:
    """Refuse NaN/Inf before it is encoded: a non-finite update is a client bug, not data."""
    if tensor.numel() == 0:
        return
    # max and min propagate NaN and show ±Inf: two cheap passes instead of a boolean mask
    if not (math.isfinite(float(tensor.max())) and math.isfinite(float(tensor.min()))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} has {bad} non-finite value(s) (NaN or Inf); refusing to send it")


def frame(codec_id: int, n_elements: int, body: bytes) -> bytes:
    """Wrap ``body`` in the header and CRC trailer."""
    head = HEADER.pack(MAGIC, VERSION, codec_id, 0, n_elements)
    data = head + body
    return data + CRC.pack(zlib.crc32(data))


def read_header(payload: bytes) -> tuple[int, int, memoryview]:
    """Check magic, version and CRC; return (codec id, n_elements, body)."""
    if len(payload) < FRAME_BYTES:
        raise PayloadError(f"payload truncated: {len(payload)} bytes, header alone needs "
                           f"{FRAME_BYTES}")
    view = memoryview(payload)
    magic, version, codec, _, n = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a fedpriv payload")
    if version != VERSION:
        raise PayloadError(f"payload version {version}, this build reads version {VERSION}")
    (crc,) = CRC.unpack_from(view, len(payload) - CRC.size)
    if zlib.crc32(view[: len(payload) - CRC.size]) != crc:
        raise PayloadError("payload checksum mismatch: corrupted or truncated in transit")
    return codec, n, view[HEADER.size : len(payload) - CRC.size]


def check_elements(n: int, expected_elements: int | None) -> None:
    """Refuse a declared size other than the model's *before* anything is allocated: a
    36-byte top-k payload can declare 4·10^9 elements (k = 0 is a valid all-zero update)."""
    if expected_elements is not None and n != expected_elements:
        raise PayloadError(f"payload declares {n} elements, the model has {expected_elements}")


def unframe(
    payload: bytes, codec_id: int, expected_elements: int | None = None
) -> tuple[int, memoryview]:
    """Check header and CRC, that ``codec_id`` wrote it and (if given) its declared size;
    return (n_elements, body)."""
    codec, n, body = read_header(payload)
    if codec != codec_id:
        raise PayloadError(f"payload was written by codec {codec}, decoder expects {codec_id}")
    check_elements(n, expected_elements)
    return n, body


def _flat32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).to(torch.float32).contiguous()


class DenseCodec:
    """Uncompressed float32: 4 bytes per element plus a 16-byte frame. The baseline."""

    codec_id: ClassVar[int] = CODEC_DENSE

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = _flat32(tensor)
        check_finite(flat)
        return frame(CODEC_DENSE, flat.numel(), flat.numpy().tobytes())

    def decode(self, payload: bytes, expected_elements: int | None = None) -> torch.Tensor:
        n, body = unframe(payload, CODEC_DENSE, expected_elements)
        if len(body) != 4 * n:
            raise PayloadError(f"dense body has {len(body)} bytes, header says {n} float32")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        return torch.frombuffer(bytearray(body), dtype=torch.float32).clone()


def dense_size(n_elements: int) -> int:
    """Bytes of the uncompressed payload of ``n_elements`` floats (the compression baseline)."""
    return FRAME_BYTES + 4 * n_elements


# ---------------------------------------------------------------------------------------------
# bit packing (vectorised; numpy because torch has no packbits)


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Unsigned ``values`` at ``width`` bits each, most significant bit first."""
    if width == 0 or values.size == 0:
        return b""
    if width == 8:
        return values.astype(np.uint8).tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack_fixed(block: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed`: ``count`` unsigned integers of ``width`` bits (int64)."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    raw = np.frombuffer(block, dtype=np.uint8)
    if width == 8:
        return raw[:count].astype(np.int64)
    bits = np.unpackbits(raw, count=count * width).reshape(count, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))


def _rice_cost_bits(gaps: np.ndarray, r: int) -> int:
    return int((gaps >> r).sum()) + gaps.size * (r + 1)


def best_rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter with the fewest bits for these gaps (searched near log2 of the mean)."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    centre = int(math.floor(math.log2(mean + 1.0)))
    candidates = range(max(0, centre - 2), min(MAX_RICE_PARAMETER, centre + 2) + 1)
    return min(candidates, key=lambda r: _rice_cost_bits(gaps, r))


def rice_encode(gaps: np.ndarray, r: int) -> tuple[bytes, bytes]:
    """(unary stream, remainder stream) of the gaps, as documented in the module docstring."""
    quotients = gaps >> r
    ones_at = np.cumsum(quotients + 1) - 1
    unary = np.zeros(int(ones_at[-1]) + 1 if gaps.size else 0, dtype=np.uint8)
    unary[ones_at] = 1
    remainders = gaps & ((1 << r) - 1)
    return np.packbits(unary).tobytes(), pack_fixed(remainders, r)


def rice_decode(unary: memoryview, remainders: memoryview, count: int, r: int) -> np.ndarray:
    """Gaps from the two Rice streams; :class:`PayloadError` if they do not hold ``count``."""
    ones_at = np.flatnonzero(np.unpackbits(np.frombuffer(unary, dtype=np.uint8)))
    if ones_at.size != count:
        raise PayloadError(f"index stream holds {ones_at.size} entries, header says {count}")
    # the stream ends in the byte of its last 1-bit: padding bytes would let a forged body
    # shift the value block by a byte and still decode
    needed = (int(ones_at[-1]) + 8) // 8 if count else 0
    if len(unary) != needed:
        raise PayloadError(f"index stream has {len(unary)} bytes, its {count} entries need "
                           f"{needed}")
    quotients = np.diff(ones_at, prepend=-1) - 1
    return (quotients << r) | unpack_fixed(remainders, count, r)


def topk_payload_size(n: int, k: int, bits: int, chunk: int, index_bytes: int,
                      ndim: int = 1) -> int:
    """Documented length of a :class:`TopKQuantizer` payload (frame included)."""
    n_scales = math.ceil(k / chunk) if chunk else int(k > 0)
    return (FRAME_BYTES + TOPK_HEAD.size + 4 * ndim + 4 * n_scales + index_bytes
            + math.ceil(k * bits / 8))


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """``g_i = idx_i − idx_{i−1} − 1`` with ``idx_{−1} = −1``: zero for adjacent indices."""
    return np.diff(indices, prepend=-1) - 1


def rice_block_bytes(gaps: np.ndarray, r: int) -> int:
    """Bytes of the Rice index block (unary stream + remainder stream) for ``gaps``."""
    return math.ceil((int((gaps >> r).sum()) + gaps.size) / 8) + math.ceil(gaps.size * r / 8)


def top_k_indices(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest entries; ties at the threshold go to lower indices."""
    n = magnitude.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(magnitude, n - k)[n - k]
    above = np.flatnonzero(magnitude > threshold)
    if above.size == k:
        return above
    tied = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.insert(above, np.searchsorted(above, tied), tied)


@dataclass
class TopKQuantizer:
    """Top-k sparsification with ``bits``-bit quantization of the kept values.

    ``ratio`` is the density ``k / n``; ``chunk_size`` kept values share a scale (0 = one scale
    for the whole tensor); ``stochastic`` rounds up with probability equal to the fractional
    part, which makes the quantizer unbiased at twice the worst-case error.
    """

    codec_id: ClassVar[int] = CODEC_TOPK
    ratio: float = 0.1
    bits: int = 8
    chunk_size: int = 1024
    stochastic: bool = False
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = per-tensor scale), got "
                             f"{self.chunk_size}")
        self._generator = torch.Generator().manual_seed(self.seed)

    def generator_state(self) -> torch.Tensor:
        """The stochastic-rounding generator's state (travels in a site's state_dict)."""
        return self._generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    @property
    def levels(self) -> int:
        """``L``: quantized values lie in ``[-L, L]``."""
        return 2 ** (self.bits - 1) - 1

    def with_ratio(self, ratio: float) -> TopKQuantizer:
        """The same quantizer at another density (the warm-up schedule uses this)."""
        return TopKQuantizer(ratio, self.bits, self.chunk_size, self.stochastic, self.seed)

    def kept(self, n: int) -> int:
        return min(n, max(1, round(self.ratio * n))) if n else 0

    def encode(self, tensor: torch.Tensor) -> bytes:
        shape = tuple(tensor.shape) or (1,)
        flat = _flat32(tensor)
        n = flat.numel()
        values_np = flat.numpy()
        magnitude = np.abs(values_np)
        if n and not np.isfinite(magnitude.max()):  # max propagates NaN
            check_finite(flat)
        indices = top_k_indices(magnitude, self.kept(n))
        k = indices.size
        chunk = self.chunk_size if self.chunk_size and self.chunk_size < k else 0
        kept = torch.from_numpy(values_np[indices])
        scales, codes = self._quantize(kept, chunk)

        gaps = gaps_of(indices)
        r = best_rice_parameter(gaps)
        if rice_block_bytes(gaps, r) < math.ceil(n / 8):
            unary, remainders = rice_encode(gaps, r)
            coding, index_block = INDEX_RICE, unary + remainders
        else:
            mask = np.zeros(n, dtype=np.uint8)
            mask[indices] = 1
            coding, index_block, r = INDEX_BITMAP, np.packbits(mask).tobytes(), 0
        body = b"".join((
            TOPK_HEAD.pack(self.bits, coding, r, len(shape), k, chunk),
            struct.pack(f"<{len(shape)}I", *shape),
            scales.numpy().astype("<f4").tobytes(),
            index_block,
            pack_fixed(codes, self.bits),
        ))
        return frame(CODEC_TOPK, n, body)

    def _quantize(self, kept: torch.Tensor, chunk: int) -> tuple[torch.Tensor, np.ndarray]:
        """Per-chunk scales and the unsigned codes ``q + L`` of the kept values."""
        k = kept.numel()
        if k == 0:
            return torch.zeros(0), np.zeros(0, dtype=np.int64)
        size = chunk or k
        n_chunks = math.ceil(k / size)
        padded = torch.zeros(n_chunks * size)
        padded[:k] = kept
        scales = padded.view(n_chunks, size).abs().amax(dim=1) / self.levels
        per_value = scales.repeat_interleave(size)[:k]
        ratio = torch.where(per_value > 0, kept / torch.where(per_value > 0, per_value, 1.0), 0.0)
        if self.stochastic:
            q = torch.floor(ratio + torch.rand(k, generator=self._generator))
        else:
            q = torch.round(ratio)
        q = q.clamp(-self.levels, self.levels).to(torch.int64) + self.levels
        return scales, q.numpy()

    def decode(self, payload: bytes, expected_elements: int | None = None) -> torch.Tensor:
        """The dense tensor; with ``expected_elements`` a payload declaring another size is
        refused before the dense tensor is allocated."""
        n, indices, values, shape = self.decode_sparse(payload, expected_elements)
        out = torch.zeros(n, dtype=torch.float32)
        out[torch.from_numpy(indices)] = values
        return out.reshape(shape) if len(shape) > 1 else out

    def decode_sparse(
        self, payload: bytes, expected_elements: int | None = None
    ) -> tuple[int, np.ndarray, torch.Tensor, tuple[int, ...]]:
        """(n, sorted kept indices, dequantized values, shape) without densifying."""
        n, body = unframe(payload, CODEC_TOPK, expected_elements)
        if len(body) < TOPK_HEAD.size:
            raise PayloadError("top-k body shorter than its header")
        bits, coding, r, ndim, k, chunk = TOPK_HEAD.unpack_from(body)
        if not 2 <= bits <= 8 or coding not in (INDEX_BITMAP, INDEX_RICE) or r > MAX_RICE_PARAMETER:
            raise PayloadError(f"unknown top-k layout (bits={bits}, coding={coding}, rice={r})")
        if k > n:
            raise PayloadError(f"payload keeps {k} of {n} elements")
        pos = TOPK_HEAD.size
        shape = struct.unpack_from(f"<{ndim}I", body, pos) if len(body) >= pos + 4 * ndim else ()
        if len(shape) != ndim or math.prod(shape) != n:
            raise PayloadError(f"shape {shape} does not hold {n} elements")
        pos += 4 * ndim
        n_scales = math.ceil(k / chunk) if chunk else int(k > 0)
        value_bytes = math.ceil(k * bits / 8)
        index_bytes = len(body) - pos - 4 * n_scales - value_bytes
        if index_bytes < 0:
            raise PayloadError("top-k body too short for its scales and values")
        scales = np.frombuffer(body, dtype="<f4", count=n_scales, offset=pos).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("top-k scales are negative or not finite")
        pos += 4 * n_scales
        index_block = body[pos : pos + index_bytes]
        value_block = body[pos + index_bytes :]
        if coding == INDEX_BITMAP:
            if index_bytes != math.ceil(n / 8):
                raise PayloadError(f"bitmap has {index_bytes} bytes, {n} elements need "
                                   f"{math.ceil(n / 8)}")
            mask = np.unpackbits(np.frombuffer(index_block, dtype=np.uint8), count=n)
            indices = np.flatnonzero(mask)
            if indices.size != k:
                raise PayloadError(f"bitmap marks {indices.size} elements, header says {k}")
        else:
            remainder_bytes = math.ceil(k * r / 8)
            if index_bytes < remainder_bytes:
                raise PayloadError("Rice index block shorter than its remainder stream")
            unary_bytes = index_bytes - remainder_bytes
            gaps = rice_decode(index_block[:unary_bytes], index_block[unary_bytes:], k, r)
            indices = np.cumsum(gaps + 1) - 1
            if k and indices[-1] >= n:
                raise PayloadError(f"index {int(indices[-1])} out of range for {n} elements")
        codes = torch.from_numpy(unpack_fixed(value_block, k, bits))
        levels = 2 ** (bits - 1) - 1
        if k and int(codes.max()) > 2 * levels:
            raise PayloadError(f"quantized value out of range for {bits} bits")
        per_value = torch.from_numpy(scales).repeat_interleave(chunk or k)[:k] if k else \
            torch.zeros(0)
        values = (codes - levels).to(torch.float32) * per_value
        return n, indices.astype(np.int64), values, tuple(shape)


CODECS: dict[str, type[DenseCodec] | type[TopKQuantizer]] = {
    "dense": DenseCodec,
    "topk": TopKQuantizer,
}
"""Codec name → class; each class's ``codec_id`` is the byte its payloads carry."""

# the decoder table is derived from the registry: a new codec is readable once registered
_DECODERS: dict[int, Codec] = {cls.codec_id: cls() for cls in CODECS.values()}
if len(_DECODERS) != len(CODECS):
    raise RuntimeError("two registered codecs share a codec id")


def decode_payload(payload: bytes, expected_elements: int | None = None) -> torch.Tensor:
    """Decode a payload written by any fedpriv codec (the codec id is in its header).

    Whoever knows the model's size passes it as ``expected_elements``: the declared size is
    checked against it before any allocation. Anything but ``bytes`` is refused too.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise PayloadError(f"payload is a {type(payload).__name__}, not bytes")
    codec, n, _ = read_header(payload)
    if codec not in _DECODERS:
        raise PayloadError(f"payload written by unknown codec {codec}")
    check_elements(n, expected_elements)
    return _DECODERS[codec].decode(payload, expected_elements).reshape(-1)


def is_dense(payload: bytes) -> bool:
    """Whether a (checked) payload carries dense float32 values rather than a sparse delta."""
    return read_header(payload)[0] == CODEC_DENSE


# ---------------------------------------------------------------------------------------------
# client pipeline


class ErrorFeedback:
    """Compress with ``codec``, carrying what it dropped into the next call.

    With momentum ``m`` (momentum correction, DGC): ``u ← m·u + x``; ``a ← e + u``; send
    ``C(a)``; ``e ← a − D(C(a))``; ``u`` is zeroed where a value was sent (factor masking), so
    momentum does not push a coordinate again that was just transmitted. With ``m = 0`` this is
    plain error feedback: ``a ← e + x``. The invariant the tests check: ``e + D(C(a)) == a``.
    """

    def __init__(self, codec: Codec, momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.codec = codec
        self.momentum = momentum
        self.residual: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None

    def compress(self, tensor: torch.Tensor) -> bytes:
        flat = _flat32(tensor)
        check_finite(flat)
        signal = flat
        if self.momentum:
            self.velocity = flat if self.velocity is None else self.momentum * self.velocity + flat
            signal = self.velocity
        accumulated = signal if self.residual is None else self.residual + signal
        payload = self.codec.encode(accumulated)
        reconstructed = self.codec.decode(payload).reshape(-1)
        self.residual = accumulated - reconstructed
        if self.velocity is not None:
            self.velocity = torch.where(reconstructed != 0, 0.0, self.velocity)
        return payload


def warmup_density(ratio: float, round_idx: int, warmup_rounds: int) -> float:
    """DGC's exponential warm-up: density falls from ``ratio^(1/(W+1))`` to ``ratio``.

    Round ``t`` (1-based) of ``W`` warm-up rounds uses ``ratio^(t/(W+1))``; from round
    ``W + 1`` on, ``ratio`` itself. E.g. 1 % over 3 rounds: 31.6 %, 10 %, 3.2 %, then 1 %.
    """
    if warmup_rounds <= 0 or round_idx > warmup_rounds:
        return ratio
    return ratio ** (round_idx / (warmup_rounds + 1))


class UpdateCompressor:
    """The client's uplink: (momentum) → + residual → top-k → b-bit → new residual.

    ``codec`` is the target-density quantizer (or :class:`DenseCodec`); with
    ``warmup_rounds`` the density follows :func:`warmup_density`. Without error feedback the
    dropped coordinates are simply lost, which is what the accuracy table contrasts.
    """

    def __init__(self, codec: Codec, error_feedback: bool = True, momentum: float = 0.0,
                 warmup_rounds: int = 0) -> None:
        self.codec = codec
        self.warmup_rounds = warmup_rounds
        self.feedback = ErrorFeedback(codec, momentum) if error_feedback else None

    def compress(self, update: torch.Tensor, round_idx: int) -> bytes:
        codec = self.codec
        if isinstance(codec, TopKQuantizer) and self.warmup_rounds:
            codec = codec.with_ratio(warmup_density(codec.ratio, round_idx, self.warmup_rounds))
        if self.feedback is None:
            return codec.encode(update)
        self.feedback.codec = codec
        return self.feedback.compress(update)


class ModelBroadcast:
    """Server end of the downlink.

    The first payload is the dense model. With a ``codec``, later payloads are the codec's
    encoding of ``params − replica``, where ``replica`` is what every client holds after
    applying all payloads so far; what a payload drops stays in that difference and goes out
    later (error feedback by construction). Without a codec every payload is the dense model.
    """

    def __init__(self, codec: TopKQuantizer | None = None) -> None:
        self.codec = codec
        self.replica: torch.Tensor | None = None

    def payload(self, params: torch.Tensor) -> bytes:
        params = _flat32(params)
        if self.codec is None or self.replica is None:
            self.replica = params.clone()
            return DenseCodec().encode(params)
        payload = self.codec.encode(params - self.replica)
        self.replica = self.replica + self.codec.decode(payload).reshape(-1)
        return payload


class ModelReplica:
    """Client end of the downlink: a dense payload replaces the copy, a sparse one is added."""

    def __init__(self, num_elements: int | None = None) -> None:
        self.params: torch.Tensor | None = None
        self.num_elements = num_elements  # the model's size: payloads declaring another fail

    def apply(self, payload: bytes) -> torch.Tensor:
        decoded = decode_payload(payload, self.num_elements)
        if is_dense(payload):
            self.params = decoded
        elif self.params is None or self.params.numel() != decoded.numel():
            raise PayloadError("model delta received before the full model")
        else:
            self.params = self.params + decoded
        return self.params
