"""Tests of fl_core.audit.gate: each promotion rule on its own, its refusal text, and the
thresholds read from the configuration (the MLflow registration:
tests/adapters/test_mlflow_registration.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from adapters.config_files import build_config
from fl_core.audit.gate import GateDecision, evaluate_gate, gate_thresholds

GATE = {"gate.min_accuracy": 0.75, "audit.max_auc": 0.60, "audit.max_tpr_at_0_1pct_fpr": 0.05,
        "privacy.epsilon": 1.0}
PRIVATE = {"epsilon": 0.99, "mia_tpr_at_0_1pct_fpr": 0.0, "empirical_epsilon_lower_bound": 0.0,
           "randomness": "secure"}
# the two optional floors, switched on (they are off at 0, the default)
FLOORS = {**GATE, "gate.min_auc": 0.6, "gate.min_balanced_accuracy": 0.55}
GOOD = {"accuracy": 0.8, "auc": 0.7, "balanced_accuracy": 0.7, "mia_auc": 0.5, **PRIVATE}


def _gate(**metrics: Any) -> GateDecision:
    return evaluate_gate({"accuracy": 0.8, "mia_auc": 0.5, **PRIVATE, **metrics}, GATE)


# --- moved from tests/adapters/test_mlflow_registration.py -----------------------------


def test_gate_passes_when_every_rule_holds() -> None:
    assert _gate() == GateDecision(True, ())


def test_gate_thresholds_are_inclusive() -> None:
    assert _gate(accuracy=0.75, mia_auc=0.60, mia_tpr_at_0_1pct_fpr=0.05, epsilon=1.0,
                 empirical_epsilon_lower_bound=1.0).passed


def test_gate_refuses_low_accuracy() -> None:
    decision = _gate(accuracy=0.71)
    assert not decision.passed
    assert decision.reasons == ("accuracy 0.71 < gate.min_accuracy 0.75",)


def test_gate_refuses_high_mia_auc_or_low_fpr_tpr() -> None:
    assert _gate(mia_auc=0.7).reasons == ("mia_auc 0.7 > audit.max_auc 0.6",)
    assert _gate(mia_tpr_at_0_1pct_fpr=0.2).reasons == (
        "mia_tpr_at_0_1pct_fpr 0.2 > audit.max_tpr_at_0_1pct_fpr 0.05",)


def test_auc_and_balanced_accuracy_rules_are_off_at_zero_or_absent() -> None:
    """The heart defaults do not change: without the keys, or at 0, no AUC is needed."""
    assert _gate(auc=0.4, balanced_accuracy=0.5).passed  # GATE has neither key
    off = {**GATE, "gate.min_auc": 0.0, "gate.min_balanced_accuracy": 0.0}
    assert evaluate_gate({"accuracy": 0.8, "mia_auc": 0.5, **PRIVATE}, off).passed


def test_an_imbalanced_table_passes_accuracy_but_not_min_auc() -> None:
    """covid_testing: answering "negative" is 0.944 accurate; AUC and balanced accuracy tell."""
    gate = {**GATE, "gate.min_auc": 0.6, "gate.min_balanced_accuracy": 0.55}
    majority = {"accuracy": 0.944, "auc": 0.52, "balanced_accuracy": 0.5, "mia_auc": 0.5,
                **PRIVATE}
    assert _gate(**majority).passed  # what min_accuracy alone lets through
    decision = evaluate_gate(majority, gate)
    assert decision.reasons == ("auc 0.52 < gate.min_auc 0.6",
                                "balanced_accuracy 0.5 < gate.min_balanced_accuracy 0.55")
    assert evaluate_gate({**majority, "auc": 0.6, "balanced_accuracy": 0.55}, gate).passed
    unknown = {**majority, "auc": math.nan, "balanced_accuracy": None}
    assert evaluate_gate(unknown, gate).reasons == (
        "auc is missing: the evaluation did not run or its test patients are all of one class",
        "balanced_accuracy is missing: the evaluation did not run or its test patients are "
        "all of one class")


def test_gate_thresholds_come_from_the_configuration() -> None:
    cfg = build_config({"gate": {"min_accuracy": 0, "min_auc": 0.6}})
    thresholds = gate_thresholds(cfg)
    assert thresholds["gate.min_auc"] == 0.6 and thresholds["gate.min_accuracy"] == 0
    assert thresholds["gate.min_balanced_accuracy"] == 0  # default: off
    assert build_config({}).gate.min_auc == 0


def test_gate_refuses_reproducible_noise_saying_why() -> None:
    decision = _gate(randomness="reproducible")
    assert not decision.passed and len(decision.reasons) == 1
    assert decision.reasons[0].startswith("privacy.randomness=reproducible: the DP noise")
    assert "regenerated" in decision.reasons[0]
    assert _gate(randomness=None).reasons == (
        "randomness is missing: the run did not record where its DP noise came from",)


def test_gate_refuses_models_outside_the_privacy_budget() -> None:
    assert _gate(epsilon=2.5).reasons == ("epsilon 2.5 > privacy.epsilon 1",)
    assert _gate(epsilon=None).reasons == (
        "epsilon is missing: the model is not differentially private (privacy.enabled=false)",)


def test_gate_refuses_a_privacy_failure() -> None:
    """An attack that proves more than the accountant allows means a DP or accounting bug."""
    (reason,) = _gate(epsilon=0.8, empirical_epsilon_lower_bound=1.3).reasons
    assert reason.startswith("privacy failure: empirical_epsilon_lower_bound 1.3 > epsilon 0.8")


@pytest.mark.parametrize("mia_auc", [None, math.nan, math.inf, "n/a", "missing"])
def test_gate_refuses_missing_or_nan_metric(mia_auc: Any) -> None:
    metrics: dict[str, Any] = {"accuracy": 0.9, **PRIVATE}
    if mia_auc != "missing":
        metrics["mia_auc"] = mia_auc
    decision = evaluate_gate(metrics, GATE)
    assert not decision.passed
    assert decision.reasons == ("mia_auc is missing: the audit did not run",)


def test_gate_reports_every_reason_in_rule_order() -> None:
    decision = evaluate_gate({"accuracy": math.nan, "mia_auc": 0.99}, GATE)
    assert not decision.passed
    assert [r.split(" ")[0] for r in decision.reasons] == [
        "accuracy", "mia_auc", "mia_tpr_at_0_1pct_fpr", "epsilon", "randomness",
        "empirical_epsilon_lower_bound"]


# --- each threshold rule: at, past and short of its threshold --------------------------------

# metric, threshold key, whether the threshold is an upper bound, a value on each side
BOUNDS = [
    ("accuracy", "gate.min_accuracy", False, 0.74, 0.76),
    ("auc", "gate.min_auc", False, 0.59, 0.61),
    ("balanced_accuracy", "gate.min_balanced_accuracy", False, 0.54, 0.56),
    ("mia_auc", "audit.max_auc", True, 0.61, 0.59),
    ("mia_tpr_at_0_1pct_fpr", "audit.max_tpr_at_0_1pct_fpr", True, 0.06, 0.04),
    ("epsilon", "privacy.epsilon", True, 1.01, 0.5),
]


@pytest.mark.parametrize(("metric", "key", "upper", "bad", "good"), BOUNDS,
                         ids=[b[0] for b in BOUNDS])
def test_each_threshold_refuses_the_wrong_side_naming_metric_and_key(
        metric: str, key: str, upper: bool, bad: float, good: float) -> None:
    # the audit's ε lower bound stays below every ε tried, so only the rule under test speaks
    metrics = {**GOOD, "empirical_epsilon_lower_bound": 0.1}
    threshold = FLOORS[key]
    sign = ">" if upper else "<"
    assert evaluate_gate({**metrics, metric: bad}, FLOORS) == GateDecision(
        False, (f"{metric} {bad:.4g} {sign} {key} {threshold:.4g}",))
    assert evaluate_gate({**metrics, metric: good}, FLOORS) == GateDecision(True, ())
    assert evaluate_gate({**metrics, metric: threshold}, FLOORS).passed  # inclusive


@pytest.mark.parametrize("metric", ["auc", "balanced_accuracy"])
def test_an_optional_floor_switched_off_ignores_its_metric_entirely(metric: str) -> None:
    """Off (0 or absent): neither a low value nor a missing one refuses; on, both do."""
    key = f"gate.min_{metric}"
    low = {**GOOD, metric: 0.01}
    missing = {k: v for k, v in GOOD.items() if k != metric}
    for thresholds in ({**FLOORS, key: 0.0}, {k: v for k, v in FLOORS.items() if k != key}):
        assert evaluate_gate(low, thresholds).passed
        assert evaluate_gate(missing, thresholds).passed
    assert not evaluate_gate(low, FLOORS).passed
    assert evaluate_gate(missing, FLOORS).reasons == (
        f"{metric} is missing: the evaluation did not run or its test patients are all of one "
        f"class",)


# --- a missing metric: refused, saying why it may be missing --------------------------------

MISSING = {
    "accuracy": "accuracy is missing: the evaluation did not run",
    "auc": "auc is missing: the evaluation did not run or its test patients are all of one "
           "class",
    "balanced_accuracy": "balanced_accuracy is missing: the evaluation did not run or its "
                         "test patients are all of one class",
    "mia_auc": "mia_auc is missing: the audit did not run",
    "mia_tpr_at_0_1pct_fpr": "mia_tpr_at_0_1pct_fpr is missing: the audit did not run",
    "epsilon": "epsilon is missing: the model is not differentially private "
               "(privacy.enabled=false)",
    "empirical_epsilon_lower_bound": "empirical_epsilon_lower_bound is missing: the audit did "
                                     "not run",
}


@pytest.mark.parametrize("metric", list(MISSING))
@pytest.mark.parametrize("absent", ["absent", None, math.nan, -math.inf, "0.9x", True])
def test_a_missing_metric_is_refused_with_its_reason(metric: str, absent: Any) -> None:
    """Absent, None, NaN/inf, text that is not a number, or a boolean: not a measurement."""
    metrics = {k: v for k, v in GOOD.items() if k != metric}
    if absent != "absent":
        metrics[metric] = absent
    assert evaluate_gate(metrics, FLOORS) == GateDecision(False, (MISSING[metric],))


def test_a_numeric_string_is_read_as_its_number() -> None:
    """Metrics that went through MLflow come back as text; a number in text is a number."""
    assert evaluate_gate({**GOOD, "accuracy": "0.8"}, FLOORS).passed
    assert evaluate_gate({**GOOD, "accuracy": "0.7"}, FLOORS).reasons == (
        "accuracy 0.7 < gate.min_accuracy 0.75",)


# --- the audit against the accountant ---------------------------------------------------------


def test_an_audit_bound_above_the_accountants_epsilon_is_a_privacy_failure() -> None:
    """Within budget (ε 0.5 ≤ 1) and still refused: the attack proved more than ε allows."""
    decision = evaluate_gate({**GOOD, "epsilon": 0.5, "empirical_epsilon_lower_bound": 0.51},
                             FLOORS)
    assert decision == GateDecision(False, (
        "privacy failure: empirical_epsilon_lower_bound 0.51 > epsilon 0.5 from the "
        "accountant (a DP or accounting bug)",))
    # a bound that reaches ε exactly, or stays below it, contradicts nothing
    for bound in (0.5, 0.0):
        assert evaluate_gate({**GOOD, "epsilon": 0.5, "empirical_epsilon_lower_bound": bound},
                             FLOORS).passed


def test_without_an_accountants_epsilon_only_the_budget_rule_refuses() -> None:
    """A non-private model has no ε to contradict: it is refused for having none, once."""
    metrics = {k: v for k, v in GOOD.items() if k != "epsilon"}
    metrics["empirical_epsilon_lower_bound"] = 5.0
    assert evaluate_gate(metrics, FLOORS).reasons == (MISSING["epsilon"],)


# --- the noise must be secret -----------------------------------------------------------------


def test_reproducible_randomness_is_refused_naming_the_setting_and_why() -> None:
    assert evaluate_gate({**GOOD, "randomness": "reproducible"}, FLOORS) == GateDecision(False, (
        "privacy.randomness=reproducible: the DP noise and sampling can be regenerated from "
        "the configuration's seed, so the model is not private against anyone who has it; "
        "reproducible runs are for simulation, tests and benchmarks",))


@pytest.mark.parametrize("randomness", ["seeded", "Secure", "", 1])
def test_only_secure_randomness_passes(randomness: Any) -> None:
    (reason,) = evaluate_gate({**GOOD, "randomness": randomness}, FLOORS).reasons
    assert reason.startswith(f"privacy.randomness={randomness}: the DP noise and sampling can "
                             f"be regenerated")


def test_unrecorded_randomness_is_refused() -> None:
    metrics = {k: v for k, v in GOOD.items() if k != "randomness"}
    assert evaluate_gate(metrics, FLOORS).reasons == (
        "randomness is missing: the run did not record where its DP noise came from",)


# --- the DP implementation audit (fedpriv audit-dp) -------------------------------------------


def test_a_failing_dp_implementation_audit_is_refused() -> None:
    metrics = {**GOOD, "dp_audit_epsilon": 1.0, "dp_audit_epsilon_lower_bound": 2.25}
    assert evaluate_gate(metrics, FLOORS) == GateDecision(False, (
        "PRIVACY FAILURE: the DP implementation audit of this configuration proved ε ≥ 2.25 > "
        "ε 1 from the accountant (fedpriv audit-dp, reports/audit_dp.json): no model trained "
        "with it is promoted",))


@pytest.mark.parametrize(("epsilon", "bound"), [
    (1.0, 1.0),  # the bound reaches ε: no contradiction
    (1.0, 0.3),
    (None, 2.0),  # the audit did not run (or recorded nothing): not a refusal on its own
    (1.0, None),
    (1.0, math.nan),
    ("absent", "absent"),
])
def test_a_passing_or_absent_dp_implementation_audit_refuses_nothing(
        epsilon: Any, bound: Any) -> None:
    metrics = dict(GOOD)
    if epsilon != "absent":
        metrics["dp_audit_epsilon"] = epsilon
    if bound != "absent":
        metrics["dp_audit_epsilon_lower_bound"] = bound
    assert evaluate_gate(metrics, FLOORS) == GateDecision(True, ())


# --- the decision -----------------------------------------------------------------------------


def test_the_decision_is_refused_exactly_when_a_rule_gives_a_reason() -> None:
    def always(metrics: Any, thresholds: Any) -> str:
        return "always refuses"

    def never(metrics: Any, thresholds: Any) -> None:
        return None

    assert evaluate_gate({}, {}, rules=(never, never)) == GateDecision(True, ())
    assert evaluate_gate({}, {}, rules=(never, always, always)) == GateDecision(
        False, ("always refuses", "always refuses"))
    assert evaluate_gate({}, {}, rules=()) == GateDecision(True, ())


def test_every_failing_rule_is_named_in_the_reasons() -> None:
    """A model that fails everything is told about every rule, each by its key or setting."""
    worst = {"accuracy": 0.1, "auc": 0.1, "balanced_accuracy": 0.1, "mia_auc": 0.9,
             "mia_tpr_at_0_1pct_fpr": 0.9, "epsilon": 3.0, "randomness": "reproducible",
             "empirical_epsilon_lower_bound": 4.0, "dp_audit_epsilon": 1.0,
             "dp_audit_epsilon_lower_bound": 3.0}
    reasons = evaluate_gate(worst, FLOORS).reasons
    named = ["gate.min_accuracy", "gate.min_auc", "gate.min_balanced_accuracy", "audit.max_auc",
             "audit.max_tpr_at_0_1pct_fpr", "privacy.epsilon", "privacy.randomness=",
             "privacy failure: empirical_epsilon_lower_bound",
             "PRIVACY FAILURE: the DP implementation audit"]
    assert len(reasons) == len(named)
    for reason, name in zip(reasons, named, strict=True):
        assert name in reason, (name, reason)


# --- the thresholds come from the configuration ---------------------------------------------


def test_every_threshold_is_the_configuration_value_under_its_key() -> None:
    cfg = build_config({"gate": {"min_accuracy": 0.61, "min_auc": 0.62,
                                 "min_balanced_accuracy": 0.63},
                        "audit": {"max_auc": 0.64, "max_tpr_at_0_1pct_fpr": 0.065},
                        "privacy": {"epsilon": 2.5}})
    thresholds = gate_thresholds(cfg)
    assert {"gate.min_accuracy": 0.61, "gate.min_auc": 0.62,
            "gate.min_balanced_accuracy": 0.63, "audit.max_auc": 0.64,
            "audit.max_tpr_at_0_1pct_fpr": 0.065, "privacy.epsilon": 2.5}.items() \
        <= thresholds.items()
    for key, value in thresholds.items():  # the key is where the value lives
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value


@pytest.mark.parametrize(("metric", "key", "upper", "bad", "good"), BOUNDS,
                         ids=[b[0] for b in BOUNDS])
def test_every_configured_threshold_is_read_by_its_rule(
        metric: str, key: str, upper: bool, bad: float, good: float) -> None:
    """Moving one threshold in the configuration past a metric flips the decision."""
    metrics = {**GOOD, metric: 0.5, "empirical_epsilon_lower_bound": 0.1}
    lenient = {**FLOORS, key: 0.6 if upper else 0.4}
    strict = {**FLOORS, key: 0.4 if upper else 0.6}
    assert evaluate_gate(metrics, lenient).passed
    assert evaluate_gate(metrics, strict).reasons == (
        f"{metric} 0.5 {'>' if upper else '<'} {key} {strict[key]:.4g}",)
    section, name = key.split(".")
    cfg = build_config({section: {name: strict[key]}})
    assert gate_thresholds(cfg)[key] == strict[key]


# --- the test evaluation: size, every site, lower confidence bounds (issue 25) ---------------

HEART_SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
# the final evaluation histograms of three default heart runs (ε = 1, secure noise, 148 test
# patients, 4 sites, σ = 2 per cell per site): AUC 0.792, 0.796, 0.755; balanced accuracy
# 0.748, 0.753, 0.684; accuracy 0.748, 0.755, 0.686 (the last failed the old
# gate.min_accuracy 0.70)
HEART_RUNS = [
    [[34.915, 16.492, 4.608, 15.083], [2.131, 13.661, 12.927, 40.863]],
    [[27.894, 23.662, 11.461, 8.044], [8.052, 10.316, 17.425, 47.945]],
    [[38.805, 19.410, 11.783, 9.687], [8.419, 17.403, 11.014, 34.237]],
]


def _released(exact_per_site: list[list[list[float]]], seed: int) -> list[list[float]]:
    """The coordinator's merged histogram: each site's exact ``[2, 4]`` counts plus its own
    N(0, 2²) per cell (privacy.evaluation_noise), summed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sites = torch.tensor(exact_per_site, dtype=torch.float64)
    return (sites + 2.0 * torch.randn(sites.shape, generator=g, dtype=torch.float64)) \
        .sum(0).tolist()


