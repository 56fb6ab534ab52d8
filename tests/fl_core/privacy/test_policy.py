"""A site's policy against the run the coordinator asks for: each rule named when broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.config_files import load_config
from fl_core.config.site import SitePolicy
from fl_core.privacy.policy import policy_refusals

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("overrides", "sigma", "named"), [
    (["privacy.epsilon=5", "privacy.lifetime_epsilon=10"], 0.6, "policy.max_epsilon_per_run=2"),
    ([], 0.1, "noise multiplier 0.1 < policy.min_noise_multiplier=0.3"),
    (["privacy.randomness=reproducible"], 0.8, "policy.require_secure"),
    (["rounds=900"], 0.8, "rounds=900 > policy.max_rounds=500"),
    (["privacy.enabled=false"], None, "policy.require_private"),
    (["privacy.evaluation_noise=0.5"], 0.8, "policy.max_statistics_epsilon=3"),
    (["privacy.evaluation_every=1"], 0.8, "20 evaluation(s) at privacy.evaluation_noise=2"),
    (["federation.mode=sites", "privacy.audit_noise=1"], 0.8,
     "the audit at privacy.audit_noise=1) cost ε="),
])
def test_each_rule_a_run_breaks_is_named(overrides: list[str], sigma: float | None,
                                         named: str) -> None:
    cfg = load_config(ROOT / "params.yaml", overrides)
    broken = policy_refusals(cfg, SitePolicy(), noise_multiplier=sigma)
    assert len(broken) == 1 and named in broken[0], broken


def test_the_default_run_fits_the_default_policy_and_a_site_may_relax_it() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert policy_refusals(cfg, SitePolicy(), noise_multiplier=0.8) == []
    reproducible = load_config(ROOT / "params.yaml", ["privacy.randomness=reproducible"])
    assert policy_refusals(reproducible, SitePolicy(require_secure=False),
                           noise_multiplier=0.8) == []
    public = load_config(ROOT / "params.yaml", ["privacy.enabled=false"])
    assert policy_refusals(public, SitePolicy(require_private=False), noise_multiplier=None) == []
    every = load_config(ROOT / "params.yaml", ["privacy.evaluation_every=1"])
    assert policy_refusals(every, SitePolicy(max_statistics_epsilon=20),
                           noise_multiplier=0.8) == []


def test_shadow_models_are_not_a_site_rule_since_sites_train_none() -> None:
    """The sites-mode audit is the loss-threshold attack alone: audit.shadow_models (the
    simulation audit's) asks nothing of a site, so policy.max_shadow_models refuses nothing
    (it stays in the policy so that existing site files still load)."""
    many = load_config(ROOT / "params.yaml", ["federation.mode=sites", "audit.shadow_models=64"])
    assert policy_refusals(many, SitePolicy(max_shadow_models=0), noise_multiplier=0.8) == []


def test_a_site_that_releases_no_audit_refuses_a_run_that_audits_it() -> None:
    audited = load_config(ROOT / "params.yaml", ["federation.mode=sites"])
    quiet = SitePolicy(release_audit=False)
    assert policy_refusals(audited, quiet, noise_multiplier=0.8) == [
        "audit.enabled=true in sites mode: this site releases no audit histograms "
        "(policy.release_audit=false)"]
    unaudited = load_config(ROOT / "params.yaml", ["federation.mode=sites",
                                                   "audit.enabled=false"])
    assert policy_refusals(unaudited, quiet, noise_multiplier=0.8) == []


def test_an_exact_statistic_is_refused_by_any_policy() -> None:
    """privacy.enabled=false permits exact releases; a site that requires privacy refuses
    them too, each rule by name (an exact release has ε = ∞)."""
    exact = load_config(ROOT / "params.yaml", ["privacy.enabled=false",
                                               "privacy.evaluation_noise=0"])
    broken = policy_refusals(exact, SitePolicy(), noise_multiplier=None)
    assert any("policy.require_private" in b for b in broken)
    assert any("cost ε=inf > policy.max_statistics_epsilon" in b for b in broken)
