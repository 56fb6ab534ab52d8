"""The frame every codec payload travels in: magic, version, codec id, element count, CRC32;
checked before anything is allocated."""

from __future__ import annotations

import math
import struct
import zlib
from typing import ClassVar, Protocol

import torch

MAGIC = b"FPRV"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
CRC = struct.Struct("<I")
CODEC_DENSE = 0
CODEC_TOPK = 1
FRAME_BYTES = HEADER.size + CRC.size


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
