"""Membership-inference audit of a trained model.

Baseline attack (Yeom et al. 2018): a record is guessed to be a training member when the
model's loss on it is low. The attack score is ``-loss``; members are the training records,
non-members the held-out test records, balanced by subsampling the larger side (seeded).

Reported: AUC-ROC of the score, the best balanced attack accuracy over thresholds, and TPR at
1 % and 0.1 % FPR read off the exact ROC curve. A 0.1 % FPR needs ≥ 1000 non-members to mean
anything; below that the figure is the TPR at the smallest FPR the data can resolve (0), which
is reported as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fl_core.metrics import roc_auc, roc_curve


@dataclass(frozen=True)
class AuditResult:
    attack: str
    mia_auc: float
    mia_attack_accuracy: float
    mia_tpr_at_1pct_fpr: float
    mia_tpr_at_0_1pct_fpr: float
    members: int
    non_members: int
    fpr: list[float]
    tpr: list[float]

    def metrics(self) -> dict[str, float]:
        d = asdict(self)
        return {k: d[k] for k in ("mia_auc", "mia_attack_accuracy",
                                  "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr")}


def tpr_at_fpr(fpr: torch.Tensor, tpr: torch.Tensor, max_fpr: float) -> float:
    """Highest TPR among thresholds whose FPR is at most ``max_fpr``."""
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if bool(ok.any()) else 0.0


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")


def loss_threshold_attack(
    model: nn.Module,
    x_members: torch.Tensor, y_members: torch.Tensor,
    x_non_members: torch.Tensor, y_non_members: torch.Tensor,
    seed: int = 0,
) -> AuditResult:
    """Run the loss-threshold attack on balanced members / non-members."""
    generator = torch.Generator().manual_seed(seed)
    n = min(len(y_members), len(y_non_members))
    if n == 0:
        raise ValueError("the audit needs at least one member and one non-member")
    m_idx = torch.randperm(len(y_members), generator=generator)[:n]
    o_idx = torch.randperm(len(y_non_members), generator=generator)[:n]
    scores = -torch.cat([
        per_example_loss(model, x_members[m_idx], y_members[m_idx]),
        per_example_loss(model, x_non_members[o_idx], y_non_members[o_idx]),
    ])
    is_member = torch.cat([torch.ones(n), torch.zeros(n)])
    fpr, tpr = roc_curve(scores, is_member)
    # balanced accuracy at threshold t is (TPR + 1 - FPR) / 2
    best_acc = float(((tpr + 1 - fpr) / 2).max())
    return AuditResult(
        attack="loss_threshold",
        mia_auc=roc_auc(scores, is_member),
        mia_attack_accuracy=best_acc,
        mia_tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01),
        mia_tpr_at_0_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
        members=n,
        non_members=n,
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
    )
