"""Aggregators: small pure functions over a stacked ``[n_clients, n_params]`` update tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AggregationResult:
    """``aggregate`` is the combined update ``[n_params]``; ``selected`` the clients it used."""

    aggregate: torch.Tensor
    selected: list[int]


def _check(updates: torch.Tensor) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be [n_clients, n_params], got {tuple(updates.shape)}")


def fedavg(updates: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Weighted mean ``Σ_i w_i u_i / Σ_i w_i`` (McMahan et al. 2017); uniform when no weights."""
    _check(updates)
    n = updates.shape[0]
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=updates.dtype)
    else:
        w = torch.as_tensor(weights, dtype=updates.dtype).reshape(-1)
        if w.numel() != n or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be n_clients non-negative numbers with a positive sum")
        w = w / w.sum()
    return AggregationResult(aggregate=w @ updates, selected=list(range(n)))
