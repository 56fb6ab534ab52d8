"""The MLflow tags that state a model's guarantee name the released statistics' ε too."""

from __future__ import annotations

from adapters.publish import GUARANTEE, privacy_tags
from fl_core.results import PrivacyReport


def _report(**kw: object) -> PrivacyReport:
    base = dict(enabled=True, randomness="secure", epsilon=0.99, delta=1e-5,
                epsilon_replace_one=2.1, delta_replace_one=1e-5, accountant="prv",
                noise_multiplier=23.9, sample_rate=1.0, max_grad_norm=1.0, dataset="d",
                ledger_run_id="abc")
    return PrivacyReport(**{**base, **kw})  # type: ignore[arg-type]


def test_the_guarantee_tags_carry_the_statistics_epsilon_and_what_is_not_covered() -> None:
    tags = privacy_tags(_report(statistics_epsilon=2.0032))
    assert tags["privacy.statistics_epsilon"] == "2.0032"
    assert tags["privacy.guarantee"] == GUARANTEE
    for phrase in ("add/remove one patient", "evaluation", "public by declaration",
                   "not covered", "loss-threshold attack only"):
        assert phrase in GUARANTEE
    assert "LiRA" not in GUARANTEE  # no site releases LiRA: nothing of it left uncovered
    assert "privacy.statistics_epsilon" not in privacy_tags(_report())
    assert privacy_tags(_report(epsilon=None))["privacy"] == "none"
