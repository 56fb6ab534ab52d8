"""Robust aggregation, anomaly detection, sanitation and attacks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.config_files import load_config
from fl_core.config.model import ConfigError
from fl_core.robust.aggregators import (
    AGGREGATORS,
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
from fl_core.robust.anomaly import Reputation, detect_anomalies, sanitize
from fl_core.robust.attacks import ATTACKS, Attack, alie_z, choose_malicious

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


def test_geometric_median_on_an_update_is_found_exactly() -> None:
    """Hypothesis's falsifying example: two clients send 0, so the median is 0 (the pull of
    the other two, |(1,1)/√2 + (2,3)/√13| ≈ 1.99, is below their weight 2); plain Weiszfeld
    stopped at (0.04, 0.05), 0.0007 worse."""
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 3.0]], dtype=torch.float64)
    assert torch.equal(geometric_median(u, max_iter=500, tol=1e-12).aggregate,
                       torch.zeros(2, dtype=torch.float64))


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
    for method in AGGREGATORS:
        agg = make_aggregator(method, f=f)
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
        attack = Attack(kind=kind, malicious=frozenset(), scale=4.0, noise_std=1.0,
                        ipm_epsilon=0.5)
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
    for kind in (name for name, spec in ATTACKS.items() if spec.craft is not None):
        attack = Attack(kind=kind, malicious=frozenset(), scale=4.0, noise_std=1.0,
                        ipm_epsilon=0.5)
        out = attack.craft(u, rows, torch.Generator().manual_seed(0))
        honest = [i for i in range(10) if i not in rows]
        assert torch.equal(out[honest], u[honest]), kind
        assert not torch.equal(out[rows], u[rows]), kind
    ids = [f"c{i}" for i in range(20)]
    assert choose_malicious(ids, 0.3, 1) == choose_malicious(ids, 0.3, 1)
    assert len(choose_malicious(ids, 0.3, 1)) == 6


# --- client weights: every rule that documents them must use them -----------------------------

positive_weights = st.floats(0.1, 50, allow_nan=False)


@st.composite
def weighted_stacks(draw, min_n: int = 2, max_n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    u = draw(stacks(min_n=min_n, max_n=max_n))
    w = draw(st.lists(positive_weights, min_size=u.shape[0], max_size=u.shape[0]))
    return u, torch.tensor(w, dtype=u.dtype)


@SETTINGS
@given(uw=weighted_stacks(min_n=5))
def test_multi_krum_averages_the_selected_with_their_weights(
    uw: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """``Σ_{i∈S} w_i u_i / Σ_{i∈S} w_i`` over the selected ``S``; the selection ignores w."""
    u, w = uw
    f = (u.shape[0] - 3) // 2
    result = multi_krum(u, f, weights=w)
    chosen = result.selected
    assert chosen == multi_krum(u, f).selected
    expected = sum(w[i] * u[i] for i in chosen) / w[chosen].sum()
    assert torch.allclose(result.aggregate, expected, atol=1e-9)


def test_multi_krum_moves_to_the_client_holding_the_weight() -> None:
    u = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = 2
    chosen = multi_krum(u, f).selected
    heavy = chosen[2]
    w = torch.full((9,), 1e-9, dtype=u.dtype)
    w[heavy] = 1.0
    assert torch.allclose(multi_krum(u, f, weights=w).aggregate, u[heavy], atol=1e-7)


def _weighted_distance_sum(u: torch.Tensor, w: torch.Tensor, z: torch.Tensor) -> float:
    return float((w * torch.linalg.vector_norm(u - z, dim=1)).sum())


@SETTINGS
@given(uw=weighted_stacks())
def test_geometric_median_minimises_the_weighted_sum_of_distances(
    uw: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """``argmin_z Σ α_i ‖u_i − z‖``: no input row and not the weighted mean does better.

    Weiszfeld converges linearly, slowly where two sides nearly balance (then the objective
    is flat too): hence 1e-3 relative."""
    u, w = uw
    z = geometric_median(u, w, max_iter=1000, tol=1e-12).aggregate
    rivals = [*u, (w @ u) / w.sum()]
    best = min(_weighted_distance_sum(u, w, p) for p in rivals)
    assert _weighted_distance_sum(u, w, z) <= best * (1 + 1e-3) + 1e-4


@SETTINGS
@given(u=stacks(min_n=2, max_n=6), data=st.data())
def test_geometric_median_integer_weights_equal_repeated_clients(
    u: torch.Tensor, data
) -> None:
    """Weight 3 on a client is the same objective as that client sent three times."""
    n = u.shape[0]
    counts = torch.tensor(data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    weighted = geometric_median(u, counts.to(u.dtype), max_iter=500, tol=1e-12).aggregate
    repeated = geometric_median(u.repeat_interleave(counts, 0), max_iter=500,
                                tol=1e-12).aggregate
    scale = 1 + float(u.abs().max())
    assert torch.allclose(weighted, repeated, atol=1e-5 * scale)


def test_geometric_median_sits_on_a_client_with_most_of_the_weight() -> None:
    # a point carrying at least half the weight is the weighted geometric median
    u = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.ones(7, dtype=u.dtype)
    w[4] = 7.0  # 7 of 13
    z = geometric_median(u, w, max_iter=1000, tol=1e-14).aggregate
    assert torch.allclose(z, u[4], atol=1e-4)
    assert float(torch.linalg.vector_norm(geometric_median(u).aggregate - u[4])) > 0.1


def _clipping_reference(u: torch.Tensor, w: torch.Tensor, center: torch.Tensor,
                        tau: float | None) -> torch.Tensor:
    alpha = w / w.sum()
    v = center.clone()
    for _ in range(3):
        dists = [float(torch.linalg.vector_norm(row - v)) for row in u]
        radius = sorted(dists)[(len(u) - 1) // 2] if tau is None else tau
        step = torch.zeros_like(v)
        for a, row, dist in zip(alpha, u, dists, strict=True):
            step += a * (row - v) * min(1.0, radius / max(dist, 1e-12))
        v = v + step
    return v


@SETTINGS
@given(uw=weighted_stacks(), tau=st.one_of(st.none(), st.floats(0.1, 50)))
def test_centered_clipping_weights_each_clipped_step(
    uw: tuple[torch.Tensor, torch.Tensor], tau: float | None
) -> None:
    """``v ← v + Σ_i α_i clip_τ(u_i − v)`` with ``α = w / Σ w`` (and the median radius)."""
    u, w = uw
    center = u.mean(0) * 0.5
    got = centered_clipping(u, center, tau=tau, weights=w).aggregate
    assert torch.allclose(got, _clipping_reference(u, w, center, tau), atol=1e-8)


def test_centered_clipping_moves_toward_the_heavy_client() -> None:
    u = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1e-9, 1.0, 1e-9], dtype=u.dtype)
    # radius = median distance 10 from 0: nothing is clipped, one step lands on client 1
    got = centered_clipping(u, iterations=1, weights=w).aggregate
    assert torch.allclose(got, u[1], atol=1e-6)


@pytest.mark.parametrize("method", ["fedavg", "multi_krum", "geometric_median",
                                    "centered_clipping"])
def test_configured_rules_pass_the_client_weights_on(method: str) -> None:
    """``make_aggregator`` hands weights to each rule that has them (the default included)."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(9, 6, generator=g, dtype=torch.float64)
    w = torch.rand(9, generator=g, dtype=torch.float64) * 100 + 1
    w[0] = 1000.0
    previous = torch.randn(6, generator=g, dtype=torch.float64) * 0.1
    agg = make_aggregator(method, f=2)
    direct = {
        "fedavg": lambda: fedavg(u, w),
        "multi_krum": lambda: multi_krum(u, 2, 7, w),
        "geometric_median": lambda: geometric_median(u, w),
        "centered_clipping": lambda: centered_clipping(u, previous, weights=w),
    }[method]()
    weighted = agg(u, w, previous).aggregate
    assert torch.allclose(weighted, direct.aggregate)
    assert not torch.allclose(weighted, agg(u, None, previous).aggregate, atol=1e-3)


