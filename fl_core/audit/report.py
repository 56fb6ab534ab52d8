"""What a membership attack achieved, in the figures a privacy officer reads.

AUC-ROC; the best balanced accuracy over thresholds; TPR at 1 % and 0.1 % FPR (LiRA's
low-FPR view, Carlini et al. 2022); membership advantage ``max(TPR − FPR)`` (Yeom et al.
2018); and the empirical ε lower bound (:mod:`fl_core.audit.bounds`). A TPR at 0.1 % FPR needs
≥ 1000 non-members to mean what it says; with fewer, the FPRs the data can resolve are
multiples of 1/non-members and the figure is the TPR at FPR = 0, reported as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_core.audit.bounds import CONFIDENCE, empirical_epsilon_lower_bound
from fl_core.model.metrics import roc_auc, roc_curve


@dataclass(frozen=True)
class AttackReport:
    attack: str
    auc: float
    accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    advantage: float
    epsilon_lower_bound: float
    members: int
    non_members: int
    fpr: list[float]
    tpr: list[float]

    def summary(self) -> dict[str, float | int | str]:
        return {"attack": self.attack, "auc": self.auc, "accuracy": self.accuracy,
                "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
                "tpr_at_0_1pct_fpr": self.tpr_at_0_1pct_fpr, "advantage": self.advantage,
                "epsilon_lower_bound": self.epsilon_lower_bound, "members": self.members,
                "non_members": self.non_members}


def tpr_at_fpr(fpr: torch.Tensor, tpr: torch.Tensor, max_fpr: float) -> float:
    """Highest TPR among thresholds whose FPR is at most ``max_fpr``."""
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if bool(ok.any()) else 0.0


def attack_report(
    attack: str, scores: torch.Tensor, is_member: torch.Tensor, delta: float,
    confidence: float = CONFIDENCE,
) -> AttackReport:
    """Score → report; a higher score means "more likely a member"."""
    scores = scores.detach().double().reshape(-1)
    is_member = is_member.detach().double().reshape(-1)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"attack {attack!r} produced non-finite scores")
    fpr, tpr = roc_curve(scores, is_member)
    return report_from_roc(
        attack, fpr, tpr, auc=roc_auc(scores, is_member),
        epsilon_lower_bound=empirical_epsilon_lower_bound(scores, is_member, delta, confidence),
        members=int(is_member.sum()), non_members=int((1 - is_member).sum()))


def report_from_roc(
    attack: str, fpr: torch.Tensor, tpr: torch.Tensor, *, auc: float,
    epsilon_lower_bound: float, members: int, non_members: int,
) -> AttackReport:
    """The report of an attack whose ROC curve (from (0, 0) to (1, 1)), AUC and ε lower bound
    are known: from per-patient scores (:func:`attack_report`) or from merged histograms."""
    return AttackReport(
        attack=attack,
        auc=auc,
        accuracy=float(((tpr + 1 - fpr) / 2).max()),  # balanced accuracy at the best threshold
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01),
        tpr_at_0_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
        advantage=float((tpr - fpr).max()),
        epsilon_lower_bound=epsilon_lower_bound,
        members=members,
        non_members=non_members,
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
    )
