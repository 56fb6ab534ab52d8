"""The membership audit: power on an overfit model, no false alarm, the ε bound by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.audit import (
    ShadowOutputs,
    empirical_epsilon_lower_bound,
    epsilon_lower_bound_at,
    half_splits,
    membership_audit,
)
from fl_core.model.networks import MLP

FEATURES = 10


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).float()  # random labels: only memorisation helps
    return x, y


def _overfit(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    """The deliberately overfit recipe: a wide MLP trained to (near) zero loss."""
    torch.manual_seed(seed)
    model = MLP(FEATURES, hidden_units=256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(250):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    return model.eval()


def _shadows(x: torch.Tensor, y: torch.Tensor, trainable: torch.Tensor, n: int
             ) -> ShadowOutputs:
    """``n`` shadows on random halves of the ``trainable`` pool examples, the target's recipe."""
    splits = half_splits(int(trainable.sum()), n, torch.Generator().manual_seed(1))
    trained_on = torch.zeros(n, len(y), dtype=torch.bool)
    trained_on[:, trainable] = splits
    models = [_overfit(x[trained_on[s]], y[trained_on[s]], 100 + s) for s in range(n)]
    with torch.no_grad():
        logits = torch.stack([m(x) for m in models])
    return ShadowOutputs(logits, y, trained_on)


@pytest.fixture(scope="module")
def pool() -> tuple[torch.Tensor, torch.Tensor]:
    # 0..199 the target's members, 200..399 non-members, 400..799 the auditor's population
    return _data(800, seed=0)


