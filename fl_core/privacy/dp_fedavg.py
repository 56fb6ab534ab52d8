"""Client-level DP-FedAvg: clip each client's update to S, sum, add N(0, (σS)²), divide by
the expected number of clients; a wrapper around a sum-compatible aggregator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fl_core.privacy.accountants import PrivacyError
from fl_core.privacy.randomness import RandomSource
from fl_core.robust.aggregators import (
    AggregationResult,
    Aggregator,
    ConfiguredAggregator,
    make_aggregator,
)

# --- server-side client-level DP ---------------------------------------------------------------


def clip_updates(updates: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each row ``u_k`` scaled to ``u_k · min(1, S/‖u_k‖)``: no client's row exceeds ``S``."""
    norms = updates.norm(dim=1)
    factors = (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
    return updates * factors.unsqueeze(1)


def _noised_mean(total: torch.Tensor, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, random: RandomSource) -> torch.Tensor:
    """``(total + N(0, σ²S² I)) / E[clients]``: one draw of ``total.numel()`` values."""
    noise = random.normal(tuple(total.shape), noise_multiplier * clip_norm, total.dtype)
    return (total + noise) / expected_clients


SUM_COMPATIBLE = frozenset({"fedavg"})
"""Rules DP-FedAvg may wrap: the unweighted rule must be the plain mean of the rows, so that
``n · mean`` is the clipped sum whose sensitivity is ``S``."""


@dataclass(frozen=True, kw_only=True)
class DPFedAvg:
    """Server-side client-level DP as a wrapper around an aggregation strategy (McMahan et al.
    2018; the shape of Flower's server-side fixed-clipping wrapper).

    Called like any :data:`~fl_core.robust.aggregators.Aggregator`, on the ``n`` updates of a
    round::

        c_k  = u_k · min(1, S / ‖u_k‖)                 clip each client to S
        m    = inner(c_1..c_n, weights=None)           the wrapped rule: the plain mean
        out  = (n · m + N(0, σ²S² I)) / E[clients]     = (Σ_k c_k + N(0, σ²S² I)) / E

    ``weights`` are ignored: every client counts once, which is what the sensitivity ``S``
    assumes (a weight would let a large site move the sum by more). Dividing by the expected
    number of clients ``E = q·N`` rather than the realised ``n`` keeps the sensitivity of the
    released mean at ``S/E`` whoever shows up. The inner rule must be in
    :data:`SUM_COMPATIBLE`; anything that selects, trims or reweights clients by their values
    would move the sum by more than ``S`` per client and is refused when the wrapper is built.
    """

    clip_norm: float
    noise_multiplier: float
    expected_clients: float
    random: RandomSource
    inner: Aggregator = field(default_factory=lambda: make_aggregator("fedavg", f=0))

    def __post_init__(self) -> None:
        method = getattr(self.inner, "method", None)
        if not isinstance(self.inner, ConfiguredAggregator) or method not in SUM_COMPATIBLE:
            raise PrivacyError(
                f"server-side DP-FedAvg cannot wrap aggregation.method={method or self.inner!r}:"
                f" its guarantee covers the clipped sum of updates only, which only "
                f"{', '.join(sorted(SUM_COMPATIBLE))} computes; set aggregation.method=fedavg")
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or self.expected_clients <= 0:
            raise PrivacyError(
                f"DP-FedAvg needs clip_norm > 0, noise_multiplier >= 0 and expected_clients > 0,"
                f" got S={self.clip_norm:g}, σ={self.noise_multiplier:g}, "
                f"E={self.expected_clients:g}")

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None,
                 previous: torch.Tensor | None) -> AggregationResult:
        clipped = clip_updates(updates, self.clip_norm)
        mean = self.inner(clipped, None, previous)
        total = mean.aggregate * clipped.shape[0]
        aggregate = _noised_mean(total, self.clip_norm, self.noise_multiplier,
                                 self.expected_clients, self.random)
        return AggregationResult(aggregate, mean.selected)
