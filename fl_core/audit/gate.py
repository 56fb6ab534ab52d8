"""The promotion gate: may a trained model become ``champion``?

Pure (no MLflow, no Prefect). Each rule is a small function that looks at the final metrics
and the thresholds (:func:`gate_thresholds`, keyed by their configuration key) and returns the
reason it refuses, or ``None``. Adding a rule is one line in :data:`RULES`. A model passes
only when its test evaluation is large enough (test patients, positives, negatives) and came
from every site that trained, the *lower confidence bounds* of its AUC and balanced accuracy
clear their thresholds (sampling and the evaluation's DP noise both counted,
:mod:`fl_core.audit.confidence`: five test patients or always answering the majority class
cannot pass; point figures are optional rules, off at 0), the membership audit
found little (AUC and TPR at 0.1 % FPR), it is differentially private within the configured ε
with noise nobody can regenerate (``privacy.randomness=secure``), and the audit's empirical ε
lower bound does not contradict the accountant (which would mean a DP or accounting bug).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fl_core.audit.confidence import EvaluationBounds, evaluation_bounds
from fl_core.config.model import PipelineConfig

Metrics = Mapping[str, float | int | str | None]
Thresholds = Mapping[str, float]
Rule = Callable[[Metrics, Thresholds], str | None]

# Why a metric can be absent, for the refusal message.
_MISSING_BECAUSE = {
    "accuracy": "the evaluation did not run",
    "auc": "the evaluation did not run or its test patients are all of one class",
    "balanced_accuracy": "the evaluation did not run or its test patients are all of one class",
    "mia_auc": "the audit did not run",
    "mia_tpr_at_0_1pct_fpr": "the audit did not run",
    "empirical_epsilon_lower_bound": "the audit did not run",
    "epsilon": "the model is not differentially private (privacy.enabled=false)",
}


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict; ``reasons`` (one sentence each) is empty exactly when it passed."""

    passed: bool
    reasons: tuple[str, ...]


def gate_thresholds(cfg: PipelineConfig) -> dict[str, float]:
    """Every threshold a rule reads, keyed by the configuration key that sets it."""
    g = cfg.gate
    return {
        "gate.min_test_patients": float(g.min_test_patients),
        "gate.min_test_positives": float(g.min_test_positives),
        "gate.min_test_negatives": float(g.min_test_negatives),
        "gate.all_sites_evaluated": float(g.all_sites_evaluated),
        "gate.min_auc_lower": g.min_auc_lower,
        "gate.min_balanced_accuracy_lower": g.min_balanced_accuracy_lower,
        "gate.confidence": g.confidence,
        "privacy.evaluation_noise": cfg.privacy.evaluation_noise,
        "gate.min_accuracy": cfg.gate.min_accuracy,
        "gate.min_auc": cfg.gate.min_auc,
        "gate.min_balanced_accuracy": cfg.gate.min_balanced_accuracy,
        "audit.max_auc": cfg.audit.max_auc,
        "audit.max_tpr_at_0_1pct_fpr": cfg.audit.max_tpr_at_0_1pct_fpr,
        "privacy.epsilon": cfg.privacy.epsilon,
    }


def _value(metrics: Metrics, name: str) -> float | None:
    """The metric as a finite float, or None when missing, None, non-numeric or NaN/inf."""
    raw = metrics.get(name)
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _missing(name: str) -> str:
    because = _MISSING_BECAUSE.get(name, "it was not computed")
    return f"{name} is missing: {because}"


def _bound(name: str, key: str, upper: bool) -> Rule:
    """Rule: ``metrics[name] <= thresholds[key]`` if ``upper``, else ``>=``."""

    def rule(metrics: Metrics, thresholds: Thresholds) -> str | None:
        value = _value(metrics, name)
        threshold = float(thresholds[key])
        if value is None:
            return _missing(name)
        if (value > threshold) if upper else (value < threshold):
            sign = ">" if upper else "<"
            return f"{name} {value:.4g} {sign} {key} {threshold:.4g}"
        return None

    return rule