@pytest.mark.slow
def test_overfit_target_is_caught(pool: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = pool
    target = _overfit(x[:200], y[:200], seed=7)
    population = torch.arange(800) >= 400
    shadows = _shadows(x, y, population, n=8)
    evaluate = torch.arange(400)
    with torch.no_grad():
        logits = target(x[evaluate])
    is_member = (evaluate < 200).float()
    result = membership_audit(logits, is_member, evaluate, shadows, delta=1e-5)
    by_name = {r.attack: r for r in result.reports}
    assert set(by_name) == {"loss_threshold", "shokri_shadow", "lira_offline"}
    assert by_name["shokri_shadow"].auc >= 0.65
    assert by_name["lira_offline"].auc >= 0.65
    assert result.metrics()["empirical_epsilon_lower_bound"] > 0
    assert result.metrics()["mia_auc"] == max(r.auc for r in result.reports)


@pytest.mark.slow
def test_non_members_posing_as_members_raise_no_alarm(
    pool: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The "members" were never trained on: every attack must be at chance."""
    x, y = pool
    target = _overfit(x[:200], y[:200], seed=7)
    population = torch.arange(800) >= 400
    shadows = _shadows(x, y, population, n=8)
    fake = torch.arange(200, 400)  # none of these is in the target's training set
    with torch.no_grad():
        logits = target(x[fake])
    is_member = (torch.arange(200) < 100).float()
    result = membership_audit(logits, is_member, fake, shadows, delta=1e-5)
    for report in result.reports:
        assert abs(report.auc - 0.5) <= 0.05, report.attack
    assert abs(result.metrics()["mia_auc"] - 0.5) <= 0.05
    assert result.metrics()["empirical_epsilon_lower_bound"] == 0.0


@pytest.mark.slow
def test_online_lira_runs_when_shadows_saw_the_members(
    pool: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = pool
    target = _overfit(x[:200], y[:200], seed=7)
    evaluate = torch.arange(400)
    shadows = _shadows(x[:400], y[:400], torch.ones(400, dtype=torch.bool), n=8)
    with torch.no_grad():
        logits = target(x[evaluate])
    result = membership_audit(logits, (evaluate < 200).float(), evaluate, shadows, delta=1e-5)
    online = {r.attack: r for r in result.reports}["lira_online"]
    assert online.auc >= 0.65


# --- the ε lower bound ----------------------------------------------------------------------


def test_epsilon_bound_by_hand() -> None:
    # 100 members, 100 non-members; a threshold with FP = 0 and FN = 50.
    # Clopper–Pearson one-sided 95 %: FPR⁺ = 1 − 0.05^(1/100), FNR⁺ = Beta⁻¹(0.95; 51, 50)
    from scipy.stats import beta

    fpr_up = 1 - 0.05 ** (1 / 100)
    fnr_up = beta.ppf(0.95, 51, 50)
    expected = math.log((1 - 1e-5 - fnr_up) / fpr_up)
    got = epsilon_lower_bound_at(torch.tensor([0.0]), 100, torch.tensor([50.0]), 100,
                                 delta=1e-5, alpha=0.05)
    assert float(got[0]) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(math.log((1 - 1e-5 - fnr_up) / 0.029513), rel=1e-3)
    # the symmetric term: FN = 0, FP = 50 gives the same bound
    sym = epsilon_lower_bound_at(torch.tensor([50.0]), 100, torch.tensor([0.0]), 100,
                                 delta=1e-5, alpha=0.05)
    assert float(sym[0]) == pytest.approx(expected, rel=1e-9)
    # chance-level rates prove nothing
    none = epsilon_lower_bound_at(torch.tensor([50.0]), 100, torch.tensor([50.0]), 100,
                                  delta=1e-5, alpha=0.05)
    assert float(none[0]) == 0.0


def test_perfect_separation_bound_grows_with_sample_size() -> None:
    def bound(n: int) -> float:
        scores = torch.cat([torch.ones(n), torch.zeros(n)])
        return empirical_epsilon_lower_bound(scores, scores, delta=1e-5)

    # two thresholds (score ≥ 1 and score ≥ 0), two one-sided bounds each: α = 0.05/4 each
    n = 500
    alpha = 0.05 / 4
    expected = math.log((1 - 1e-5 - (1 - alpha ** (1 / n))) / (1 - alpha ** (1 / n)))
    assert bound(n) == pytest.approx(expected, rel=1e-6)
    assert bound(50) < bound(500) < bound(5000)


def _point_estimate(scores: torch.Tensor, labels: torch.Tensor, delta: float) -> float:
    """The same maximum over thresholds with the observed rates, no confidence bounds."""
    y = labels[torch.argsort(scores, descending=True)]
    n_pos, n_neg = float(labels.sum()), float((1 - labels).sum())
    fpr = torch.cumsum(1 - y, 0) / n_neg
    fnr = (n_pos - torch.cumsum(y, 0)) / n_pos
    terms = torch.maximum(torch.log((1 - delta - fnr) / fpr), torch.log((1 - delta - fpr) / fnr))
    return float(terms[torch.isfinite(terms)].max())


def test_bound_holds_with_its_stated_confidence_on_a_mechanism_of_known_epsilon() -> None:
    """Members score N(μ, 1), non-members N(0, 1): the best test is μ-GDP, whose true ε at δ
    is known in closed form. Over repeated audits the 95 % bound may exceed it at most 5 % of
    the time; the observed rates without confidence bounds exceed it most of the time (so the
    setting has the power to catch a bound that forgot its confidence)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu, delta, n, trials = 1.0, 0.05, 300, 100

    def gdp_delta(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    true_eps = brentq(lambda e: gdp_delta(e) - delta, 0.0, 50.0)  # 1.569
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).double()
    bound_over = point_over = 0
    for _ in range(trials):
        scores = torch.randn(2 * n, generator=g, dtype=torch.float64) + mu * labels
        bound_over += empirical_epsilon_lower_bound(scores, labels, delta, 0.95) > true_eps
        point_over += _point_estimate(scores, labels, delta) > true_eps
    assert bound_over <= 0.05 * trials
    assert point_over >= 0.5 * trials


def _bound_by_brute_force(scores: list[float], members: list[bool], delta: float,
                          confidence: float = 0.95) -> float:
    """The documented bound, one threshold at a time: "member if score ≥ t" for each distinct
    t; Clopper–Pearson upper bounds at 1 − (1 − confidence)/(2T); both terms; 0 if none."""
    from scipy.stats import beta

    positives = sum(members)
    negatives = len(members) - positives
    thresholds = sorted(set(scores))
    alpha = (1 - confidence) / (2 * len(thresholds))

    def upper(errors: int, trials: int) -> float:
        return 1.0 if errors >= trials else float(beta.ppf(1 - alpha, errors + 1, trials - errors))

    best = 0.0
    for t in thresholds:
        fp = sum(s >= t and not m for s, m in zip(scores, members, strict=True))
        fn = sum(s < t and m for s, m in zip(scores, members, strict=True))
        fpr, fnr = upper(fp, negatives), upper(fn, positives)
        for numerator, denominator in ((fnr, fpr), (fpr, fnr)):
            if 1 - delta - numerator > 0:
                best = max(best, math.log((1 - delta - numerator) / denominator))
    return best


scores_st = st.one_of(st.integers(-5, 5), st.floats(-5, 5)).map(float)


@settings(max_examples=60, deadline=None)
@given(st.lists(scores_st, min_size=1, max_size=120), st.lists(scores_st, min_size=1,
                                                               max_size=120),
       st.sampled_from([0.0, 2.0, 20.0]))
def test_bound_matches_a_brute_force_reference_and_is_order_invariant(
    member_scores: list[float], other_scores: list[float], separation: float
) -> None:
    # members shifted by `separation`: from chance to perfectly separated (a positive bound);
    # integer scores tie, and a tie group is one threshold
    raw = [s + separation for s in member_scores] + other_scores
    members = [True] * len(member_scores) + [False] * len(other_scores)
    pairs = list(zip(raw, members, strict=True))
    scores = torch.tensor(raw, dtype=torch.float64)
    labels = torch.tensor([float(m) for m in members])
    b = empirical_epsilon_lower_bound(scores, labels, delta=1e-5)
    assert b == pytest.approx(_bound_by_brute_force(raw, members, 1e-5), rel=1e-9, abs=1e-12)
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(len(pairs)))
    assert empirical_epsilon_lower_bound(scores[perm], labels[perm], 1e-5) == pytest.approx(b)
    # a strictly monotone transform of the scores changes nothing (× 4 is exact in floating
    # point; × 3 + 1 would merge 0 and 1e-300 into one threshold)
    assert empirical_epsilon_lower_bound(scores * 4, labels, 1e-5) == pytest.approx(b)


def test_bound_with_tied_scores_by_brute_force() -> None:
    """Overlapping integer scores, 200 + 200: a positive bound where every threshold is a tie
    group (so T, and with it the Bonferroni level, counts distinct scores)."""
    g = torch.Generator().manual_seed(0)
    members = torch.randint(3, 10, (200,), generator=g).double()
    others = torch.randint(0, 6, (200,), generator=g).double()
    scores = torch.cat([members, others])
    labels = torch.cat([torch.ones(200), torch.zeros(200)])
    b = empirical_epsilon_lower_bound(scores, labels, delta=1e-5)
    assert b > 0.5
    assert b == pytest.approx(_bound_by_brute_force(scores.tolist(), [True] * 200 + [False] * 200,
                                                    1e-5), rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-6, 6), st.booleans()), min_size=2, max_size=80),
       st.sampled_from([0, 3]))
