"""The likelihood-ratio attack (LiRA, Carlini et al. 2022) with the shadows as references.

For each example the logit-scaled confidence ``φ`` under models that did not train on it
("out") is close to Gaussian; so is ``φ`` under models that did ("in").

* **offline**: only out-models are needed. Score ``(φ_target − μ_out) / σ_out``, the one-sided
  test of "φ is higher than an out-model would give" (monotone in its p-value).
* **online**: ``log N(φ_target; μ_in, σ_in²) − log N(φ_target; μ_out, σ_out²)``; needs in- and
  out-models for every example, i.e. shadows that trained on the target's own members.

Means are per example; variances are pooled over examples (LiRA's "global variance"), which
is the stable choice with a handful of shadows.
"""

from __future__ import annotations

import torch

from fl_core.audit.shadow import ShadowOutputs, true_class_logit


def _per_example_gaussian(
    phi: torch.Tensor, mask: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    counts = mask.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(f"LiRA: {int((counts == 0).sum())} example(s) have no {what}-model")
    m = mask.double()
    mean = (phi * m).sum(0) / counts
    residual = (phi - mean) * m
    dof = max(int(counts.sum()) - phi.shape[1], 1)
    std = torch.sqrt((residual**2).sum() / dof).clamp(min=1e-6)
    return mean, std


def lira_offline(
    shadows: ShadowOutputs, target_logits: torch.Tensor, pool_index: torch.Tensor
) -> torch.Tensor:
    """Offline LiRA scores for target examples at ``pool_index`` of the shadows' pool."""
    phi = true_class_logit(shadows.logits[:, pool_index], shadows.labels[pool_index])
    out = equal_out_models(~shadows.trained_on[:, pool_index])
    mean, std = _per_example_gaussian(phi, out, "out")
    target = true_class_logit(target_logits, shadows.labels[pool_index])
    return (target - mean) / std


def equal_out_models(out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``out`` (``[shadows, examples]``) cut to the same number of out-models per example:
    ``k`` of each example's out-models drawn at random (``k`` the smallest count over the
    examples; a fixed ``seed``, drawn independently of membership).

    Members the shadows never train on have all ``S`` shadows as out-models, population
    patients only ``≈ S/2``: their ``μ_out`` would be estimated from twice as many models, so
    the score's spread would differ by membership through the audit's own design, not the
    target (non-members crowd both tails, and the ε lower bound reports a "privacy failure"
    that the target did not cause). The kept models must be a random subset per example: the
    same ``k`` shadows for every member would carry those shadows' own offsets into every
    member's score. With equal counts of uniformly drawn shadows the score depends on
    membership only through the target's output."""
    if out.numel() == 0:
        return out
    k = int(out.sum(0).min())
    keys = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed))
    keys = keys.masked_fill(~out, 2.0)  # not an out-model: never among the k smallest
    rank = keys.argsort(0).argsort(0)
    return out & (rank < k)


def lira_online(
    shadows: ShadowOutputs, target_logits: torch.Tensor, pool_index: torch.Tensor
) -> torch.Tensor:
    """Online LiRA scores (log-likelihood ratio in / out) for target examples."""
    phi = true_class_logit(shadows.logits[:, pool_index], shadows.labels[pool_index])
    trained = shadows.trained_on[:, pool_index]
    mu_in, sd_in = _per_example_gaussian(phi, trained, "in")
    mu_out, sd_out = _per_example_gaussian(phi, ~trained, "out")
    target = true_class_logit(target_logits, shadows.labels[pool_index])
    log_in = torch.distributions.Normal(mu_in, sd_in).log_prob(target)
    log_out = torch.distributions.Normal(mu_out, sd_out).log_prob(target)
    return log_in - log_out
