"""Error feedback around a lossy codec, and the client's update compressor (warm-up density)."""

from __future__ import annotations

import torch

from fl_core.codec.framing import Codec, _flat32, check_finite
from fl_core.codec.topk import TopKQuantizer
from fl_core.config.model import CompressionConfig

_COMPRESSION = CompressionConfig.model_fields  # the defaults' one place: compression.*

# ---------------------------------------------------------------------------------------------
# client pipeline


class ErrorFeedback:
    """Compress with ``codec``, carrying what it dropped into the next call.

    With momentum ``m`` (momentum correction, DGC): ``u ← m·u + x``; ``a ← e + u``; send
    ``C(a)``; ``e ← a − D(C(a))``; ``u`` is zeroed where a value was sent (factor masking), so
    momentum does not push a coordinate again that was just transmitted. With ``m = 0`` this is
    plain error feedback: ``a ← e + x``. The invariant the tests check: ``e + D(C(a)) == a``.
    """

    def __init__(self, codec: Codec, *,
                 momentum: float = _COMPRESSION["momentum"].default) -> None:
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

    def __init__(self, codec: Codec, *,
                 error_feedback: bool = _COMPRESSION["error_feedback"].default,
                 momentum: float = _COMPRESSION["momentum"].default,
                 warmup_rounds: int = _COMPRESSION["warmup_rounds"].default) -> None:
        self.codec = codec
        self.warmup_rounds = warmup_rounds
        self.feedback = ErrorFeedback(codec, momentum=momentum) if error_feedback else None

    def compress(self, update: torch.Tensor, round_idx: int) -> bytes:
        codec = self.codec
        if isinstance(codec, TopKQuantizer) and self.warmup_rounds:
            codec = codec.with_ratio(warmup_density(codec.ratio, round_idx, self.warmup_rounds))
        if self.feedback is None:
            return codec.encode(update)
        self.feedback.codec = codec
        return self.feedback.compress(update)