def test_attack_report_figures_agree_with_their_definitions(
    pairs: list[tuple[int, bool]], shift: int
) -> None:
    from sklearn.metrics import roc_auc_score

    from fl_core.audit.report import attack_report

    members = [m for _, m in pairs]
    if all(members) or not any(members):
        return
    raw = [float(s + shift * m) for s, m in pairs]
    report = attack_report("x", torch.tensor(raw), torch.tensor([float(m) for m in members]),
                           delta=1e-5)
    positives, negatives = sum(members), len(members) - sum(members)
    # max over thresholds "member if score ≥ t" (t above every score: TPR = FPR = 0)
    advantage = max([0.0] + [
        sum(s >= t and m for s, m in zip(raw, members, strict=True)) / positives
        - sum(s >= t and not m for s, m in zip(raw, members, strict=True)) / negatives
        for t in set(raw)])
    assert report.advantage == pytest.approx(advantage, abs=1e-12)
    assert report.accuracy == pytest.approx((1 + advantage) / 2, abs=1e-12)
    assert report.auc == pytest.approx(roc_auc_score(members, raw), abs=1e-12)
    assert report.auc <= 0.5 + advantage - advantage**2 / 2 + 1e-12
    assert (report.members, report.non_members) == (positives, negatives)


def _sweep_cli(project, *args: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    # a subprocess, as users run it (and Prefect's log handlers stay out of pytest's capture)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "audit-sweep", "--root", str(project), *args,
         "--set", "rounds=2", "--set", "audit.shadow_models=2"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
        timeout=300)


