"""Classification metrics over torch tensors (no sklearn on the hot path)."""

from __future__ import annotations

import torch


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1).

    Ties in ``scores`` are treated as one threshold, so the curve is exact for tied scores.
    """
    scores = scores.detach().double().reshape(-1)
    labels = labels.detach().double().reshape(-1)
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order]
    tps = torch.cumsum(y, 0)
    fps = torch.cumsum(1 - y, 0)
    # keep the last index of every run of equal scores
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tps, fps = tps[last], fps[last]
    p, n = y.sum(), (1 - y).sum()
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tps / p.clamp_min(1)])
    fpr = torch.cat([zero, fps / n.clamp_min(1)])
    return fpr, tpr


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoidal; equals the Mann–Whitney U statistic / (P·N)).

    Returns NaN when only one class is present, where AUC is undefined.
    """
    labels = labels.reshape(-1)
    if labels.numel() == 0 or labels.min() == labels.max():
        return float("nan")
    fpr, tpr = roc_curve(scores, labels)
    return float(torch.trapezoid(tpr, fpr))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correct predictions at the 0.5 probability (logit 0) threshold."""
    if labels.numel() == 0:
        return float("nan")
    return float(((logits > 0).float() == labels.reshape(-1).float()).float().mean())


def balanced_accuracy(tp: int, fp: int, tn: int, fn: int) -> float:
    """Mean of sensitivity and specificity from confusion counts (at whatever threshold they
    were taken); NaN when a class is absent. Always answering the majority class scores 0.5,
    whatever the prevalence (accuracy would score the majority's share)."""
    if tp + fn == 0 or tn + fp == 0:
        return float("nan")
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def histogram_auc(histogram: torch.Tensor) -> float:
    """AUC from per-label score histograms ``[2, bins]`` (row 0: negatives, row 1: positives),
    bins in increasing score order: ``Σ_b pos_b · (neg_below_b + ½ neg_b) / (P·N)``.

    The Mann–Whitney statistic with every positive–negative pair that shares a bin counted as
    a tie (½); it equals the exact AUC when no such pair exists. NaN with one class only (or,
    for a noisy histogram, a class whose total is not positive).
    """
    neg, pos = histogram.double()[0], histogram.double()[1]
    p, n = float(pos.sum()), float(neg.sum())
    if p <= 0 or n <= 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg
    return float((pos * (below + 0.5 * neg)).sum()) / (p * n)
