"""``fedpriv audit-sweep``: does the audit see more when the model is less private?

For each ε and each seed: partition, train the target with the configured recipe at that ε,
and audit it (:func:`adapters.audit.audit_trained`, the same shadows and attacks as the
pipeline). Reported per ε: the worst-case attack AUC and TPR at 0.1 % FPR (mean over seeds),
the empirical ε lower bound, accuracy, and the Spearman rank correlation of each with ε (the
largest ε is the sweep's reference; there is no "no DP" arm: training on real patients without
DP could not be accounted). Writes ``reports/audit_sweep.json``, ``reports/audit_sweep.csv``
and ``reports/audit_sweep.png``. Nothing is registered.

**Every arm × seed trains on the configured patients, so each is a ledger charge** (kind
``audit-sweep``, its own ``(σ, q, steps)`` history). Before anything is trained the whole
sweep is planned and checked against the ledger as one composition
(:func:`plan_sweep`); a sweep the lifetime cap cannot cover is refused, naming what it would
spend per site and the ``privacy.lifetime_epsilon`` that would allow it. Each point is charged
right after it trains. The audit's shadow models are not charged (see :mod:`adapters.audit`).
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Any

from adapters.accounting import charge_and_summarise, open_ledger, plan_charge, with_statistics
from adapters.artifacts import Paths, write_json_atomic
from adapters.audit import audit_trained
from adapters.plots import audit_sweep_plot
from adapters.tables import ClinicalTable
from fl_core.config.model import PipelineConfig
from fl_core.config.overrides import validate_config
from fl_core.federation.wiring import build_target_model, federate, make_dpsgd
from fl_core.privacy.accounting import KIND_AUDIT_SWEEP
from fl_core.privacy.ledger import BudgetExceededError, Charge, SiteNeed, new_run_id

# 3 ε × 2 seeds = 6 charges: a patient in all of them spends ε = 3.14 composed (prv, default
# recipe, δ = 6e-5; 7 summed), a third of the default lifetime cap of 10
DEFAULT_EPSILONS = (0.5, 1.0, 2.0)
DEFAULT_SEEDS = 2


def arm_config(base: PipelineConfig, epsilon: float, seed: int) -> PipelineConfig:
    """One sweep point's configuration, derived from the sweep's own: DP-SGD at ``epsilon``,
    the partition of ``seed``."""
    privacy: dict[str, Any] = {"enabled": True, "epsilon": epsilon}
    # an ε above the cap would fail the config's own check; the sweep plan refuses it with
    # what the sweep needs instead, so it never trains (and never charges more than the cap)
    if epsilon > base.privacy.lifetime_epsilon:
        privacy["lifetime_epsilon"] = epsilon
    arm = base.model_copy(update={"seed": seed,
                                  "privacy": base.privacy.model_copy(update=privacy)})
    # model_copy runs no validator: the checks a --set would get (ε in range, within the cap)
    validate_config(arm.dumped(), f"audit-sweep (ε={epsilon:g}, seed={seed})")
    return arm


def plan_sweep(
    base: PipelineConfig, root: Path, epsilons: list[float], seeds: int,
) -> list[SiteNeed]:
    """Refuse (:class:`BudgetExceededError`) unless the ledger can pay for the whole sweep.

    Every (ε, seed) point is one planned charge; all of them and the ledger's history are
    composed per patient (:meth:`PrivacyLedger.check`). Returns what it needs per site.
    """
    cap = base.privacy.lifetime_epsilon
    planned: list[Charge] = []
    for epsilon in epsilons:
        for seed in range(seeds):
            cfg = arm_config(base, epsilon, seed)
            data, _, partition = ClinicalTable.get(cfg.data, root).partitioned(
                cfg.data, cfg.seed)
            point = plan_charge(cfg, root, partition, dp=make_dpsgd(cfg=cfg, data=data),
                                kind=KIND_AUDIT_SWEEP)
            planned += with_statistics(cfg, root, partition, point)
    ledger = open_ledger(base, root)
    needs = ledger.check(planned, math.inf)
    needed = max((n.total.tight_epsilon for n in needs), default=0.0)
    if needed > cap + 1e-9 or max(epsilons) > cap:
        least = max(needed, max(epsilons))  # no single run may exceed the cap either
        raise BudgetExceededError(_refusal(needs, cap, ledger.path, len(planned), least), least)
    return needs


def _refusal(needs: list[SiteNeed], cap: float, ledger: Path, points: int, least: float) -> str:
    per_site = "; ".join(
        f"{n.site}: the sweep alone ε={n.planned_tight:.3g} composed ({n.planned_basic:.3g} "
        f"summed), with the ledger ε={n.total.tight_epsilon:.3g} composed "
        f"({n.total.basic_epsilon:.3g} summed, δ={n.total.basic_delta:.2g})" for n in needs)
    allow = math.ceil(least * 100) / 100
    return (
        f"audit-sweep refused: its {points} trainings on real patients would take the "
        f"most-exposed patient past privacy.lifetime_epsilon={cap:g} (ledger {ledger}). "
        f"It would spend, per site (worst patient): {per_site}. Nothing was trained. "
        f"--set privacy.lifetime_epsilon={allow:g} would allow it (a policy decision: that "
        f"budget is then spent for these patients); or sweep fewer/smaller --epsilons or "
        f"fewer --seeds")


def sweep_point(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    """Train one model under ``cfg``, charge the ledger for it, and audit it (in memory)."""
    from fl_core.model.networks import set_flat_params

    data, transform, partition = ClinicalTable.get(cfg.data, root).partitioned(
        cfg.data, cfg.seed)
    run = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
    privacy = charge_and_summarise(cfg, root, partition, run, new_run_id(), KIND_AUDIT_SWEEP)
    model, _ = build_target_model(cfg, int(data[0].x_train.shape[1]))
    set_flat_params(model, run.result.params)
    report, _ = audit_trained(cfg, root, data, transform, model, privacy)
    return {**report.to_dict(), "accuracy": run.result.history[-1].accuracy,
            "ledger_run_id": privacy.ledger_run_id}


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    # undefined when either side is constant (e.g. a one-ε sweep)
    return float(spearmanr(x, y).statistic) if min(len(set(x)), len(set(y))) > 1 \
        else float("nan")


def _sweep_row(epsilon: float, reports: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    """One ε's row: the seeds' reports averaged (sd of the AUC, the largest ε lower bound)."""
    return {
        "epsilon": epsilon,
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
        "ledger_run_ids": [r["ledger_run_id"] for r in reports],
    }


def audit_sweep(
    base: PipelineConfig, overrides: list[str], root: Path, epsilons: list[float], seeds: int,
) -> dict[str, Any]:
    """Plan (refuse if unaffordable), then train, charge and audit every (ε, seed) point of
    ``base`` (the configuration ``overrides`` gave, recorded in the result)."""
    started = time.perf_counter()
    epsilons = sorted(set(epsilons))
    needs = plan_sweep(base, root, epsilons, seeds)
    rows = []
    for epsilon in epsilons:
        reports = [sweep_point(arm_config(base, epsilon, seed), root)
                   for seed in range(seeds)]
        row = _sweep_row(epsilon, reports, seeds)
        rows.append(row)
        print(f"ε={epsilon:<6g} attack AUC {row['mia_auc']:.3f} ± {row['mia_auc_sd']:.3f}  "
              f"TPR@0.1%FPR {row['mia_tpr_at_0_1pct_fpr']:.3f}  "
              f"ε_lb {row['empirical_epsilon_lower_bound']:.3f}  "
              f"accuracy {row['accuracy']:.3f}", flush=True)
    return {
        "epsilons": epsilons, "seeds": seeds, "overrides": overrides, "rows": rows,
        "spearman_auc_vs_epsilon": spearman(epsilons, [r["mia_auc"] for r in rows]),
        "spearman_tpr_vs_epsilon": spearman(epsilons,
                                            [r["mia_tpr_at_0_1pct_fpr"] for r in rows]),
        "ledger_charged": {n.site: {"planned_tight_epsilon": n.planned_tight,
                                    "planned_basic_epsilon": n.planned_basic,
                                    "total_tight_epsilon": n.total.tight_epsilon}
                           for n in needs},
        "seconds": round(time.perf_counter() - started, 1),
    }


def run_audit_sweep(cfg: PipelineConfig, overrides: list[str], root: Path,
                    epsilons: list[float], seeds: int) -> dict[str, Any]:
    """The sweep of ``cfg`` (parsed with ``overrides``), its files in ``reports/``, and a
    Markdown table to print."""
    result = audit_sweep(cfg, overrides, root, epsilons, seeds)
    paths = Paths.of(cfg, root)
    write_json_atomic(paths.reports / "audit_sweep.json", result)
    fields = ["epsilon", "mia_auc", "mia_auc_sd", "mia_tpr_at_0_1pct_fpr", "mia_advantage",
              "empirical_epsilon_lower_bound", "accuracy"]
    with (paths.reports / "audit_sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(result["rows"])
    audit_sweep_plot(result["rows"], result["spearman_auc_vs_epsilon"],
                     paths.reports / "audit_sweep.png")
    return result


def sweep_markdown(result: dict[str, Any]) -> str:
    out = ["| ε | attack AUC (worst case) | TPR @ 0.1 % FPR | advantage | ε lower bound | "
           "accuracy |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['epsilon']:g} | {r['mia_auc']:.3f} ± {r['mia_auc_sd']:.3f} | "
                   f"{r['mia_tpr_at_0_1pct_fpr']:.3f} | {r['mia_advantage']:.3f} | "
                   f"{r['empirical_epsilon_lower_bound']:.3f} | {r['accuracy']:.3f} |")
    out.append(f"\nSpearman rank correlation with ε: AUC {result['spearman_auc_vs_epsilon']:.2f},"
               f" TPR@0.1%FPR {result['spearman_tpr_vs_epsilon']:.2f} (reference: the "
               f"largest ε; every point was charged to the privacy ledger)")
    return "\n".join(out)
