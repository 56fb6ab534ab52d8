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
    (the first 20 bytes are the frame).

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
from dataclasses import KW_ONLY, dataclass, field
from typing import ClassVar

import numpy as np
import torch

from fl_core.codec.framing import (
    CODEC_TOPK,
    PayloadError,
    _flat32,
    check_finite,
    frame,
    unframe,
)
from fl_core.codec.rice import (
    MAX_RICE_PARAMETER,
    best_rice_parameter,
    gaps_of,
    pack_fixed,
    rice_block_bytes,
    rice_decode,
    rice_encode,
    unpack_fixed,
)
from fl_core.config.model import CompressionConfig

_COMPRESSION = CompressionConfig.model_fields  # the defaults' one place: compression.*

TOPK_HEAD = struct.Struct("<BBBBII")
INDEX_BITMAP = 0
INDEX_RICE = 1


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
    ratio: float = _COMPRESSION["ratio"].default
    bits: int = _COMPRESSION["bits"].default
    _: KW_ONLY
    chunk_size: int = _COMPRESSION["chunk_size"].default
    stochastic: bool = _COMPRESSION["stochastic_rounding"].default
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
        return TopKQuantizer(ratio, self.bits, chunk_size=self.chunk_size,
                             stochastic=self.stochastic, seed=self.seed)

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
        bits, coding, r, k, chunk, shape, pos = _read_topk_head(body, n)
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
        if coding == INDEX_BITMAP:
            indices = _bitmap_indices(index_block, n, k)
        else:
            indices = _rice_indices(index_block, n, k, r)
        values = _dequantize(body[pos + index_bytes :], scales, k, bits, chunk)
        return n, indices.astype(np.int64), values, shape


# The steps of TopKQuantizer.decode_sparse, in the order it checks a payload: the fixed head and
# the shape, then (there) the scales, then the index block in its coding, then the values. Each
# refuses what it reads with a PayloadError before anything is allocated from it.

def _read_topk_head(body: bytes, n: int) -> tuple[int, int, int, int, int, tuple[int, ...], int]:
    """(bits, index coding, rice parameter, k, chunk, shape, offset after the dims)."""
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
    return bits, coding, r, k, chunk, tuple(shape), pos + 4 * ndim


def _bitmap_indices(index_block: bytes, n: int, k: int) -> np.ndarray:
    if len(index_block) != math.ceil(n / 8):
        raise PayloadError(f"bitmap has {len(index_block)} bytes, {n} elements need "
                           f"{math.ceil(n / 8)}")
    mask = np.unpackbits(np.frombuffer(index_block, dtype=np.uint8), count=n)
    indices = np.flatnonzero(mask)
    if indices.size != k:
        raise PayloadError(f"bitmap marks {indices.size} elements, header says {k}")
    return indices


def _rice_indices(index_block: bytes, n: int, k: int, r: int) -> np.ndarray:
    remainder_bytes = math.ceil(k * r / 8)
    if len(index_block) < remainder_bytes:
        raise PayloadError("Rice index block shorter than its remainder stream")
    unary_bytes = len(index_block) - remainder_bytes
    gaps = rice_decode(index_block[:unary_bytes], index_block[unary_bytes:], k, r)
    indices = np.cumsum(gaps + 1) - 1
    if k and indices[-1] >= n:
        raise PayloadError(f"index {int(indices[-1])} out of range for {n} elements")
    return indices


def _dequantize(value_block: bytes, scales: np.ndarray, k: int, bits: int,
                chunk: int) -> torch.Tensor:
    codes = torch.from_numpy(unpack_fixed(value_block, k, bits))
    levels = 2 ** (bits - 1) - 1
    if k and int(codes.max()) > 2 * levels:
        raise PayloadError(f"quantized value out of range for {bits} bits")
    per_value = torch.from_numpy(scales).repeat_interleave(chunk or k)[:k] if k else \
        torch.zeros(0)
    return (codes - levels).to(torch.float32) * per_value