@pytest.mark.slow
@pytest.mark.integration
def test_audit_sweep_cli_charges_the_ledger_and_writes_table_plot(project) -> None:
    import json

    from adapters.ledger_store import PrivacyLedger

    out = _sweep_cli(project, "--seeds", "1", "--epsilons", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 1 |" in out.stdout and "no DP" not in out.stdout
    assert "Spearman rank correlation with ε" in out.stdout
    result = json.loads((project / "reports" / "audit_sweep.json").read_text())
    assert [r["epsilon"] for r in result["rows"]] == [1.0]
    for r in result["rows"]:
        # one seed: no spread; a ROC with max(TPR − FPR) = A has AUC at most 1/2 + A − A²/2
        assert r["mia_auc_sd"] == 0 and r["per_seed_auc"] == [round(r["mia_auc"], 4)]
        adv = r["mia_advantage"]
        assert r["mia_auc"] <= 0.5 + adv - adv**2 / 2 + 1e-9, r
    dp_row = result["rows"][0]
    assert dp_row["privacy_consistent"] and dp_row["empirical_epsilon_lower_bound"] <= 1.0
    assert (project / "reports" / "audit_sweep.png").read_bytes()[:4] == b"\x89PNG"
    # training on the configured patients is a use of them: one charge, every site, and one
    # for what the evaluation released about the test patients
    entries = PrivacyLedger(project / ".fedpriv" / "privacy_ledger.sqlite").entries()
    run = result["rows"][0]["ledger_run_ids"][0]
    assert {(e.kind, e.run_id) for e in entries} == {
        ("audit-sweep", run), ("statistics", f"{run}-statistics")}
    assert {e.site for e in entries} == {"Cleveland", "Hungary", "Switzerland",
                                         "VA Long Beach"}
    assert all(0.9 < e.epsilon <= 1.0 for e in entries if e.kind == "audit-sweep")


@pytest.mark.slow
@pytest.mark.integration
def test_audit_sweep_the_ledger_cannot_cover_is_refused_before_training(project) -> None:
    import re

    from adapters.ledger_store import PrivacyLedger
    from adapters.sweep import plan_sweep

    out = _sweep_cli(project, "--seeds", "2", "--epsilons", "1", "2",
                     "--set", "privacy.lifetime_epsilon=2.5")
    assert out.returncode == 5, out.stderr[-2000:]
    for part in ("audit-sweep refused", "privacy.lifetime_epsilon=2.5", "Cleveland",
                 "composed", "summed", "Nothing was trained"):
        assert part in out.stderr, part
    assert not (project / "reports" / "audit_sweep.json").exists()
    assert PrivacyLedger(project / ".fedpriv" / "privacy_ledger.sqlite").entries() == []
    # the setting the message names is enough for this sweep, and no less would do
    allow = float(re.search(r"--set privacy.lifetime_epsilon=([0-9.]+)", out.stderr)[1])
    assert allow > 2.5
    overrides = ["rounds=2", "audit.shadow_models=2"]
    from adapters.config_files import load_config

    base = load_config(project / "params.yaml",
                       [*overrides, f"privacy.lifetime_epsilon={allow}"])
    needs = plan_sweep(base, project, [1.0, 2.0], 2)
    assert allow - 0.01 < max(n.total.tight_epsilon for n in needs) <= allow


def test_shadow_federations_are_partitioned_by_the_pipelines_own_rule() -> None:
    """By site: one client per hospital holding exactly that hospital's trained pool rows;
    by patient: data.num_clients clients. No second copy of the partitioning."""
    from adapters.audit import AuditPool, _shadow_clients
    from adapters.config_files import load_config

    n = 60
    sites = ["A"] * 30 + ["B"] * 20 + ["C"] * 10
    pool = AuditPool(torch.randn(n, 3), (torch.arange(n) % 3 == 0).float(), sites,
                     torch.ones(n, dtype=torch.bool), torch.arange(10), torch.ones(10))
    trained = torch.arange(n) % 2 == 0
    root = Path(__file__).resolve().parents[3]
    by_site = _shadow_clients(load_config(root / "params.yaml"), pool, trained,
                              torch.Generator().manual_seed(0))
    assert [c.client_id for c in by_site] == ["A", "B", "C"]
    for c in by_site:
        assert all(sites[i] == c.client_id and trained[i] for i in c.train_ids)
        assert all(sites[i] == c.client_id and not trained[i] for i in c.test_ids)
    assert sum(len(c.train_ids) for c in by_site) == int(trained.sum())
    cfg = load_config(root / "params.yaml", ["data.partition=by_patient", "data.num_clients=4"])
    by_patient = _shadow_clients(cfg, pool, trained, torch.Generator().manual_seed(0))
    assert len(by_patient) == 4
    assert sorted(i for c in by_patient for i in c.train_ids) == \
        torch.nonzero(trained)[:, 0].tolist()


def test_offline_lira_gives_members_and_non_members_as_many_out_models() -> None:
    """Members never in a shadow have 8 out-models, population patients 4: unequal counts
    would make the score's spread depend on membership through the audit itself (a spurious
    ε lower bound on a target that leaks nothing, seen on covid_testing at 2469 vs 2469)."""
    from fl_core.audit.lira import equal_out_models, lira_offline
    from fl_core.audit.report import attack_report

    g = torch.Generator().manual_seed(0)
    n, shadows = 4000, 8
    centre = torch.randn(2 * n, generator=g, dtype=torch.float64)
    trained = torch.zeros(shadows, 2 * n, dtype=torch.bool)
    trained[:, n:] = torch.rand(shadows, n, generator=g).argsort(0) < shadows // 2
    offset = torch.randn(shadows, 1, generator=g, dtype=torch.float64)  # per-shadow bias
    phi = centre + offset + torch.randn(shadows, 2 * n, generator=g, dtype=torch.float64)
    target = centre + 0.2 * torch.randn(2 * n, generator=g, dtype=torch.float64)  # no leak
    # logits whose true-class logit (label 1) is phi: the logit itself
    outputs = ShadowOutputs(phi.float(), torch.ones(2 * n), trained)
    assert equal_out_models(~trained).sum(0).unique().tolist() == [shadows // 2]
    scores = lira_offline(outputs, target.float(), torch.arange(2 * n))
    is_member = (torch.arange(2 * n) < n).float()
    report = attack_report("lira_offline", scores, is_member, 1e-5, 0.95)
    assert report.epsilon_lower_bound == 0.0 and abs(report.auc - 0.5) < 0.03
    assert abs(scores[:n].std() / scores[n:].std() - 1) < 0.1
