"""Aggregators: small pure functions over a stacked ``[n_clients, n_params]`` update tensor.

Every aggregator returns an :class:`AggregationResult`: the combined update and the clients it
used. ``f`` is the number of Byzantine clients a rule is configured to tolerate;
:func:`check_robustness` says, before a run starts, whether a rule can tolerate ``f`` of ``n``.

Configured rules are chosen by name: :data:`AGGREGATORS` (``aggregation.method``) maps a name to
a rule ``(updates, weights, previous, f) → AggregationResult`` and :func:`make_aggregator` binds
``f``; :data:`PRE_AGGREGATIONS` (``aggregation.pre_aggregation``) maps a name to the mixing step
that runs before the rule (:func:`make_pre_aggregation`).

Pairwise distances come from one Gram matrix, ``‖u_i − u_j‖² = ‖u_i‖² + ‖u_j‖² − 2⟨u_i, u_j⟩``
(clamped at 0 against rounding), so no ``[n, n, d]`` tensor is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fl_core.registry import lookup


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
    the objective improves by less than ``tol`` relative. When the minimiser is one of the
    updates (e.g. two clients sent the same one), Weiszfeld only creeps towards it, so the
    update nearest the last iterate is tried too and the better of the two returned.
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
    nearest = updates[int(torch.cdist(updates, z[None, :]).argmin())]

    def weighted_distance(point: torch.Tensor) -> float:
        return float((alpha * torch.cdist(updates, point[None, :]).squeeze(1)).sum())

    # strictly better only: where the objective is flat (several minimisers) floating-point
    # noise must not pick a different point for a reordering of the same updates
    if weighted_distance(nearest) < weighted_distance(z) * (1 - 1e-9):
        z = nearest.clone()
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
"""``aggregate(updates, weights, previous_aggregate)``: what the server's defense calls."""

Rule = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", int],
                AggregationResult]
"""``rule(updates, weights, previous_aggregate, f)``: a registered aggregation rule."""

PreAggregation = Callable[[torch.Tensor], torch.Tensor]


def _tolerable_krum(n: int, f: int) -> int:
    # a round that lost clients tolerates fewer: never more than the rule allows of n
    return min(f, max((n - 3) // 2, 0))


def _fedavg_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
                 f: int) -> AggregationResult:
    return fedavg(u, w)


def _multi_krum_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
                     f: int) -> AggregationResult:
    fr = _tolerable_krum(u.shape[0], f)
    return multi_krum(u, fr, u.shape[0] - fr, w)


def _krum_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
               f: int) -> AggregationResult:
    return multi_krum(u, _tolerable_krum(u.shape[0], f), 1, w)


def _trimmed_mean_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
                       f: int) -> AggregationResult:
    return trimmed_mean(u, min(f, (u.shape[0] - 1) // 2))


def _median_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
                 f: int) -> AggregationResult:
    return coordinate_median(u)


def _geometric_median_rule(u: torch.Tensor, w: torch.Tensor | None, prev: torch.Tensor | None,
                           f: int) -> AggregationResult:
    return geometric_median(u, w)


def _centered_clipping_rule(u: torch.Tensor, w: torch.Tensor | None,
                            prev: torch.Tensor | None, f: int) -> AggregationResult:
    return centered_clipping(u, prev, weights=w)


AGGREGATORS: dict[str, Rule] = {
    "fedavg": _fedavg_rule,
    "multi_krum": _multi_krum_rule,
    "krum": _krum_rule,
    "trimmed_mean": _trimmed_mean_rule,
    "median": _median_rule,
    "geometric_median": _geometric_median_rule,
    "centered_clipping": _centered_clipping_rule,
}
"""``aggregation.method`` → rule. Weights reach the rules that have them (fedavg, Multi-Krum,
Krum, geometric median, centered clipping); ``f`` is capped at what ``n`` allows each round."""


@dataclass(frozen=True)
class ConfiguredAggregator:
    """A registered rule with its ``f`` bound; called as an :data:`Aggregator`.

    ``method`` stays readable so that a wrapper (server-side DP-FedAvg) can check what it
    wraps.
    """

    method: str
    f: int

    def __post_init__(self) -> None:
        lookup(AGGREGATORS, self.method, "aggregation.method")

    def __call__(self, updates: torch.Tensor, weights: torch.Tensor | None,
                 previous: torch.Tensor | None) -> AggregationResult:
        return AGGREGATORS[self.method](updates, weights, previous, self.f)


def make_aggregator(method: str, *, f: int) -> ConfiguredAggregator:
    """``aggregate(updates, weights, previous_aggregate)`` for the rule registered as
    ``method``, tolerating up to ``f`` Byzantine clients."""
    return ConfiguredAggregator(method, f)


def _no_pre_aggregation(f: int, bucket_size: int, seed: int) -> PreAggregation | None:
    return None


def _nnm(f: int, bucket_size: int, seed: int) -> PreAggregation:
    def mix(u: torch.Tensor) -> torch.Tensor:
        return nearest_neighbour_mixing(u, min(f, u.shape[0] - 1))

    return mix


def _bucketing(f: int, bucket_size: int, seed: int) -> PreAggregation:
    generator = torch.Generator().manual_seed(seed)

    def bucket(u: torch.Tensor) -> torch.Tensor:
        return bucketing(u, bucket_size, generator)

    return bucket


PRE_AGGREGATIONS: dict[str, Callable[[int, int, int], PreAggregation | None]] = {
    "none": _no_pre_aggregation,
    "nnm": _nnm,
    "bucketing": _bucketing,
}
"""``aggregation.pre_aggregation`` → ``factory(f, bucket_size, seed)`` of the mixing step
(``None``: the rule sees the updates as sent). Bucketing's shuffles come from one generator
seeded once, so a run's sequence of shuffles is reproducible."""


def make_pre_aggregation(name: str, *, f: int, bucket_size: int,
                         seed: int) -> PreAggregation | None:
    """The pre-aggregation step registered as ``name`` (``None`` for ``"none"``), with
    ``aggregation.bucket_size`` and the run's seed (no defaults here: the config model's)."""
    return lookup(PRE_AGGREGATIONS, name, "aggregation.pre_aggregation")(f, bucket_size, seed)
