"""Robust aggregation, anomaly detection, sanitation and attacks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_core.aggregation import (
    bucketing,
    centered_clipping,
    check_robustness,
    coordinate_median,
    fedavg,
    geometric_median,
    krum,
    make_aggregator,
    multi_krum,
    nearest_neighbour_mixing,
    trimmed_mean,
)
from fl_core.anomaly import Reputation, detect_anomalies, sanitize
from fl_core.attacks import Attack, alie_z, choose_malicious
from fl_core.config import ConfigError, load_config

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def stacks(draw, min_n: int = 1, max_n: int = 12) -> torch.Tensor:
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 8))
    values = draw(st.lists(st.floats(-100, 100, allow_nan=False, width=32),
                           min_size=n * d, max_size=n * d))
    return torch.tensor(values, dtype=torch.float64).reshape(n, d)


def loop_krum_scores(u: np.ndarray, f: int) -> list[float]:
    n = len(u)
    scores = []
    for i in range(n):
        dists = sorted(float(((u[i] - u[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return scores


@SETTINGS
@given(u=stacks())
def test_fedavg_is_the_weighted_mean(u: torch.Tensor) -> None:
    w = torch.arange(1, u.shape[0] + 1, dtype=u.dtype)
    expected = sum(w[i] * u[i] for i in range(len(u))) / w.sum()
    assert torch.allclose(fedavg(u, w).aggregate, expected)


@SETTINGS
@given(u=stacks(min_n=5))
def test_multi_krum_matches_a_loop_reference(u: torch.Tensor) -> None:
    n = u.shape[0]
    f = (n - 3) // 2
    scores = np.array(loop_krum_scores(u.numpy(), f))
    result = multi_krum(u, f)
    chosen = sorted(result.selected)
    others = [i for i in range(n) if i not in chosen]
    assert len(chosen) == n - f
    # the n − f lowest loop-computed scores (ties may go either way)
    tol = 1e-6 * (1 + np.abs(scores).max())
    assert not others or scores[chosen].max() <= scores[others].min() + tol
    assert torch.allclose(result.aggregate, u[chosen].mean(0))
    best = krum(u, f).selected
    assert len(best) == 1 and scores[best[0]] <= scores.min() + tol


@SETTINGS
@given(u=stacks(min_n=3))
def test_trimmed_mean_and_median_match_numpy(u: torch.Tensor) -> None:
    n = u.shape[0]
    f = (n - 1) // 2 // 2
    arr = np.sort(u.numpy(), axis=0)
    assert np.allclose(trimmed_mean(u, f).aggregate.numpy(), arr[f : n - f].mean(0))
    assert np.allclose(coordinate_median(u).aggregate.numpy(), np.median(u.numpy(), axis=0))


@SETTINGS
@given(u=stacks(min_n=2))
def test_geometric_median_minimises_the_sum_of_distances(u: torch.Tensor) -> None:
    z = geometric_median(u, max_iter=500, tol=1e-12).aggregate

    def objective(p: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(u - p, dim=1).sum())

    best_input = min(objective(row) for row in u)
    assert objective(z) <= min(best_input, objective(u.mean(0))) * (1 + 1e-4) + 1e-4


@SETTINGS
@given(u=stacks(min_n=2), tau=st.floats(0.1, 50))
def test_centered_clipping_matches_a_loop_reference(u: torch.Tensor, tau: float) -> None:
    center = u.mean(0) * 0.5
    v = center.clone()
    for _ in range(3):
        step = torch.zeros_like(v)
        for row in u:
            diff = row - v
            norm = float(torch.linalg.vector_norm(diff))
            step += diff * min(1.0, tau / max(norm, 1e-12))
        v = v + step / len(u)
    assert torch.allclose(centered_clipping(u, center, tau=tau).aggregate, v, atol=1e-9)


@SETTINGS
@given(u=stacks(min_n=5), data=st.data())
def test_aggregators_are_permutation_invariant(u: torch.Tensor, data) -> None:
    n = u.shape[0]
    # random jitter: an evenly spaced one still leaves symmetric rows with equal Krum scores
    jitter = torch.rand(u.shape, generator=torch.Generator().manual_seed(0), dtype=u.dtype)
    u = u + jitter * 1e-3
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    f = (n - 3) // 2
    for method in ("fedavg", "multi_krum", "krum", "trimmed_mean", "median",
                   "geometric_median", "centered_clipping"):
        agg = make_aggregator(method, f)
        a = agg(u, None, None).aggregate
        b = agg(u[perm], None, None).aggregate
        assert torch.allclose(a, b, atol=1e-6), method


def test_multi_krum_selects_the_honest_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(14, 50, generator=g) * 0.1 + 1.0
    byzantine = torch.randn(6, 50, generator=g) * 0.1 - 3.0  # a tight cluster far away
    u = torch.cat([byzantine, honest])
    result = multi_krum(u, f=6)
    assert sorted(result.selected) == list(range(6, 20))
    assert torch.allclose(result.aggregate, honest.mean(0), atol=1e-5)


def test_impossible_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        check_robustness("multi_krum", 4, 1)
    with pytest.raises(ValueError, match="majority"):
        check_robustness("median", 4, 2)
    check_robustness("multi_krum", 20, 6)
    with pytest.raises(ConfigError, match="aggregation.byzantine_fraction"):
        load_config("params.yaml", ["data.partition=by_patient", "data.num_clients=4",
                                    "aggregation.method=multi_krum"])
    with pytest.raises(ConfigError, match="coordinate-wise rule over sparse updates"):
        load_config("params.yaml", ["aggregation.method=median"])


def test_nnm_and_bucketing_preserve_the_mean_when_nothing_is_dropped() -> None:
    u = torch.randn(10, 7, dtype=torch.float64)
    assert torch.allclose(nearest_neighbour_mixing(u, 0), u.mean(0).expand(10, 7))
    mixed = nearest_neighbour_mixing(u, 3)
    assert mixed.shape == u.shape
    buckets = bucketing(u, 2, torch.Generator().manual_seed(0))
    assert buckets.shape == (5, 7)
    assert torch.allclose(buckets.mean(0), u.mean(0))


@pytest.mark.parametrize("kind", ["sign_flip", "scaling", "gaussian"])
def test_anomaly_detection_precision_and_recall(kind: str) -> None:
    tp = fp = fn = 0
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        honest = torch.randn(20, 100, generator=g) * 0.05 + torch.linspace(-1, 1, 100)
        malicious = list(range(6))
        attack = Attack(kind, frozenset(), scale=4.0, noise_std=1.0)
        u = attack.craft(honest, malicious, g)
        flagged = set(detect_anomalies(u).flagged)
        tp += len(flagged & set(malicious))
        fp += len(flagged - set(malicious))
        fn += len(set(malicious) - flagged)
    precision, recall = tp / max(tp + fp, 1), tp / (tp + fn)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def test_reputation_excludes_after_repeated_flags_and_forgives() -> None:
    rep = Reputation(decay=0.8, exclude_at=2.0)
    for _ in range(2):
        rep.update(["a", "b"], {"a"})
        assert not rep.excluded("a")
    rep.update(["a", "b"], {"a"})
    assert rep.excluded("a") and not rep.excluded("b")
    for _ in range(5):
        rep.update(["a", "b"], set())
    assert not rep.excluded("a")


def test_sanitize_rejects_bad_updates_with_reasons() -> None:
    good = [torch.ones(4) * (1 + i / 10) for i in range(4)]
    bad = [torch.ones(3), torch.tensor([1.0, float("nan"), 0, 0]), torch.ones(4) * 1e6]
    kept, reasons = sanitize(good + bad, 4, max_norm_factor=100)
    assert kept == [0, 1, 2, 3]
    assert "3 elements" in reasons[4] and "non-finite" in reasons[5]
    assert "100× the round's median norm" in reasons[6]


def test_alie_z_matches_the_paper() -> None:
    # n = 50, f = 12 in Baruch et al.: s = 14, z = Φ⁻¹(36/50) ≈ 0.58
    assert math.isclose(alie_z(50, 12), 0.5828, abs_tol=1e-3)
    assert math.isclose(alie_z(20, 6), 0.6745, abs_tol=1e-3)


def test_attacks_leave_honest_rows_alone_and_are_seeded() -> None:
    u = torch.randn(10, 5)
    rows = [1, 4]
    for kind in ("sign_flip", "gaussian", "scaling", "alie", "ipm"):
        out = Attack(kind).craft(u, rows, torch.Generator().manual_seed(0))
        honest = [i for i in range(10) if i not in rows]
        assert torch.equal(out[honest], u[honest]), kind
        assert not torch.equal(out[rows], u[rows]), kind
    ids = [f"c{i}" for i in range(20)]
    assert choose_malicious(ids, 0.3, 1) == choose_malicious(ids, 0.3, 1)
    assert len(choose_malicious(ids, 0.3, 1)) == 6
