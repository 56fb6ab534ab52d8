"""Wire codecs: how a tensor becomes the bytes that cross between client and server.

Every payload is self-describing and checks its own integrity::

    magic "FPRV" (4) | version u8 | codec u8 | reserved u16 | n_elements u32 | body | crc32 u32

The CRC-32 covers everything before it, so truncation, bit flips and a wrong version are all
refused with a :class:`PayloadError` before any value is used.
"""

from __future__ import annotations

import struct
import zlib
from typing import Protocol

import torch

MAGIC = b"FPRV"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")
CRC = struct.Struct("<I")
CODEC_DENSE = 0


class PayloadError(ValueError):
    """A payload is corrupted, truncated, of another version or of another codec."""


class Codec(Protocol):
    def encode(self, tensor: torch.Tensor) -> bytes: ...

    def decode(self, payload: bytes) -> torch.Tensor: ...


def check_finite(tensor: torch.Tensor, what: str = "update") -> None:
    """Refuse NaN/Inf before it is encoded: a non-finite update is a client bug, not data."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} has {bad} non-finite value(s) (NaN or Inf); refusing to send it")


def frame(codec_id: int, n_elements: int, body: bytes) -> bytes:
    """Wrap ``body`` in the header and CRC trailer."""
    head = HEADER.pack(MAGIC, VERSION, codec_id, 0, n_elements)
    data = head + body
    return data + CRC.pack(zlib.crc32(data))


def unframe(payload: bytes, codec_id: int) -> tuple[int, memoryview]:
    """Check header and CRC; return (n_elements, body)."""
    if len(payload) < HEADER.size + CRC.size:
        raise PayloadError(f"payload truncated: {len(payload)} bytes, header alone needs "
                           f"{HEADER.size + CRC.size}")
    view = memoryview(payload)
    magic, version, codec, _, n = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}: not a fedpriv payload")
    if version != VERSION:
        raise PayloadError(f"payload version {version}, this build reads version {VERSION}")
    (crc,) = CRC.unpack_from(view, len(payload) - CRC.size)
    if zlib.crc32(view[: len(payload) - CRC.size]) != crc:
        raise PayloadError("payload checksum mismatch: corrupted or truncated in transit")
    if codec != codec_id:
        raise PayloadError(f"payload was written by codec {codec}, decoder expects {codec_id}")
    return n, view[HEADER.size : len(payload) - CRC.size]


class DenseCodec:
    """Uncompressed float32: 4 bytes per element plus a 16-byte frame. The baseline."""

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = tensor.detach().reshape(-1).to(torch.float32).contiguous()
        check_finite(flat)
        return frame(CODEC_DENSE, flat.numel(), flat.numpy().tobytes())

    def decode(self, payload: bytes) -> torch.Tensor:
        n, body = unframe(payload, CODEC_DENSE)
        if len(body) != 4 * n:
            raise PayloadError(f"dense body has {len(body)} bytes, header says {n} float32")
        if n == 0:
            return torch.zeros(0, dtype=torch.float32)
        return torch.frombuffer(bytearray(body), dtype=torch.float32).clone()


def dense_size(n_elements: int) -> int:
    """Bytes of the uncompressed payload of ``n_elements`` floats (the compression baseline)."""
    return HEADER.size + 4 * n_elements + CRC.size