def _at_least(name: str, key: str) -> Rule:
    return _bound(name, key, upper=False)


def _at_most(name: str, key: str) -> Rule:
    return _bound(name, key, upper=True)


def _at_least_if_set(name: str, key: str) -> Rule:
    """Rule ``metrics[name] >= thresholds[key]``, off while the threshold is 0 or absent."""
    bound = _at_least(name, key)

    def rule(metrics: Metrics, thresholds: Thresholds) -> str | None:
        return bound(metrics, thresholds) if float(thresholds.get(key, 0.0)) > 0 else None

    return rule


def _audit_agrees_with_accountant(metrics: Metrics, thresholds: Thresholds) -> str | None:
    """An attack cannot beat a correct DP guarantee: ε_lb > ε means a DP or accounting bug."""
    bound, epsilon = _value(metrics, "empirical_epsilon_lower_bound"), _value(metrics, "epsilon")
    if bound is None:
        return _missing("empirical_epsilon_lower_bound")
    if epsilon is not None and bound > epsilon:
        return (f"privacy failure: empirical_epsilon_lower_bound {bound:.4g} > epsilon "
                f"{epsilon:.4g} from the accountant (a DP or accounting bug)")
    return None


def _noise_is_secret(metrics: Metrics, thresholds: Thresholds) -> str | None:
    """Noise derived from ``seed`` can be regenerated and subtracted by anyone holding the
    configuration: such a model carries no DP guarantee against them."""
    randomness = metrics.get("randomness")
    if randomness == "secure":
        return None
    if randomness is None:
        return "randomness is missing: the run did not record where its DP noise came from"
    return (f"privacy.randomness={randomness}: the DP noise and sampling can be regenerated "
            f"from the configuration's seed, so the model is not private against anyone who "
            f"has it; reproducible runs are for simulation, tests and benchmarks")


def _dp_implementation_audit(metrics: Metrics, thresholds: Thresholds) -> str | None:
    """The white-box canary audit of this configuration (``fedpriv audit-dp``), when it ran:
    its ε lower bound above the accountant's ε means the DP implementation is broken."""
    bound = _value(metrics, "dp_audit_epsilon_lower_bound")
    epsilon = _value(metrics, "dp_audit_epsilon")
    if bound is None or epsilon is None or bound <= epsilon:
        return None
    return (f"PRIVACY FAILURE: the DP implementation audit of this configuration proved "
            f"ε ≥ {bound:.4g} > ε {epsilon:.4g} from the accountant (fedpriv audit-dp, "
            f"reports/audit_dp.json): no model trained with it is promoted")


# --- the test evaluation: its size, its sites and the confidence bounds ---------------------


def _bounds(metrics: Metrics, thresholds: Thresholds) -> EvaluationBounds | str:
    """The bounds of the released evaluation histogram, or why there are none. The merged
    histogram sums one release per evaluated site: each cell's noise is ``σ·√sites``."""
    histogram = metrics.get("evaluation_histogram")
    if not histogram:
        return "evaluation_histogram is missing: the final round's evaluation did not run"
    sites = metrics.get("evaluated_sites")
    k = max(len(sites), 1) if isinstance(sites, list | tuple) else 1
    noise = float(thresholds.get("privacy.evaluation_noise", 0.0)) * math.sqrt(k)
    try:
        return evaluation_bounds(histogram, noise,  # type: ignore[arg-type]
                                 float(thresholds.get("gate.confidence", 0.95)))
    except ValueError as exc:
        return f"evaluation_histogram is unusable: {exc}"


def _counts(b: EvaluationBounds) -> str:
    return (f"{b.patients:.0f} test patients, {b.positives:.0f} positive, "
            f"{b.negatives:.0f} negative (noisy counts)")


