"""The coordinator → client model broadcast (dense or compressed deltas) and the client's
replica."""

from __future__ import annotations

import torch

from fl_core.codec.dense import DenseCodec
from fl_core.codec.framing import PayloadError, _flat32
from fl_core.codec.payload import decode_payload, is_dense
from fl_core.codec.topk import TopKQuantizer


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
