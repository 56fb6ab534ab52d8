"""The dense float32 codec (the uncompressed baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fl_core.codec.framing import (
    CODEC_DENSE,
    FRAME_BYTES,
    PayloadError,
    _flat32,
    check_finite,
    frame,
    unframe,
)


@dataclass(frozen=True)
class DenseCodec:
    """Uncompressed float32: 4 bytes per element plus a 16-byte frame. The baseline.

    Stateless, so one dense codec equals another (a site's client compares alike wherever it
    is built: tests/adapters/test_dp_audit_sites.py)."""

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
