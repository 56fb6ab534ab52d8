"""The promotion gate: may a trained model become ``champion``?

Pure (no MLflow, no Prefect). Each rule is a small function that looks at the final metrics
and the :class:`~fl_core.config.GateConfig` and returns the reason it refuses, or ``None``.
Adding a rule is one line in :data:`RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fl_core.config import GateConfig

Metrics = Mapping[str, float | int | None]
Rule = Callable[[Metrics, GateConfig], str | None]

# Why a metric can be absent, for the refusal message.
_MISSING_BECAUSE = {
    "accuracy": "the evaluation did not run",
    "mia_auc": "the audit did not run",
}


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict; ``reasons`` (one sentence each) is empty exactly when it passed."""

    passed: bool
    reasons: tuple[str, ...]


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


def _bound(name: str, threshold_key: str, upper: bool) -> Rule:
    """Rule: ``metrics[name] <= gate.<threshold_key>`` if ``upper``, else ``>=``."""

    def rule(metrics: Metrics, gate: GateConfig) -> str | None:
        value = _value(metrics, name)
        threshold = float(getattr(gate, threshold_key))
        if value is None:
            return _missing(name)
        if (value > threshold) if upper else (value < threshold):
            sign = ">" if upper else "<"
            return f"{name} {value:.4g} {sign} gate.{threshold_key} {threshold:.4g}"
        return None

    return rule


def _at_least(name: str, threshold_key: str) -> Rule:
    return _bound(name, threshold_key, upper=False)


def _at_most(name: str, threshold_key: str) -> Rule:
    return _bound(name, threshold_key, upper=True)


RULES: tuple[Rule, ...] = (
    _at_least("accuracy", "min_accuracy"),
    _at_most("mia_auc", "max_mia_auc"),
)


def evaluate_gate(
    metrics: Metrics, gate: GateConfig, rules: tuple[Rule, ...] = RULES
) -> GateDecision:
    """Apply every rule; the model passes only if none of them refuses."""
    reasons = tuple(reason for rule in rules if (reason := rule(metrics, gate)) is not None)
    return GateDecision(passed=not reasons, reasons=reasons)
