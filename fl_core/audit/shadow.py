"""Shadow models (Shokri et al. 2017) and the attack model trained on their outputs.

The auditor trains ``S`` shadow models with the target's own recipe on random halves of a
population of patients the target never trained on (:func:`half_splits`: every population
patient is in exactly half of the shadows). A shadow's outputs on patients it trained on
and on patients it did not teach an attack model what membership looks like; the attack
model then scores the target's outputs. The same shadows serve LiRA as reference models.

For a binary classifier with one logit ``z``, the logit-scaled confidence of the true class
``φ = ln(p_y / (1 − p_y))`` is ``z`` for label 1 and ``−z`` for label 0; the confidence vector
is ``(p_y, 1 − p_y)`` and the loss is ``softplus(−φ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ShadowOutputs:
    """``S`` shadow models' logits on a pool of ``U`` patients, and which each trained on."""

    logits: torch.Tensor  # [S, U]
    labels: torch.Tensor  # [U]
    trained_on: torch.Tensor  # bool [S, U]

    def __post_init__(self) -> None:
        s, u = self.logits.shape
        if self.trained_on.shape != (s, u) or self.labels.shape != (u,):
            raise ValueError(f"shadow outputs disagree: logits {tuple(self.logits.shape)}, "
                             f"trained_on {tuple(self.trained_on.shape)}, labels "
                             f"{tuple(self.labels.shape)}")


def true_class_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``φ = ln(p_y / (1 − p_y))``: ``z`` where the label is 1, ``−z`` where it is 0."""
    return torch.where(labels > 0.5, logits, -logits).double()


def attack_features(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[p_y, 1 − p_y, loss, φ]`` per example: the confidence vector, the loss and the
    logit-scaled confidence of the true class."""
    phi = true_class_logit(logits, labels)
    p = torch.sigmoid(phi)
    return torch.stack([p, 1 - p, nn.functional.softplus(-phi), phi], dim=-1)


def half_splits(n: int, shadows: int, generator: torch.Generator) -> torch.Tensor:
    """``[shadows, n]`` bool: shadow ``s`` trains on example ``j``; each example is in exactly
    ``⌊shadows/2⌋`` shadows (a random half per example, as in LiRA)."""
    if shadows < 2:
        raise ValueError(f"audit.shadow_models={shadows}: at least 2 are needed")
    ranks = torch.rand(shadows, n, generator=generator).argsort(dim=0).argsort(dim=0)
    return ranks < shadows // 2


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Weights (bias last) of an L2-regularised logistic regression, by L-BFGS."""
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(design.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        fit = nn.functional.binary_cross_entropy_with_logits(design @ w, y)
        loss = fit + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def shokri_attack(
    shadows: ShadowOutputs, target_logits: torch.Tensor, target_labels: torch.Tensor
) -> torch.Tensor:
    """Membership scores for the target's examples from an attack model per class.

    The attack model (one logistic regression per label, as Shokri et al. train one per class)
    learns "trained on" from the shadows' features on the population patients; its logit on
    the target's features is the score.
    """
    population = shadows.trained_on.any(dim=0)
    feats = attack_features(shadows.logits[:, population], shadows.labels[population])
    member = shadows.trained_on[:, population].double()
    labels = shadows.labels[population].expand_as(member)
    target = attack_features(target_logits, target_labels)
    scores = torch.zeros(target_logits.shape[0], dtype=torch.float64)
    for cls in (0.0, 1.0):
        rows = labels == cls
        hit = target_labels == cls
        if not bool(rows.any()) or not bool(hit.any()):
            continue
        x = feats[rows]
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        w = _fit_logistic((x - mean) / std, member[rows])
        scores[hit] = ((target[hit] - mean) / std) @ w[:-1] + w[-1]
    return scores
