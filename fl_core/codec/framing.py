"""The frame every codec payload travels in: magic, version, codec id, element count, CRC32;
checked before anything is allocated.

Both of fedpriv's wire formats, this codec frame and the federation's message frame
(:mod:`fl_core.federation.messages`), are ``magic | version u8 | id u8 | reserved u16 | sizes
| content | crc32 u32``, and both seal and check their trailer here (:func:`seal`,
:func:`crc_intact`). The headers stay each its own: a payload declares one element count and
a message two lengths (metadata, blob), and their refusals differ in kind and in what they
name (a :class:`PayloadError` about a tensor's bytes; a
:class:`~fl_core.federation.messages.MessageError` naming the site it is attributed to, with
the kind and the declared lengths checked before the checksum), so each format reads its own
header and words its own errors.
"""

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


def seal(head: bytes, content: bytes) -> bytes:
    """``head + content`` and the CRC-32 of both: the trailer of both wire formats."""
    data = head + content
    return data + CRC.pack(zlib.crc32(data))


def crc_intact(data: bytes | memoryview) -> bool:
    """Whether the trailing CRC-32 of ``data`` (at least :data:`CRC`'s 4 bytes long) matches
    everything before it."""
    (crc,) = CRC.unpack_from(data, len(data) - CRC.size)
    return zlib.crc32(memoryview(data)[: len(data) - CRC.size]) == crc


def frame(codec_id: int, n_elements: int, body: bytes) -> bytes:
    """Wrap ``body`` in the header and CRC trailer."""
    return seal(HEADER.pack(MAGIC, VERSION, codec_id, 0, n_elements), body)


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
    if not crc_intact(view):
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
