"""Fixed-width packing and Golomb-Rice coding of index gaps (the top-k codec's index block)."""

from __future__ import annotations

import math

import numpy as np

from fl_core.codec.framing import PayloadError

MAX_RICE_PARAMETER = 31


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


def gaps_of(indices: np.ndarray) -> np.ndarray:
    """``g_i = idx_i − idx_{i−1} − 1`` with ``idx_{−1} = −1``: zero for adjacent indices."""
    return np.diff(indices, prepend=-1) - 1


def rice_block_bytes(gaps: np.ndarray, r: int) -> int:
    """Bytes of the Rice index block (unary stream + remainder stream) for ``gaps``."""
    return math.ceil((int((gaps >> r).sum()) + gaps.size) / 8) + math.ceil(gaps.size * r / 8)