# --- pre-aggregation: NNM and bucketing --------------------------------------------------------


def nnm_reference(u: np.ndarray, f: int) -> np.ndarray:
    """Brute force: each row → the mean of its ``n − f`` nearest rows (itself included)."""
    n = len(u)
    out = np.empty_like(u)
    for i in range(n):
        dists = [float(((u[i] - u[j]) ** 2).sum()) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: dists[j])[: max(n - f, 1)]
        out[i] = u[nearest].mean(0)
    return out


@SETTINGS
@given(n=st.integers(1, 9), d=st.integers(1, 5), seed=st.integers(0, 2**31),
       data=st.data())
def test_nnm_is_the_mean_of_each_rows_nearest_neighbours(n: int, d: int, seed: int,
                                                         data) -> None:
    f = data.draw(st.integers(0, n - 1))
    # continuous random rows: distance ties (an ambiguous neighbour set) have probability 0
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u * data.draw(st.sampled_from([1e-3, 1.0, 100.0]))
    got = nearest_neighbour_mixing(u, f).numpy()
    assert np.allclose(got, nnm_reference(u.numpy(), f), rtol=1e-9, atol=1e-12)


def test_nnm_on_a_line_by_hand() -> None:
    u = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]], dtype=torch.float64)
    # f = 2: each point averages itself and its 2 nearest
    expected = torch.tensor([[1.0], [1.0], [1.0], [23 / 3], [23 / 3]], dtype=torch.float64)
    assert torch.allclose(nearest_neighbour_mixing(u, 2), expected)


