"""Lower confidence bounds on AUC and balanced accuracy from a released evaluation histogram.

The gate decides on these bounds, not on the point figures: with five test patients an AUC of
1.0 means little, and on an imbalanced table accuracy rewards always answering the majority
class. What the coordinator holds is the sites' merged ``[2, bins]`` histogram (row 0: label
0, row 1: label 1; bins of predicted probability in increasing order), each cell carrying
Gaussian noise of standard deviation ``σ·√k`` (``σ`` = ``privacy.evaluation_noise`` per site,
``k`` sites summed). Two sources of error, treated as independent and added as variances:

* **sampling** — the test patients are a sample. AUC: the Hanley–McNeil (1982) variance from
  the AUC and the two class counts. Balanced accuracy: the binomial variance of sensitivity and
  specificity with Agresti–Coull (Wilson-centre) adjusted rates, so a rate of 0 or 1 on a few
  patients still has a variance.
* **DP noise** — known exactly: a parametric bootstrap re-adds ``N(0, σ²k)`` to every cell of
  the released histogram (``draws`` copies, one vectorised pass, a fixed generator: the same
  release always gives the same bound) and takes the figure's variance over the copies.

The bound is one-sided: ``figure − z·√(var_sampling + var_noise)`` with ``z`` the normal
quantile at ``confidence``. Everything here is post-processing of the release (no privacy
cost). The figures are those of the binned histogram (patients sharing a bin are ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BOOTSTRAP_SEED = 20260101  # fixed: the bound is a function of the released histogram only


@dataclass(frozen=True)
class EvaluationBounds:
    """Counts and one-sided lower bounds read from a released evaluation histogram. NaN
    figures and bounds where a class is empty (after noise)."""

    patients: float
    positives: float
    negatives: float
    auc: float
    auc_lower: float
    balanced_accuracy: float
    balanced_accuracy_lower: float
    confidence: float


def normal_quantile(confidence: float) -> float:
    """``z`` with ``P(Z ≤ z) = confidence`` for a standard normal ``Z``."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence {confidence}: must be in [0.5, 1)")
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(confidence,
                                                                          dtype=torch.float64)))


def batched_auc(histograms: torch.Tensor) -> torch.Tensor:
    """The Mann–Whitney AUC (ties ½) of ``[..., 2, bins]`` histograms, clipped to ``[0, 1]``;
    NaN where a class total is not positive (as :func:`fl_core.privacy.release.noisy_auc`)."""
    h = histograms.double()
    neg, pos = h[..., 0, :], h[..., 1, :]
    p, n = pos.sum(-1), neg.sum(-1)
    below = torch.cumsum(neg, -1) - neg
    auc = (pos * (below + 0.5 * neg)).sum(-1) / (p * n)
    auc = auc.clamp(0.0, 1.0)
    return torch.where((p > 0) & (n > 0), auc, torch.full_like(auc, math.nan))


def batched_balanced_accuracy(histograms: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy at probability 0.5 (bin ``bins // 2`` onwards predicts 1) of
    ``[..., 2, bins]`` histograms, confusion sums clamped at 0 (as the coordinator's); NaN
    where a class's total is not positive (as for AUC)."""
    h = histograms.double()
    half = h.shape[-1] // 2
    tp, fn = h[..., 1, half:].sum(-1).clamp(min=0), h[..., 1, :half].sum(-1).clamp(min=0)
    fp, tn = h[..., 0, half:].sum(-1).clamp(min=0), h[..., 0, :half].sum(-1).clamp(min=0)
    p, n = tp + fn, tn + fp
    ba = (tp / p + tn / n) / 2
    defined = (p > 0) & (n > 0) & (h[..., 1, :].sum(-1) > 0) & (h[..., 0, :].sum(-1) > 0)
    return torch.where(defined, ba, torch.full_like(ba, math.nan))


def hanley_mcneil_variance(auc: float, positives: float, negatives: float) -> float:
    """Sampling variance of an AUC on ``positives`` and ``negatives`` patients (Hanley &
    McNeil 1982, exponential approximation); counts below 1 are taken as 1."""
    a = min(max(auc, 0.0), 1.0)
    p, n = max(positives, 1.0), max(negatives, 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return max(a * (1 - a) + (p - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a), 0.0) / (p * n)


def _rate_variance(successes: float, trials: float, z: float) -> float:
    """Binomial variance of a rate with the Agresti–Coull adjustment (``z²/2`` pseudo-counts
    each way): never 0, even at 0 of 3 or 3 of 3."""
    trials = max(trials, 0.0)
    n = trials + z * z
    rate = (min(max(successes, 0.0), trials) + z * z / 2) / n  # noise can push tp past p
    return rate * (1 - rate) / n


def _noise_variance(values: torch.Tensor) -> float:
    """Variance over the bootstrap copies whose figure is defined (a copy with an empty class
    counts as the worst case: the figure's full range, variance ¼)."""
    finite = values[torch.isfinite(values)]
    if finite.numel() < 2:
        return 0.25
    share = finite.numel() / values.numel()
    return float(finite.var()) * share + 0.25 * (1 - share)


def evaluation_bounds(histogram: torch.Tensor | list[list[float]], cell_noise: float,
                      confidence: float, draws: int = 4000) -> EvaluationBounds:
    """Counts, AUC and balanced accuracy of a released ``[2, bins]`` histogram with their
    one-sided lower confidence bounds (module docstring). ``cell_noise`` is the standard
    deviation of each merged cell's noise (``σ·√sites``; 0 for an exact histogram)."""
    h = torch.as_tensor(histogram, dtype=torch.float64)
    if h.ndim != 2 or h.shape[0] != 2 or h.shape[1] < 2:
        raise ValueError(f"evaluation histogram of shape {tuple(h.shape)}: expected [2, bins]")
    z = normal_quantile(confidence)
    half = h.shape[1] // 2
    positives = max(float(h[1].sum()), 0.0)
    negatives = max(float(h[0].sum()), 0.0)
    auc = float(batched_auc(h))
    ba = float(batched_balanced_accuracy(h))
    noise_auc = noise_ba = 0.0
    if cell_noise > 0:
        generator = torch.Generator().manual_seed(_BOOTSTRAP_SEED)
        copies = h + cell_noise * torch.randn((draws, *h.shape), generator=generator,
                                              dtype=torch.float64)
        noise_auc = _noise_variance(batched_auc(copies))
        noise_ba = _noise_variance(batched_balanced_accuracy(copies))
    nan = math.nan
    auc_lower = ba_lower = nan
    if math.isfinite(auc):
        spread = math.sqrt(hanley_mcneil_variance(auc, positives, negatives) + noise_auc)
        auc_lower = max(auc - z * spread, 0.0)
    if math.isfinite(ba):
        tp = max(float(h[1, half:].sum()), 0.0)
        tn = max(float(h[0, :half].sum()), 0.0)
        sampling = (_rate_variance(tp, positives, z) + _rate_variance(tn, negatives, z)) / 4
        ba_lower = max(ba - z * math.sqrt(sampling + noise_ba), 0.0)
    return EvaluationBounds(
        patients=positives + negatives, positives=positives, negatives=negatives, auc=auc,
        auc_lower=auc_lower, balanced_accuracy=ba, balanced_accuracy_lower=ba_lower,
        confidence=confidence)
