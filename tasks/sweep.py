"""``fedpriv audit-sweep``: does the audit see more when the model is less private?

For each ε (and without DP) and each seed: partition, train the target with the configured
recipe at that ε, and audit it (:func:`tasks.audit.audit_trained`, the same shadows and
attacks as the pipeline). Reported per ε: the worst-case attack AUC and TPR at 0.1 % FPR
(mean over seeds), the empirical ε lower bound, accuracy, and the Spearman rank correlation
of each with ε (no DP ranks above every finite ε). Writes ``reports/audit_sweep.json``,
``reports/audit_sweep.csv`` and ``reports/audit_sweep.png``. Nothing is registered and the
privacy ledger is not touched: the sweep's models are never released.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fl_core.config import PipelineConfig, load_config
from fl_core.data import FederatedDataLoader
from tasks.audit import audit_trained
from tasks.common import Paths, write_json_atomic
from tasks.plots import audit_sweep_plot
from tasks.train import build_target_model, federate, privacy_summary

DEFAULT_EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 32.0)


def sweep_point(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    """Train and audit one model under ``cfg`` (in memory)."""
    from fl_core.models import set_flat_params

    data, transform, partition = FederatedDataLoader.get(cfg.data, root).partitioned(
        cfg.data, cfg.seed)
    run = federate(cfg, data)
    model, _ = build_target_model(cfg, int(data[0].x_train.shape[1]))
    set_flat_params(model, run.result.params)
    privacy = privacy_summary(cfg, root, partition, None, run)
    report = audit_trained(cfg, root, data, transform, model, privacy)
    report.pop("curves")
    report["accuracy"] = run.result.history[-1].accuracy
    return report


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(set(y)) > 1 else float("nan")


def audit_sweep(
    params: Path, overrides: list[str], root: Path, epsilons: list[float], seeds: int,
) -> dict[str, Any]:
    started = time.perf_counter()
    cap = load_config(params, overrides).privacy.lifetime_epsilon
    # the sweep spends no ledger budget, so the lifetime cap must not stop a large ε
    arms: list[tuple[float, list[str]]] = [
        (e, [f"privacy.epsilon={e}", f"privacy.lifetime_epsilon={max(e, cap)}"])
        for e in epsilons]
    arms.append((math.inf, ["privacy.enabled=false"]))
    rows = []
    for epsilon, arm in arms:
        reports = []
        for seed in range(seeds):
            cfg = load_config(params, [*overrides, *arm, f"seed={seed}"])
            reports.append(sweep_point(cfg, root))
        row = {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "mia_auc": statistics.fmean(r["mia_auc"] for r in reports),
            "mia_auc_sd": statistics.stdev([r["mia_auc"] for r in reports]) if seeds > 1 else 0,
            "mia_tpr_at_0_1pct_fpr": statistics.fmean(r["mia_tpr_at_0_1pct_fpr"]
                                                      for r in reports),
            "mia_advantage": statistics.fmean(r["mia_advantage"] for r in reports),
            "empirical_epsilon_lower_bound": max(r["empirical_epsilon_lower_bound"]
                                                 for r in reports),
            "accuracy": statistics.fmean(r["accuracy"] for r in reports),
            "privacy_consistent": all(r["privacy_consistent"] for r in reports),
            "per_seed_auc": [round(r["mia_auc"], 4) for r in reports],
        }
        rows.append(row)
        label = "no DP" if row["epsilon"] is None else f"ε={epsilon:g}"
        print(f"{label:<8} attack AUC {row['mia_auc']:.3f} ± {row['mia_auc_sd']:.3f}  "
              f"TPR@0.1%FPR {row['mia_tpr_at_0_1pct_fpr']:.3f}  "
              f"ε_lb {row['empirical_epsilon_lower_bound']:.3f}  "
              f"accuracy {row['accuracy']:.3f}", flush=True)
    ranks = list(range(len(rows)))  # ε ascending, no DP last
    return {
        "epsilons": epsilons, "seeds": seeds, "overrides": overrides, "rows": rows,
        "spearman_auc_vs_epsilon": spearman(ranks, [r["mia_auc"] for r in rows]),
        "spearman_tpr_vs_epsilon": spearman(ranks, [r["mia_tpr_at_0_1pct_fpr"] for r in rows]),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_audit_sweep(params: Path, overrides: list[str], root: Path, epsilons: list[float],
                    seeds: int) -> dict[str, Any]:
    """The sweep, its files in ``reports/``, and a Markdown table to print."""
    result = audit_sweep(params, overrides, root, epsilons, seeds)
    paths = Paths.of(load_config(params, overrides), root)
    write_json_atomic(paths.reports / "audit_sweep.json", result)
    fields = ["epsilon", "mia_auc", "mia_auc_sd", "mia_tpr_at_0_1pct_fpr", "mia_advantage",
              "empirical_epsilon_lower_bound", "accuracy"]
    with (paths.reports / "audit_sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "epsilon": r["epsilon"] if r["epsilon"] is not None else "inf"}
                         for r in result["rows"])
    audit_sweep_plot(result["rows"], result["spearman_auc_vs_epsilon"],
                     paths.reports / "audit_sweep.png")
    return result


def sweep_markdown(result: dict[str, Any]) -> str:
    out = ["| ε | attack AUC (worst case) | TPR @ 0.1 % FPR | advantage | ε lower bound | "
           "accuracy |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:g}"
        out.append(f"| {eps} | {r['mia_auc']:.3f} ± {r['mia_auc_sd']:.3f} | "
                   f"{r['mia_tpr_at_0_1pct_fpr']:.3f} | {r['mia_advantage']:.3f} | "
                   f"{r['empirical_epsilon_lower_bound']:.3f} | {r['accuracy']:.3f} |")
    out.append(f"\nSpearman rank correlation with ε: AUC {result['spearman_auc_vs_epsilon']:.2f},"
               f" TPR@0.1%FPR {result['spearman_tpr_vs_epsilon']:.2f}")
    return "\n".join(out)
