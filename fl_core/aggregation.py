"""Aggregators: small pure functions over a stacked ``[n_clients, n_params]`` update tensor.

Every aggregator returns an :class:`AggregationResult`: the combined update and the clients it
used. ``f`` is the number of Byzantine clients a rule is configured to tolerate;
:func:`check_robustness` says, before a run starts, whether a rule can tolerate ``f`` of ``n``.

Pairwise distances come from one Gram matrix, ``‖u_i − u_j‖² = ‖u_i‖² + ‖u_j‖² − 2⟨u_i, u_j⟩``
(clamped at 0 against rounding), so no ``[n, n, d]`` tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AGGREGATORS = ("fedavg", "multi_krum", "krum", "trimmed_mean", "median", "geometric_median",
               "centered_clipping")


@dataclass(frozen=True)
class AggregationResult:
    """``aggregate`` is the combined update ``[n_params]``; ``selected`` the clients it used."""

    aggregate: torch.Tensor
    selected: list[int]


def _check(updates: torch.Tensor) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be [n_clients, n_params], got {tuple(updates.shape)}")


def _normalised(weights: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=dtype)
    w = torch.as_tensor(weights, dtype=dtype).reshape(-1)
    if w.numel() != n or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError("weights must be n_clients non-negative numbers with a positive sum")
    return w / w.sum()


def fedavg(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Weighted mean ``Σ_i w_i u_i / Σ_i w_i`` (McMahan et al. 2017); uniform when no weights."""
    _check(updates)
    n = updates.shape[0]
    w = _normalised(weights, n, updates.dtype)
    return AggregationResult(aggregate=w @ updates, selected=list(range(n)))


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` squared Euclidean distances from one Gram matrix (no ``[n, n, d]``)."""
    gram = updates @ updates.T
    sq = torch.diagonal(gram)
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min_(0)


def check_robustness(method: str, n: int, f: int) -> None:
    """Raise ``ValueError`` if ``method`` cannot tolerate ``f`` Byzantine clients of ``n``.

    Krum and Multi-Krum need ``n > 2f + 2`` (Blanchard et al. 2017); trimming ``f`` from each
    end needs ``n > 2f``; the median and geometric median have breakdown point 1/2 (``n > 2f``).
    """
    if f < 0 or n < 1:
        raise ValueError(f"need n >= 1 and f >= 0, got n={n}, f={f}")
    if method in ("multi_krum", "krum") and n <= 2 * f + 2:
        raise ValueError(f"{method} tolerates f Byzantine clients only when n > 2f + 2: "
                         f"n={n}, f={f} needs n >= {2 * f + 3} or f <= {max((n - 3) // 2, 0)}")
    if method in ("trimmed_mean", "median", "geometric_median") and n <= 2 * f:
        raise ValueError(f"{method} needs a majority of honest clients: n={n}, f={f} "
                         f"(f must be <= {(n - 1) // 2})")


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each client: the sum of squared distances to its ``n − f − 2`` nearest."""
    n = sq_dist.shape[0]
    neighbours = max(n - f - 2, 1)
    off_self = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=sq_dist.dtype))
    return torch.topk(off_self, min(neighbours, n - 1), dim=1, largest=False).values.sum(1) \
        if n > 1 else torch.zeros(1, dtype=sq_dist.dtype)


def multi_krum(
    updates: torch.Tensor, f: int, num_selected: int | None = None,
    weights: torch.Tensor | None = None,
) -> AggregationResult:
    """Multi-Krum (Blanchard et al. 2017): average the ``m`` updates with the lowest Krum score.

    ``m`` defaults to ``n − f``; ``m = 1`` is Krum. The average is weighted by ``weights``
    restricted to the selected clients.
    """
    _check(updates)
    n = updates.shape[0]
    check_robustness("multi_krum", n, f)
    m = n - f if num_selected is None else num_selected
    if not 1 <= m <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {m}")
    scores = krum_scores(pairwise_sq_distances(updates), f)
    chosen = torch.topk(scores, m, largest=False).indices.sort().values
    w = _normalised(None if weights is None else torch.as_tensor(weights)[chosen], m,
                    updates.dtype)
    # a weight vector over all rows instead of updates[chosen]: no copy of the selected rows
    full = torch.zeros(n, dtype=updates.dtype).index_copy_(0, chosen, w)
    return AggregationResult(full @ updates, chosen.tolist())


def krum(updates: torch.Tensor, f: int) -> AggregationResult:
    """Krum: the single update with the lowest score."""
    return multi_krum(updates, f, num_selected=1)


def trimmed_mean(updates: torch.Tensor, f: int) -> AggregationResult:
    """Coordinate-wise mean after dropping the ``f`` largest and ``f`` smallest values."""
    _check(updates)
    n = updates.shape[0]
    check_robustness("trimmed_mean", n, f)
    kept = torch.sort(updates, dim=0).values[f : n - f]
    return AggregationResult(kept.mean(0), list(range(n)))


def coordinate_median(updates: torch.Tensor) -> AggregationResult:
    """Coordinate-wise median; the mean of the two middle values when ``n`` is even."""
    _check(updates)
    n = updates.shape[0]
    ordered = torch.sort(updates, dim=0).values
    middle = ordered[(n - 1) // 2 : n // 2 + 1]
    return AggregationResult(middle.mean(0), list(range(n)))


def geometric_median(
    updates: torch.Tensor, weights: torch.Tensor | None = None, eps: float = 1e-6,
    max_iter: int = 100, tol: float = 1e-7,
) -> AggregationResult:
    """Smoothed Weiszfeld (Pillutla et al., RFA 2022): ``argmin_z Σ_i α_i max(ε, ‖u_i − z‖)``.

    Each step ``z ← Σ_i β_i u_i / Σ_i β_i`` with ``β_i = α_i / max(ε, ‖u_i − z‖)``; stops when
    the objective improves by less than ``tol`` relative.
    """
    _check(updates)
    n = updates.shape[0]
    alpha = _normalised(weights, n, updates.dtype)
    z = alpha @ updates
    objective = float("inf")
    for _ in range(max_iter):
        dist = torch.cdist(updates, z[None, :]).squeeze(1).clamp_min(eps)
        new_objective = float((alpha * dist).sum())
        if objective - new_objective <= tol * max(new_objective, eps):
            break
        objective = new_objective
        beta = alpha / dist
        z = (beta / beta.sum()) @ updates
    return AggregationResult(z, list(range(n)))


def centered_clipping(
    updates: torch.Tensor, center: torch.Tensor | None = None, tau: float | None = None,
    iterations: int = 3, weights: torch.Tensor | None = None,
) -> AggregationResult:
    """Centered clipping (Karimireddy et al. 2021): ``v ← v + Σ_i α_i clip_τ(u_i − v)``.

    ``center`` is the previous round's aggregate (zero at first); ``clip_τ(x) = x·min(1,
    τ/‖x‖)``. With ``tau=None`` the radius is the median distance of the updates to the centre,
    recomputed each iteration, so it adapts to the scale of honest updates.
    """
    _check(updates)
    n, d = updates.shape
    alpha = _normalised(weights, n, updates.dtype)
    v = torch.zeros(d, dtype=updates.dtype) if center is None else center.to(updates.dtype)
    for _ in range(iterations):
        diff = updates - v
        dist = torch.linalg.vector_norm(diff, dim=1)
        radius = float(dist.median()) if tau is None else tau
        scale = torch.clamp(radius / dist.clamp_min(1e-12), max=1.0)
        v = v + (alpha * scale) @ diff
    return AggregationResult(v, list(range(n)))


def nearest_neighbour_mixing(updates: torch.Tensor, f: int) -> torch.Tensor:
    """NNM (Allouah et al. 2023): replace each update by the mean of its ``n − f`` nearest
    updates (itself included). A pre-aggregation step that makes the rules after it robust to
    attacks that hide inside the honest spread, such as ALIE."""
    _check(updates)
    n = updates.shape[0]
    k = max(n - f, 1)
    nearest = torch.topk(pairwise_sq_distances(updates), k, dim=1, largest=False).indices
    mixing = torch.zeros(n, n, dtype=updates.dtype).scatter_(1, nearest, 1.0 / k)
    return mixing @ updates


def bucketing(updates: torch.Tensor, bucket_size: int, generator: torch.Generator) -> torch.Tensor:
    """Bucketing (Karimireddy et al. 2022): shuffle, then average buckets of ``bucket_size``."""
    _check(updates)
    n = updates.shape[0]
    order = torch.randperm(n, generator=generator)
    buckets = -(-n // bucket_size)
    owner = torch.empty(n, dtype=torch.long)
    owner[order] = torch.arange(n) // bucket_size
    mixing = torch.zeros(buckets, n, dtype=updates.dtype)
    mixing[owner, torch.arange(n)] = 1.0
    return (mixing / mixing.sum(1, keepdim=True)) @ updates


Aggregator = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"],
                      AggregationResult]


def make_aggregator(method: str, f: int) -> Aggregator:
    """``aggregate(updates, weights, previous_aggregate)`` for a configured rule."""
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {method!r}; accepted: {', '.join(AGGREGATORS)}")

    def aggregate(updates: torch.Tensor, weights: torch.Tensor | None,
                  previous: torch.Tensor | None) -> AggregationResult:
        n = updates.shape[0]
        # a round that lost clients tolerates fewer: never more than the rule allows of n
        if method == "fedavg":
            return fedavg(updates, weights)
        if method in ("multi_krum", "krum"):
            fr = min(f, max((n - 3) // 2, 0))
            return multi_krum(updates, fr, 1 if method == "krum" else n - fr, weights)
        if method == "trimmed_mean":
            return trimmed_mean(updates, min(f, (n - 1) // 2))
        if method == "median":
            return coordinate_median(updates)
        if method == "geometric_median":
            return geometric_median(updates, weights)
        return centered_clipping(updates, previous, weights=weights)

    return aggregate