def _enough_test_patients(metrics: Metrics, thresholds: Thresholds) -> str | None:
    """A few test patients (or one class barely present) make every figure a coin toss."""
    keys = ("gate.min_test_patients", "gate.min_test_positives", "gate.min_test_negatives")
    if not any(float(thresholds.get(key, 0)) > 0 for key in keys):
        return None
    b = _bounds(metrics, thresholds)
    if isinstance(b, str):
        return b
    short = [f"{what} {have:.0f} < {key} {float(thresholds.get(key, 0)):.0f}"
             for what, have, key in (("test patients", b.patients, "gate.min_test_patients"),
                                     ("positives", b.positives, "gate.min_test_positives"),
                                     ("negatives", b.negatives, "gate.min_test_negatives"))
             if have < float(thresholds.get(key, 0))]
    return f"too small a test evaluation: {'; '.join(short)}" if short else None


def _every_trained_site_evaluated(metrics: Metrics, thresholds: Thresholds) -> str | None:
    """A site whose updates are in the model but whose patients are not in the evaluation
    (failed, left, no test split) would make the figures speak for a federation it is not."""
    if float(thresholds.get("gate.all_sites_evaluated", 0)) <= 0:
        return None
    trained, evaluated = metrics.get("trained_sites"), metrics.get("evaluated_sites")
    if not isinstance(trained, list | tuple) or not isinstance(evaluated, list | tuple):
        return "trained_sites/evaluated_sites are missing: the run did not record them"
    missing = sorted(set(trained) - set(evaluated))
    if missing:
        return (f"not every site that trained was evaluated: {', '.join(missing)} contributed "
                f"updates but no final evaluation ({len(evaluated)} of {len(trained)} "
                f"evaluated)")
    return None


def _lower_bound_rule(figure: str, key: str) -> Rule:
    """Rule: the one-sided lower confidence bound of ``figure`` ≥ ``thresholds[key]`` (off at
    0); the refusal states the figure, its bound, the confidence, the threshold and counts."""

    def rule(metrics: Metrics, thresholds: Thresholds) -> str | None:
        threshold = float(thresholds.get(key, 0.0))
        if threshold <= 0:
            return None
        b = _bounds(metrics, thresholds)
        if isinstance(b, str):
            return b
        value, lower = getattr(b, figure), getattr(b, f"{figure}_lower")
        level = f"{b.confidence * 100:g} %"
        if not math.isfinite(lower):
            return (f"{figure} lower bound undefined ({level}): a class is empty; "
                    f"{_counts(b)}")
        if lower < threshold:
            return (f"{figure} lower bound {lower:.2f} ({level}) < {key} {threshold:.4g}: "
                    f"{figure} {value:.2f}, {_counts(b)}")
        return None

    return rule


RULES: tuple[Rule, ...] = (
    _enough_test_patients,
    _every_trained_site_evaluated,
    _lower_bound_rule("auc", "gate.min_auc_lower"),
    _lower_bound_rule("balanced_accuracy", "gate.min_balanced_accuracy_lower"),
    _at_least_if_set("accuracy", "gate.min_accuracy"),
    _at_least_if_set("auc", "gate.min_auc"),
    _at_least_if_set("balanced_accuracy", "gate.min_balanced_accuracy"),
    _at_most("mia_auc", "audit.max_auc"),
    _at_most("mia_tpr_at_0_1pct_fpr", "audit.max_tpr_at_0_1pct_fpr"),
    _at_most("epsilon", "privacy.epsilon"),
    _noise_is_secret,
    _audit_agrees_with_accountant,
    _dp_implementation_audit,
)


def evaluate_gate(
    metrics: Metrics, thresholds: Thresholds, rules: tuple[Rule, ...] = RULES
) -> GateDecision:
    """Apply every rule; the model passes only if none of them refuses."""
    reasons = tuple(reason for rule in rules if (reason := rule(metrics, thresholds)) is not None)
    return GateDecision(passed=not reasons, reasons=reasons)
