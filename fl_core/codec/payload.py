"""The codec registry (name → class) and the decoder of any fedpriv payload, dispatched by
the codec id in its header."""

from __future__ import annotations

import torch

from fl_core.codec.dense import DenseCodec
from fl_core.codec.framing import CODEC_DENSE, Codec, PayloadError, check_elements, read_header
from fl_core.codec.topk import TopKQuantizer

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
