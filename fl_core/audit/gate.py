"""The promotion gate: may a trained model become ``champion``?

Pure (no MLflow, no Prefect). Each rule is a small function that looks at the final metrics
and the thresholds (:func:`gate_thresholds`, keyed by their configuration key) and returns the
reason it refuses, or ``None``. Adding a rule is one line in :data:`RULES`. A model passes
only when it is accurate enough (accuracy; optionally AUC and balanced accuracy, off at 0:
on an imbalanced table accuracy passes on the majority class alone), the membership audit
found little (AUC and TPR at 0.1 % FPR), it is differentially private within the configured ε
with noise nobody can regenerate (``privacy.randomness=secure``), and the audit's empirical ε
lower bound does not contradict the accountant (which would mean a DP or accounting bug).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    return {
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


RULES: tuple[Rule, ...] = (
    _at_least("accuracy", "gate.min_accuracy"),
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
