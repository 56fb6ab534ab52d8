"""A lower bound on ε from two samples of Gaussian scores (Gaussian differential privacy).

If an auditor's score is ``N(0, s²)`` when a canary is left out and ``N(μ·s, s²)`` when it is
included, the mechanism is exactly μ-GDP on that canary (Dong, Roth & Su 2022) and its
``(ε, δ)`` curve is

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε · Φ(−ε/μ − μ/2),

so a lower confidence bound ``μ_lb`` on the separation gives ``ε_lb`` = the ε at which
``δ(ε) = δ`` for ``μ_lb``. ``μ_lb`` comes from Welch-free Student statistics: with ``n₁``
included and ``n₀`` left-out scores and the pooled standard deviation ``ŝ``,

    t = (m̄₁ − m̄₀) / (ŝ · √(1/n₁ + 1/n₀))  ~  noncentral t(n₁+n₀−2, μ / √(1/n₁ + 1/n₀)),

and ``μ_lb`` is the noncentrality at which the observed ``t`` is the ``1 − α`` quantile
(exact for Gaussian scores of equal variance, whatever that variance is). The white-box
canary audit (:mod:`fl_core.audit.canary`) produces such scores: a canary's coordinate of the
summed updates is its clipped contribution plus Gaussian noise. Scores that are not Gaussian
make this an estimate, not a bound; :mod:`fl_core.audit.bounds` gives the assumption-free
(and far weaker) counting bound.
"""

from __future__ import annotations

import math

import torch

MAX_MU = 60.0
"""Separations above this are reported as this: ε(60) at δ = 1e-5 is about 1,800, far beyond
any claim, and the noncentral t is not evaluated reliably further out."""


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-GDP, computed in log space so that ``e^ε·Φ(·)`` does not overflow."""
    from scipy.special import log_ndtr

    if mu <= 0:
        return 0.0
    a = log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + log_ndtr(-epsilon / mu - mu / 2)
    return float(math.exp(a) - math.exp(b)) if b < a else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with ``δ(ε) ≤ delta`` for μ-GDP (0 when μ-GDP already gives δ at ε=0)."""
    from scipy.optimize import brentq

    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2.0
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-9))


def separation_lower_bound(included: torch.Tensor, left_out: torch.Tensor,
                           alpha: float) -> tuple[float, float]:
    """``(μ̂, μ_lb)``: the standardised separation of two score samples and its one-sided
    ``1 − alpha`` lower confidence bound (noncentral-t inversion, pooled variance).

    A separation the samples cannot show (μ_lb < 0) is returned as 0; identical scores in
    each group (zero variance, different means) as :data:`MAX_MU`.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct

    x1, x0 = included.double().reshape(-1), left_out.double().reshape(-1)
    n1, n0 = int(x1.numel()), int(x0.numel())
    if n1 < 2 or n0 < 2:
        raise ValueError("the separation needs at least two scores on each side")
    df = n1 + n0 - 2
    pooled = ((x1 - x1.mean()).square().sum() + (x0 - x0.mean()).square().sum()) / df
    diff = float(x1.mean() - x0.mean())
    scale = math.sqrt(1.0 / n1 + 1.0 / n0)
    if float(pooled) <= 0.0:
        return (MAX_MU, MAX_MU) if diff > 0 else (0.0, 0.0)
    mu_hat = diff / math.sqrt(float(pooled))
    t_obs = mu_hat / scale

    def tail(mu: float) -> float:  # P(T ≥ t_obs) when the separation is mu
        return float(nct.sf(t_obs, df, mu / scale)) - alpha

    if tail(0.0) >= 0.0:  # t_obs is no surprise without any separation
        return max(mu_hat, 0.0), 0.0
    if tail(MAX_MU) <= 0.0:
        return min(mu_hat, MAX_MU), MAX_MU
    return min(mu_hat, MAX_MU), float(brentq(tail, 0.0, MAX_MU, xtol=1e-9))
