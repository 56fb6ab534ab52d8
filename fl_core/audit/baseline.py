"""The loss-threshold attack (Yeom et al. 2018): a low loss means "member". No shadows."""

from __future__ import annotations

import torch
from torch import nn

from fl_core.audit.report import AttackReport, attack_report


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")


def balanced_indices(
    n_members: int, n_non_members: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equally many members and non-members, the larger side subsampled at random."""
    n = min(n_members, n_non_members)
    if n == 0:
        raise ValueError("the audit needs at least one member and one non-member")
    return (torch.randperm(n_members, generator=generator)[:n],
            torch.randperm(n_non_members, generator=generator)[:n])


def loss_threshold_attack(
    model: nn.Module,
    x_members: torch.Tensor, y_members: torch.Tensor,
    x_non_members: torch.Tensor, y_non_members: torch.Tensor,
    seed: int = 0, delta: float = 1e-5,
) -> AttackReport:
    """Run the loss-threshold attack on balanced members / non-members."""
    m_idx, o_idx = balanced_indices(len(y_members), len(y_non_members),
                                    torch.Generator().manual_seed(seed))
    scores = -torch.cat([
        per_example_loss(model, x_members[m_idx], y_members[m_idx]),
        per_example_loss(model, x_non_members[o_idx], y_non_members[o_idx]),
    ])
    is_member = torch.cat([torch.ones(len(m_idx)), torch.zeros(len(o_idx))])
    return attack_report("loss_threshold", scores, is_member, delta)
