"""An empirical lower bound on ε from a membership attack's errors.

If a mechanism is (ε, δ)-DP, every membership test on it satisfies (Kairouz et al. 2015)

    FPR + e^ε · FNR ≥ 1 − δ    and    FNR + e^ε · FPR ≥ 1 − δ,

so an attack that achieves (FPR, FNR) proves ε ≥ ln((1 − δ − FNR) / FPR) and the symmetric
term. With finitely many members and non-members the rates are estimates; replacing each by
its one-sided Clopper–Pearson upper bound makes the statement hold with the stated confidence
(Jagielski et al. 2020, Nasr et al. 2021). The bound is the maximum over the attack's ``T``
thresholds, and each threshold uses two upper bounds (FPR⁺ and FNR⁺): to keep the stated
confidence for the maximum, each of the ``2T`` one-sided bounds is taken at level
``1 − (1 − confidence)/(2T)`` (Bonferroni; a lower, safer ε_lb).

**Independence assumption.** Clopper–Pearson treats the membership guesses as independent
Bernoulli trials with a common error rate: each evaluated member's and non-member's guess
must be correct independently of the others given the trained model. That holds when the
evaluated patients are drawn independently (as here: a random balanced sample of members and
the held-out non-members) and the model is fixed; it is an assumption, not something this
module can check, and it does not hold across patients whose records are linked.
"""

from __future__ import annotations

import math

import torch

from fl_core.config.model import AuditConfig

CONFIDENCE: float = AuditConfig.model_fields["confidence"].default
"""A bound's confidence unless the caller gives ``audit.confidence``: that key's default,
read from the config model (its one place)."""


def clopper_pearson_upper(errors: torch.Tensor, trials: int, alpha: float) -> torch.Tensor:
    """One-sided ``1 − alpha`` upper confidence bound on a rate observed as errors/trials."""
    from scipy.stats import beta

    k = errors.detach().double().cpu().numpy()
    upper = beta.ppf(1.0 - alpha, k + 1, trials - k)
    upper[k >= trials] = 1.0
    return torch.from_numpy(upper)


def epsilon_lower_bound_at(
    false_positives: torch.Tensor, negatives: int, false_negatives: torch.Tensor,
    positives: int, delta: float, alpha: float,
) -> torch.Tensor:
    """``max(ln((1−δ−FNR⁺)/FPR⁺), ln((1−δ−FPR⁺)/FNR⁺), 0)`` per threshold, ``⁺`` = upper bound."""
    fpr = clopper_pearson_upper(false_positives, negatives, alpha)
    fnr = clopper_pearson_upper(false_negatives, positives, alpha)
    one = torch.ones((), dtype=torch.float64)

    def term(numerator_rate: torch.Tensor, denominator_rate: torch.Tensor) -> torch.Tensor:
        numerator = one - delta - numerator_rate
        ratio = numerator / denominator_rate.clamp(min=1e-300)
        return torch.where(numerator > 0, torch.log(ratio.clamp(min=1e-300)),
                           torch.full_like(ratio, -math.inf))

    return torch.maximum(torch.maximum(term(fnr, fpr), term(fpr, fnr)), torch.zeros_like(fpr))


def empirical_epsilon_lower_bound(
    scores: torch.Tensor, is_member: torch.Tensor, delta: float,
    confidence: float = CONFIDENCE,
) -> float:
    """ε that the attack ``scores`` prove with ``confidence`` (0 when they prove nothing).

    Every distinct score is a threshold ("member if score ≥ t"); the rates at each come from
    the ROC counts.
    """
    scores = scores.detach().double().reshape(-1)
    labels = is_member.detach().double().reshape(-1)
    positives, negatives = int(labels.sum()), int((1 - labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("the bound needs at least one member and one non-member")
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order]
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    true_pos = torch.cumsum(y, 0)[last]
    false_pos = torch.cumsum(1 - y, 0)[last]
    return epsilon_lower_bound_from_counts(true_pos, false_pos, positives, negatives, delta,
                                           confidence)


def epsilon_lower_bound_from_counts(
    true_pos: torch.Tensor, false_pos: torch.Tensor, positives: int, negatives: int,
    delta: float, confidence: float = CONFIDENCE,
) -> float:
    """ε that an attack proves with ``confidence`` from its ROC counts alone: ``true_pos[t]``
    members and ``false_pos[t]`` non-members called "member" at each of its ``T`` thresholds
    (Bonferroni over the ``2T`` one-sided bounds). Histograms merged from several sites give
    these counts without any per-patient score (:mod:`fl_core.audit.federated`)."""
    if positives == 0 or negatives == 0:
        raise ValueError("the bound needs at least one member and one non-member")
    alpha = (1.0 - confidence) / (2 * max(int(true_pos.numel()), 1))  # 2 bounds per threshold
    bounds = epsilon_lower_bound_at(false_pos.double(), negatives,
                                    positives - true_pos.double(), positives, delta, alpha)
    return float(bounds.max())