def bucket_groups(n: int, bucket_size: int, generator: torch.Generator) -> list[frozenset[int]]:
    """Which inputs each bucket averages: one-hot rows make the bucket means readable."""
    out = bucketing(torch.eye(n, dtype=torch.float64), bucket_size, generator)
    return [frozenset(torch.nonzero(row).flatten().tolist()) for row in out]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), bucket_size=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_bucketing_uses_every_row_exactly_once(n: int, bucket_size: int, seed: int) -> None:
    u = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out = bucketing(u, bucket_size, torch.Generator().manual_seed(seed))
    groups = bucket_groups(n, bucket_size, torch.Generator().manual_seed(seed))
    assert sorted(i for g in groups for i in g) == list(range(n))  # a partition of the rows
    expected_sizes = [bucket_size] * (n // bucket_size) + ([n % bucket_size] if n % bucket_size
                                                            else [])
    assert sorted(len(g) for g in groups) == sorted(expected_sizes)
    # each output row is the plain mean of its bucket's updates
    for row, group in zip(out, groups, strict=True):
        assert torch.allclose(row, u[sorted(group)].mean(0))


def test_bucketing_is_shuffled_by_its_generator() -> None:
    n, size = 12, 3
    fixed = [bucket_groups(n, size, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert fixed[0] == fixed[1]  # a fixed seed is reproducible
    groupings = {frozenset(bucket_groups(n, size, torch.Generator().manual_seed(s)))
                 for s in range(20)}
    assert len(groupings) >= 15  # 15400 groupings: 20 seeds almost never repeat one
    # one generator across rounds: each call draws a fresh shuffle
    g = torch.Generator().manual_seed(7)
    assert bucket_groups(n, size, g) != bucket_groups(n, size, g)


def test_bucketing_pairs_clients_uniformly() -> None:
    """Two given clients share a bucket of 2 among 6 with probability 1/5: the shuffle is a
    uniform permutation, not a fixed pairing (which would pair them always or never)."""
    g = torch.Generator().manual_seed(0)
    trials = 2000
    together = sum(any({0, 1} <= grp for grp in bucket_groups(6, 2, g)) for _ in range(trials))
    # binomial(2000, 0.2): sd ≈ 17.9, the band is ± 5 sd
    assert abs(together - trials / 5) <= 90, together
