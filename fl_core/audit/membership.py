"""The full audit: every attack on the same balanced members / non-members, worst case first.

:func:`membership_audit` takes the target's logits on the evaluation examples (balanced
members and non-members), where each sits in the shadows' pool, and the shadow outputs. It
runs the loss-threshold baseline, the Shokri attack model, offline LiRA, and online LiRA
where every evaluation example has in- and out-shadows. The headline figures are the worst
case over attacks (each metric's maximum), which is what the promotion gate reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fl_core.audit.bounds import CONFIDENCE
from fl_core.audit.lira import lira_offline, lira_online
from fl_core.audit.report import AttackReport, attack_report
from fl_core.audit.shadow import ShadowOutputs, shokri_attack, true_class_logit


def balanced_indices(
    n_members: int, n_non_members: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equally many members and non-members, the larger side subsampled at random: the
    evaluation examples every attack here is scored on."""
    n = min(n_members, n_non_members)
    if n == 0:
        raise ValueError("the audit needs at least one member and one non-member")
    return (torch.randperm(n_members, generator=generator)[:n],
            torch.randperm(n_non_members, generator=generator)[:n])


@dataclass(frozen=True)
class AuditResult:
    reports: tuple[AttackReport, ...]

    def worst(self, field: str) -> float:
        return max(float(getattr(r, field)) for r in self.reports)

    @property
    def strongest(self) -> AttackReport:
        """The attack with the highest AUC (ties: the higher ε lower bound)."""
        return max(self.reports, key=lambda r: (r.auc, r.epsilon_lower_bound))

    def metrics(self) -> dict[str, float | str]:
        """The ``reports/metrics.json`` fields: the worst case over the attacks."""
        return {
            "mia_auc": self.worst("auc"),
            "mia_attack_accuracy": self.worst("accuracy"),
            "mia_tpr_at_1pct_fpr": self.worst("tpr_at_1pct_fpr"),
            "mia_tpr_at_0_1pct_fpr": self.worst("tpr_at_0_1pct_fpr"),
            "mia_advantage": self.worst("advantage"),
            "empirical_epsilon_lower_bound": self.worst("epsilon_lower_bound"),
            "mia_strongest_attack": self.strongest.attack,
        }


def membership_audit(
    target_logits: torch.Tensor,
    is_member: torch.Tensor,
    pool_index: torch.Tensor,
    shadows: ShadowOutputs,
    delta: float,
    confidence: float = CONFIDENCE,
) -> AuditResult:
    """Attack the target's logits on its evaluation examples; ``pool_index[i]`` is example
    ``i``'s column in ``shadows``."""
    labels = shadows.labels[pool_index]
    phi = true_class_logit(target_logits, labels)
    attacks = {
        "loss_threshold": -nn.functional.softplus(-phi),
        "shokri_shadow": shokri_attack(shadows, target_logits, labels),
        "lira_offline": lira_offline(shadows, target_logits, pool_index),
    }
    trained = shadows.trained_on[:, pool_index]
    if bool(trained.any(0).all()) and bool((~trained).any(0).all()):
        attacks["lira_online"] = lira_online(shadows, target_logits, pool_index)
    return AuditResult(tuple(attack_report(name, scores, is_member, delta, confidence)
                             for name, scores in attacks.items()))