def _run_metrics(histogram: list[list[float]], trained: list[str], evaluated: list[str],
                 **figures: Any) -> dict[str, Any]:
    """Final metrics as reports/metrics.json holds them (the gate's input)."""
    return {"mia_auc": 0.5, **PRIVATE, "evaluation_histogram": histogram,
            "trained_sites": trained, "evaluated_sites": evaluated, **figures}


def _default_thresholds() -> dict[str, float]:
    return gate_thresholds(build_config({}))


@pytest.mark.parametrize("histogram", HEART_RUNS)
def test_the_default_heart_run_passes_the_default_gate(histogram: list[list[float]]) -> None:
    decision = evaluate_gate(_run_metrics(histogram, HEART_SITES, HEART_SITES),
                             _default_thresholds())
    assert decision == GateDecision(True, ())


def test_the_unedited_draft_with_five_test_patients_is_refused_with_reasons() -> None:
    """Issue 25: a near-empty column kept, default cleaning: 22 training and 5 test patients
    left at 2 of 4 sites, AUC 1.000 on them. The old gate set champion."""
    exact = [[[2, 0, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [0, 0, 0, 1]]]  # separated
    histogram = _released(exact, seed=4)
    metrics = _run_metrics(histogram, ["a", "b"], ["a", "b"], accuracy=1.0, auc=1.0,
                           balanced_accuracy=1.0)
    reasons = evaluate_gate(metrics, _default_thresholds()).reasons
    assert not evaluate_gate(metrics, _default_thresholds()).passed
    assert reasons[0].startswith("too small a test evaluation: test patients ")
    assert "< gate.min_test_patients 50" in reasons[0]
    assert "< gate.min_test_positives 10" in reasons[0]
    # (with two sites' noise on five patients a class can even vanish: "lower bound
    # undefined … a class is empty", seed 1)
    assert reasons[1] == ("auc lower bound 0.34 (95 %) < gate.min_auc_lower 0.6: auc 1.00, "
                          "6 test patients, 2 positive, 4 negative (noisy counts)")
    assert reasons[2].startswith("balanced_accuracy lower bound 0.00 (95 %) < "
                                 "gate.min_balanced_accuracy_lower 0.55")
    # the old default (accuracy ≥ 0.70 alone) let it through
    old = {"gate.min_accuracy": 0.70, **{k: v for k, v in GATE.items() if k != "gate.min_accuracy"}}
    assert evaluate_gate(metrics, old).passed


def test_a_majority_class_model_is_refused_by_the_default_gate() -> None:
    """79 of 602 positive (13 %): a model that always answers "no" (every predicted
    probability in the lowest bin) is 87 % accurate."""
    exact = [[[26, 0, 0, 0], [4, 0, 0, 0]]] * 4  # 120 test patients, 16 positive
    histogram = _released(exact, seed=2)
    metrics = _run_metrics(histogram, HEART_SITES, HEART_SITES, accuracy=0.87)
    decision = evaluate_gate(metrics, _default_thresholds())
    assert not decision.passed
    assert [r.split(" lower bound")[0] for r in decision.reasons] == ["auc", "balanced_accuracy"]
    assert "< gate.min_balanced_accuracy_lower 0.55" in decision.reasons[1]
    assert evaluate_gate(metrics, {**GATE, "gate.min_accuracy": 0.70}).passed  # the old gate


def test_a_site_that_trained_but_did_not_evaluate_is_refused() -> None:
    evaluated = HEART_SITES[:3]
    metrics = _run_metrics(HEART_RUNS[0], HEART_SITES, evaluated)
    decision = evaluate_gate(metrics, _default_thresholds())
    assert decision.reasons == (
        "not every site that trained was evaluated: VA Long Beach contributed updates but no "
        "final evaluation (3 of 4 evaluated)",)
    off = {**_default_thresholds(), "gate.all_sites_evaluated": 0.0}
    assert evaluate_gate(metrics, off).passed


def test_a_run_without_its_evaluation_is_refused() -> None:
    reasons = evaluate_gate({"mia_auc": 0.5, **PRIVATE}, _default_thresholds()).reasons
    assert reasons[0] == ("evaluation_histogram is missing: the final round's evaluation did "
                          "not run")
    assert "trained_sites/evaluated_sites are missing" in reasons[1]


def test_the_bound_thresholds_are_off_at_zero() -> None:
    exact = [[[2, 0, 0, 0], [0, 0, 0, 1]]]
    metrics = _run_metrics(_released(exact, seed=3), ["a"], ["a"])
    off = {**_default_thresholds(), "gate.min_test_patients": 0.0,
           "gate.min_test_positives": 0.0, "gate.min_test_negatives": 0.0,
           "gate.min_auc_lower": 0.0, "gate.min_balanced_accuracy_lower": 0.0}
    assert evaluate_gate(metrics, off).passed
