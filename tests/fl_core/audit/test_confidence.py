"""Tests of fl_core.audit.confidence: the lower confidence bounds the gate decides on, their
coverage by simulation (sampling the test patients and the evaluation's DP noise), and their
determinism given the released histogram."""

from __future__ import annotations

import math

import pytest
import torch

from fl_core.audit.confidence import (
    batched_auc,
    batched_balanced_accuracy,
    evaluation_bounds,
    hanley_mcneil_variance,
    normal_quantile,
)
from fl_core.model.metrics import histogram_auc

# a population's share of each class per bin of predicted probability (4 bins, low → high)
NEGATIVE = torch.tensor([0.40, 0.30, 0.20, 0.10], dtype=torch.float64)
POSITIVE = torch.tensor([0.10, 0.20, 0.30, 0.40], dtype=torch.float64)


def _coverage(positives: int, negatives: int, cell_noise: float, replicates: int,
              seed: int) -> tuple[float, float]:
    """Share of simulated releases whose AUC and balanced-accuracy lower bounds lie below the
    population's: test patients drawn per class, then the noise added per cell."""
    truth = torch.stack([NEGATIVE, POSITIVE])
    true_auc, true_ba = float(batched_auc(truth)), float(batched_balanced_accuracy(truth))
    g = torch.Generator().manual_seed(seed)
    covered_auc = covered_ba = 0
    for _ in range(replicates):
        neg = torch.multinomial(NEGATIVE, negatives, replacement=True, generator=g)
        pos = torch.multinomial(POSITIVE, positives, replacement=True, generator=g)
        h = torch.stack([torch.bincount(neg, minlength=4), torch.bincount(pos, minlength=4)])
        h = h.double() + cell_noise * torch.randn(h.shape, generator=g, dtype=torch.float64)
        b = evaluation_bounds(h, cell_noise, 0.95, draws=1000)
        covered_auc += not b.auc_lower > true_auc
        covered_ba += not b.balanced_accuracy_lower > true_ba
    return covered_auc / replicates, covered_ba / replicates


@pytest.mark.slow
@pytest.mark.parametrize(("positives", "negatives", "cell_noise"), [
    (15, 60, 4.0),   # 13-15 positives, four sites' noise (σ = 2 each, merged: 2·√4)
    (70, 78, 4.0),   # heart's test split
    (40, 40, 0.0),   # an exact (non-private) evaluation: sampling alone
])
def test_lower_bounds_cover_the_population_figures_at_95_percent(
        positives: int, negatives: int, cell_noise: float) -> None:
    auc, ba = _coverage(positives, negatives, cell_noise, replicates=400, seed=positives)
    assert auc >= 0.93 and ba >= 0.93, (auc, ba)


def test_bound_is_deterministic_given_the_release() -> None:
    h = torch.tensor([[30.2, 20.1, 10.7, 5.3], [3.1, 9.8, 20.2, 40.9]], dtype=torch.float64)
    assert evaluation_bounds(h, 4.0, 0.95) == evaluation_bounds(h.tolist(), 4.0, 0.95)


def test_bound_widens_with_noise_and_narrows_with_patients() -> None:
    h = torch.tensor([[30.0, 20.0, 10.0, 5.0], [3.0, 10.0, 20.0, 40.0]], dtype=torch.float64)
    exact, noisy = evaluation_bounds(h, 0.0, 0.95), evaluation_bounds(h, 4.0, 0.95)
    big = evaluation_bounds(10 * h, 4.0, 0.95)
    assert noisy.auc == exact.auc == pytest.approx(histogram_auc(h))
    assert noisy.auc_lower < exact.auc_lower < big.auc_lower < exact.auc
    assert noisy.balanced_accuracy_lower < exact.balanced_accuracy_lower \
        < big.balanced_accuracy_lower < exact.balanced_accuracy


def test_five_patients_perfectly_separated_have_a_low_bound() -> None:
    """AUC 1.0 on five patients (two sites' noise) says almost nothing."""
    h = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    b = evaluation_bounds(h, 2.0 * math.sqrt(2), 0.95)
    assert b.auc == 1.0 and b.auc_lower < 0.6 and b.balanced_accuracy_lower < 0.55
    assert b.patients == 5 and b.positives == 2 and b.negatives == 3


def test_a_class_empty_after_noise_has_no_bound() -> None:
    b = evaluation_bounds([[10.0, 5.0, 0.0, 0.0], [-1.0, -0.5, 0.2, 0.1]], 2.0, 0.95)
    assert math.isnan(b.auc) and math.isnan(b.auc_lower)
    assert math.isnan(b.balanced_accuracy_lower) and b.positives == 0


def test_hanley_mcneil_and_quantile() -> None:
    assert normal_quantile(0.95) == pytest.approx(1.6449, abs=1e-4)
    # AUC 0.8 on 50 + 50: SE ≈ 0.0445 (Hanley & McNeil 1982, table 1: 0.044)
    assert math.sqrt(hanley_mcneil_variance(0.8, 50, 50)) == pytest.approx(0.0445, abs=5e-4)
    with pytest.raises(ValueError, match="confidence"):
        normal_quantile(1.0)
    with pytest.raises(ValueError, match=r"\[2, bins\]"):
        evaluation_bounds([[1.0, 2.0, 3.0]], 1.0, 0.95)
