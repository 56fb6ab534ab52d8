"""What the DP release of a site's statistics costs in accuracy: |AUC_dp − AUC_exact|.

On the heart data's own split (the configured partition, one client per hospital, seed 0;
148 test patients over four sites) a model is trained centrally on the pooled training rows
(the configured model, SGD, ``rounds × local_epochs`` epochs), then each site releases its
evaluation exactly as the site client does (:class:`~fl_core.federation.messages.EvaluateReply`:
per label a histogram of predicted probabilities in ``privacy.evaluation_bins`` bins, each
patient weighing 1, Gaussian noise σ per cell) and the coordinator computes AUC and accuracy
from the merged noisy histograms (:func:`fl_core.privacy.release.noisy_auc`,
:func:`~fl_core.privacy.release.histogram_figures`). ``--trials`` noise draws per σ give
the error's mean, 95th percentile and the share of draws within the tolerance; the exact
AUC (per-patient scores) and the noise-free binned AUC are reported next to it, and the ε of
one release at each σ (the configured δ and accountant).

The membership audit's release is measured the same way: the loss-threshold attack's scores
of the same model (members: the training patients; non-members: the test patients) mapped
to ``[0, 1]`` as the sites map them, ``privacy.audit_bins`` bins, noise σ per cell at each site.

Run from the project root (writes ``benchmarks/results/dp_statistics.json``)::

    .venv/bin/python benchmarks/dp_statistics.py --out benchmarks/results/dp_statistics.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from report import emit, require_public_dataset  # benchmarks/report.py: the script's own folder

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.audit.federated import loss_to_unit, merge_audit_replies
from fl_core.audit.shadow import true_class_logit
from fl_core.config.model import PipelineConfig
from fl_core.data.tables import ClientData
from fl_core.federation.messages import AuditReply, EvaluateReply
from fl_core.federation.site_client import LocalTrainingConfig, train_local
from fl_core.model.metrics import roc_auc
from fl_core.model.networks import build_model
from fl_core.privacy.accountants import epsilon_for_history
from fl_core.privacy.randomness import SeededRandom
from fl_core.privacy.release import (
    EvaluationRelease,
    audit_history,
    evaluation_history,
    histogram_figures,
    noisy_auc,
    statistics_epsilon,
)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.1  # |AUC_dp − AUC_exact| the gate's AUC is stated to within (≥ 95 % of draws)
EVAL_SIGMAS = (0.0, 1.0, 2.0, 2.5, 3.0, 4.0, 6.0)
AUDIT_SIGMAS = (0.0, 2.0, 3.0, 4.0, 5.0, 8.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _train(cfg: PipelineConfig, data: list[ClientData]) -> torch.nn.Module:
    model = build_model(cfg.model, int(data[0].x_train.shape[1]),
                        hidden_units=cfg.hidden_units, seed=cfg.seed)
    sgd = LocalTrainingConfig(local_epochs=cfg.rounds * cfg.local_epochs,
                              batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                              seed=cfg.seed)
    train_local(model, torch.cat([d.x_train for d in data]),
                torch.cat([d.y_train for d in data]), sgd, cfg.seed)
    model.eval()
    return model


def _errors(values: list[float], exact: float) -> dict[str, Any]:
    """Error figures over the draws; a draw whose figure is undefined (a noisy class total
    ≤ 0: NaN) counts as an error of 1."""
    errors = sorted(abs(v - exact) if math.isfinite(v) else 1.0 for v in values)
    return {"undefined": sum(not math.isfinite(v) for v in values),
            "mean_abs_error": round(statistics.fmean(errors), 4),
            "p95_abs_error": round(errors[int(0.95 * (len(errors) - 1))], 4),
            "within_tolerance": round(sum(e <= TOLERANCE for e in errors) / len(errors), 4)}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(statistics.fmean(finite), 4) if finite else None


def evaluation_arm(cfg: PipelineConfig, model: torch.nn.Module, data: list[ClientData],
                   trials: int) -> dict[str, Any]:
    with torch.no_grad():
        logits = [model(d.x_test).view(-1) for d in data]
    labels = [d.y_test for d in data]
    exact_auc = roc_auc(torch.cat(logits), torch.cat(labels))
    exact_acc = float(((torch.cat(logits) > 0).float() == torch.cat(labels)).float().mean())
    bins, p = cfg.privacy.evaluation_bins, cfg.privacy
    rows = []
    for sigma in EVAL_SIGMAS:
        release = EvaluationRelease(bins=bins, noise=sigma)
        aucs, accs = [], []
        for trial in range(trials if sigma > 0 else 1):
            merged = sum(EvaluateReply.from_logits(
                d.client_id, 1, lg, y, d.test_patient_ids(), release=release,
                random=SeededRandom(trial, (d.client_id,))).histogram
                for d, lg, y in zip(data, logits, labels, strict=True))
            aucs.append(noisy_auc(merged))
            accs.append(histogram_figures(merged).accuracy)
        rows.append({
            "sigma": sigma,
            "epsilon_one_release": round(epsilon_for_history(
                evaluation_history(sigma, 1), p.delta, p.accountant), 4) if sigma else None,
            "auc_mean": _mean(aucs), "auc": _errors(aucs, exact_auc),
            "accuracy_mean": _mean(accs),
            "accuracy": _errors(accs, exact_acc)})
    return {"bins": bins, "test_patients": int(sum(len(y) for y in labels)),
            "auc_exact": round(exact_auc, 4), "accuracy_exact": round(exact_acc, 4),
            "by_sigma": rows}


def audit_arm(cfg: PipelineConfig, model: torch.nn.Module, data: list[ClientData],
              trials: int) -> dict[str, Any]:
    p, bins = cfg.privacy, cfg.privacy.audit_bins
    scores = []
    with torch.no_grad():
        for d in data:
            member = -torch.nn.functional.softplus(-true_class_logit(model(d.x_train), d.y_train))
            other = -torch.nn.functional.softplus(-true_class_logit(model(d.x_test), d.y_test))
            scores.append((member, other))
    members = torch.cat([m for m, _ in scores])
    others = torch.cat([o for _, o in scores])
    exact = roc_auc(torch.cat([members, others]),
                    torch.cat([torch.ones(len(members)), torch.zeros(len(others))]))
    rows = []
    for sigma in AUDIT_SIGMAS:
        aucs = []
        for trial in range(trials if sigma > 0 else 1):
            replies = [AuditReply.from_unit_scores(
                d.client_id, 1, {"loss_threshold": (loss_to_unit(m), loss_to_unit(o))},
                bins=bins, noise=sigma, random=SeededRandom(trial, ("audit", d.client_id)))
                for d, (m, o) in zip(data, scores, strict=True)]
            aucs.append(merge_audit_replies(replies, delta=p.delta)[0].auc)
        rows.append({
            "sigma": sigma,
            "epsilon_one_release": round(epsilon_for_history(
                audit_history(sigma), p.delta, p.accountant), 4) if sigma else None,
            "auc_mean": _mean(aucs), "auc": _errors(aucs, exact)})
    return {"bins": bins, "members": len(members), "non_members": len(others),
            "attack": "loss_threshold", "auc_exact": round(exact, 4), "by_sigma": rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.params, args.overrides)
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    torch.set_num_threads(1)
    data, _, _ = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, 0)
    model = _train(cfg, data)
    result = {
        "command": " ".join(["benchmarks/dp_statistics.py", *(
            f"--set {o}" for o in args.overrides), f"--trials {args.trials}"]),
        "defaults": {"evaluation_noise": cfg.privacy.evaluation_noise,
                     "evaluation_bins": cfg.privacy.evaluation_bins,
                     "audit_noise": cfg.privacy.audit_noise, "audit_bins": cfg.privacy.audit_bins,
                     "statistics_epsilon_simulation": round(statistics_epsilon(cfg), 4),
                     "statistics_epsilon_sites": round(statistics_epsilon(cfg.model_copy(
                         update={"federation": cfg.federation.model_copy(
                             update={"mode": "sites"})})), 4)},
        "tolerance": TOLERANCE, "trials": args.trials, "model": cfg.model,
        "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
        "evaluation": evaluation_arm(cfg, model, data, args.trials),
        "audit": audit_arm(cfg, model, data, args.trials),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
