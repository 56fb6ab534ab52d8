"""Utility on a panel of public clinical tables: pooled vs local-only vs federated (± DP).

The anchor is FLamby's cross-silo practice: per task, a pooled model (what a single data
warehouse would get), local-only models (what one hospital gets alone) and the federation, all
scored on the same test patients. For each table of :data:`TABLES` and each seed 0..N-1 the
table is partitioned exactly as the pipeline partitions it (``data.partition`` of the config,
by default one client per site, a stratified 80/20 train/test split per client by patient;
``seed`` = the run seed) and encoded with the pipeline's declared transform
(:class:`fl_core.data.transform.TabularTransform`: nothing fitted on patients). On that one
split:

* ``pooled``     scikit-learn ``LogisticRegression`` (C=1, lbfgs, max_iter 1000) on every
                 client's training rows pooled: the utility bar.
* ``local``      per site, the same model on that site's training rows alone; the figure is the
                 mean over sites (a site whose training rows hold one class is skipped and
                 listed: no classifier can be fitted there).
* ``federated``  fedpriv's federated training as the train stage wires it
                 (:func:`fl_core.federation.wiring.federate`: the config's model, rounds, step
                 sizes, compression, robust rule, anomaly detection), ``privacy.enabled=false``.
* ``dp_eps1`` / ``dp_eps4``  the same with DP-SGD at ε = 1 / 4 (``privacy.randomness=
                 reproducible``: seeded noise, so a panel can be re-run figure for figure).
* ``dp_eps100``  (only with ``--arms``) the DP recipe at ε = 100, next to no noise: the AUC
                 that clipping and the DP step size leave, apart from the noise.

Every arm's AUC is computed exactly from its predictions on the pooled test rows
(:func:`fl_core.model.metrics.roc_auc`), not from the noisy evaluation histogram the
federation releases; its 95 % interval is Hanley–McNeil's
(:func:`fl_core.audit.confidence.hanley_mcneil_variance`, on the test rows' class counts, scaled
to the number of test patients where a patient has several rows). Across seeds: mean and
sample sd of the AUC, and the seeds' mean interval. The benchmark is not charged to any
ledger: the tables are public (:func:`report.require_public_dataset`); a table whose CSV is
missing is exported from the optional extra ``datasets`` first (``data/raw/<name>.csv``, not
committed).

Run from the project root::

    .venv/bin/python benchmarks/utility_panel.py --out benchmarks/results/utility_panel.json
    .venv/bin/python benchmarks/utility_panel.py --tables heart,nwtco --seeds 1 \\
        --set rounds=50 --set compression.enabled=false --arms pooled,federated

JSON on stdout (and ``--out``); the panel as a Markdown table and progress lines on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import (  # benchmarks/report.py
    emit,
    environment,
    json_number,
    require_public_dataset,
    seed_summary,
)
from sklearn.linear_model import LogisticRegression

from adapters.config_files import load_config
from adapters.datasets import DatasetUnavailableError, export_dataset
from adapters.tables import ClinicalTable
from fl_core.audit.confidence import hanley_mcneil_variance, normal_quantile
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.data.tables import ClientData, DataError
from fl_core.federation.wiring import build_target_model, federate, make_dpsgd
from fl_core.model.metrics import roc_auc
from fl_core.model.networks import set_flat_params

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("pooled", "local", "federated", "dp_eps1", "dp_eps4")  # the default panel
_DP = ("privacy.enabled=true", "privacy.randomness=reproducible")
FEDERATED_ARMS: dict[str, tuple[str, ...]] = {
    "federated": ("privacy.enabled=false",),
    "dp_eps1": (*_DP, "privacy.epsilon=1"),
    "dp_eps4": (*_DP, "privacy.epsilon=4"),
    # on request (--arms): the DP recipe with next to no noise, so that what clipping and the
    # DP step size cost is told apart from what the noise costs
    "dp_eps100": (*_DP, "privacy.epsilon=100", "privacy.lifetime_epsilon=100"),
}
ALL_ARMS = (*ARMS, "dp_eps100")
CONFIDENCE = 0.95  # two-sided interval of each AUC


@dataclass(frozen=True)
class Table:
    """One table of the panel: the config overrides that select it (schema, data, cleaning)
    and the dataset ``fedpriv dataset export`` writes when its CSV is missing (None: shipped)."""

    overrides: tuple[str, ...] = ()
    export: str | None = None

    def data_path(self) -> str:
        for item in self.overrides:
            if item.startswith("data.path="):
                return item.split("=", 1)[1]
        return "data/raw/heart_disease_uci.csv"


def _exported(name: str, *extra: str) -> Table:
    return Table((f"data.schema=data/schemas/{name}.yaml", f"data.path=data/raw/{name}.csv",
                  *extra), export=name)


# per-table overrides of params.yaml; the recipe (rounds, step sizes, ...) stays the config's
TABLES: dict[str, Table] = {
    "heart": Table(),
    # payor_group/patient_class empty on ~46 % of tests: kept with their declared fill
    "covid_testing": _exported("covid_testing", "data.drop_incomplete=false"),
    # two studies (NWTS-3, NWTS-4) as two sites
    "nwtco": _exported("nwtco"),
    # two cohorts (Rotterdam, GBSG-2) as two sites
    "breast_cohorts": _exported("breast_cohorts"),
    # four clinics; a first pregnancy has no pregnancy history (declared fills stand in)
    "opt": _exported("opt", "data.drop_incomplete=false"),
    # one trial, two records per patient: three clients by patient (no centre column)
    "colon": _exported("colon", "data.partition=by_patient", "data.num_clients=3"),
    # the sample year as the site; creatinine empty for 17 % (declared fill)
    "flchain": _exported("flchain", "data.drop_incomplete=false"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pooled / local-only / federated / DP AUC with 95 %% intervals on a panel "
        "of public tables, same patient split, several seeds. JSON on stdout, table on stderr.")
    parser.add_argument("--tables", default=",".join(TABLES),
                        help=f"comma-separated tables (default: all: {','.join(TABLES)})")
    parser.add_argument("--seeds", type=int, default=3, metavar="N",
                        help="run seeds 0..N-1, one patient split each (default: 3)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms (default: {','.join(ARMS)}; also "
                        f"dp_eps100: the DP recipe with next to no noise)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="configuration file (default: params.yaml of the project)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key on every table, as `fedpriv run --set` "
                        "(repeatable); data.* and schema.* keys change the split/encoding "
                        "of every arm, the rest the fedpriv arms")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    bad = [a for a in args.arms if a not in ALL_ARMS]
    if bad:
        parser.error(f"unknown arm(s) {bad}; known: {', '.join(ALL_ARMS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ figures
def auc_interval(auc: float, labels: torch.Tensor,
                 patients: int | None = None) -> tuple[float, float]:
    """Two-sided Hanley–McNeil interval of ``auc`` on test rows ``labels`` (NaN if undefined).

    With several records per patient the rows are not independent: the class counts are
    scaled to ``patients`` test patients (the interval of as many independent rows as there
    are patients), not taken at their row counts, which would make it too narrow."""
    if not math.isfinite(auc):
        return math.nan, math.nan
    share = min(patients / labels.numel(), 1.0) if patients and labels.numel() else 1.0
    positives = float(labels.sum()) * share
    negatives = float(labels.numel()) * share - positives
    z = normal_quantile(0.5 + CONFIDENCE / 2)
    half = z * math.sqrt(hanley_mcneil_variance(auc, positives, negatives))
    return max(auc - half, 0.0), min(auc + half, 1.0)


# ------------------------------------------------------------------------------ arms
def _sklearn_auc(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor) -> float:
    """scikit-learn's plain logistic regression (C=1, lbfgs), scored exactly on the test rows."""
    model = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
    model.fit(x.numpy().astype(np.float64), y.numpy().astype(int))
    scores = model.predict_proba(x_test.numpy().astype(np.float64))[:, 1]
    return roc_auc(torch.from_numpy(scores), y_test)


def pooled_arm(data: list[ClientData], x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    x = torch.cat([d.x_train for d in data])
    y = torch.cat([d.y_train for d in data])
    return _sklearn_auc(x, y, x_test, y_test)


def local_arm(data: list[ClientData], x_test: torch.Tensor, y_test: torch.Tensor
              ) -> dict[str, float | None]:
    """Per site: its own model's pooled-test AUC; None where its training rows hold one class."""
    out: dict[str, float | None] = {}
    for client in data:
        if client.y_train.numel() == 0 or client.y_train.min() == client.y_train.max():
            out[client.client_id] = None
            continue
        out[client.client_id] = _sklearn_auc(client.x_train, client.y_train, x_test, y_test)
    return out


def federated_arm(cfg: PipelineConfig, data: list[ClientData], x_test: torch.Tensor,
                  y_test: torch.Tensor) -> float:
    """The train stage's federated run (no ledger: public data); the final model's exact AUC."""
    dp = make_dpsgd(cfg=cfg, data=data)
    run = federate(cfg, data, dp=dp)
    model, _ = build_target_model(cfg, int(x_test.shape[1]))
    set_flat_params(model, run.result.params)
    model.eval()
    with torch.no_grad():
        logits = model(x_test).reshape(-1)
    return roc_auc(logits, y_test)


# ------------------------------------------------------------------------------ one table
def ensure_data(name: str) -> Path:
    """The table's CSV; exported from the optional extra when missing (never committed)."""
    table = TABLES[name]
    path = ROOT / table.data_path()
    if not path.is_file() and table.export is not None:
        rows, _ = export_dataset(table.export, path)
        progress(f"[{name}] exported {rows} rows to {table.data_path()}")
    require_public_dataset(path)  # not charged: public data only
    return path


def table_configs(params: Path, name: str, overrides: Sequence[str], seed: int,
                  arms: Sequence[str]) -> tuple[PipelineConfig, dict[str, PipelineConfig]]:
    """The table's config at ``seed`` (its split and encoding) and each fedpriv arm's."""
    base = [*TABLES[name].overrides, *overrides, f"seed={seed}"]
    cfg = load_config(params, base)
    arm_cfgs = {arm: load_config(params, [*base, *FEDERATED_ARMS[arm]])
                for arm in arms if arm in FEDERATED_ARMS}
    return cfg, arm_cfgs


def _sizes(loader: ClinicalTable, data: list[ClientData], y_test: torch.Tensor) -> dict[str, Any]:
    table = loader.table
    pid = loader.spec.patient_id
    return {
        "patients": int(table[pid].nunique()),
        "rows": len(table),
        "sites": {d.client_id: {"train_patients": len(d.train_ids),
                                "test_patients": len(d.test_ids),
                                "train_rows": d.num_train,
                                "train_positives": int(d.y_train.sum())} for d in data},
        "test_rows": int(y_test.numel()),
        "test_positives": int(y_test.sum()),
        "num_features": int(data[0].x_train.shape[1]),
    }


def run_seed(name: str, cfg: PipelineConfig, arm_cfgs: dict[str, PipelineConfig],
             arms: Sequence[str], seed: int) -> dict[str, Any]:
    """Every arm on the split of ``seed``: AUC, interval, seconds (and local's per-site AUC)."""
    loader = ClinicalTable.get(cfg.data, ROOT)
    data, _, _ = loader.partitioned(cfg.data, seed)
    x_test = torch.cat([d.x_test for d in data])
    y_test = torch.cat([d.y_test for d in data])
    out: dict[str, Any] = {"sizes": _sizes(loader, data, y_test), "arms": {}}
    test_patients = sum(len(d.test_ids) for d in data)
    for arm in arms:
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if arm == "pooled":
            auc = pooled_arm(data, x_test, y_test)
        elif arm == "local":
            per_site = local_arm(data, x_test, y_test)
            fitted = [v for v in per_site.values() if v is not None and math.isfinite(v)]
            auc = statistics.fmean(fitted) if fitted else math.nan
            extra = {"per_site": per_site,
                     "skipped_one_class": [s for s, v in per_site.items() if v is None]}
            if extra["skipped_one_class"]:
                progress(f"[{name}] seed {seed}  local: skipped (one class in its training "
                         f"rows): {', '.join(extra['skipped_one_class'])}")
        else:
            auc = federated_arm(arm_cfgs[arm], data, x_test, y_test)
        seconds = time.perf_counter() - started
        out["arms"][arm] = {"auc": auc, "ci": auc_interval(auc, y_test, test_patients),
                            "seconds": seconds, **extra}
        progress(f"[{name}] seed {seed}  {arm:<9} auc {auc:.3f}  ({seconds:.1f} s)")
    return out


def _arm_result(arm: str, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    runs = [s["arms"][arm] for s in per_seed]
    result: dict[str, Any] = {
        "auc": seed_summary([r["auc"] for r in runs]),
        "ci95_per_seed": [[json_number(r["ci"][0]), json_number(r["ci"][1])] for r in runs],
        # the seeds' bounds averaged: the interval of one such split, for the table
        "ci95_mean": [seed_summary([r["ci"][i] for r in runs])["mean"] for i in (0, 1)],
        "seconds_mean": round(statistics.fmean(r["seconds"] for r in runs), 2),
    }
    if arm == "local":
        sites = sorted({s for r in runs for s in r["per_site"]})
        result["per_site"] = {
            site: seed_summary([math.nan if r["per_site"].get(site) is None
                            else float(r["per_site"][site]) for r in runs]) for site in sites}
        result["skipped_one_class"] = sorted({s for r in runs for s in r["skipped_one_class"]})
        result["note"] = ("mean over sites of each site-only model's pooled-test AUC; the "
                          "interval is Hanley-McNeil's at that mean")
    return result


def run_table(name: str, params: Path, overrides: Sequence[str], seeds: int,
              arms: Sequence[str]) -> dict[str, Any]:
    ensure_data(name)
    per_seed = []
    started = time.perf_counter()
    for seed in range(seeds):
        cfg, arm_cfgs = table_configs(params, name, overrides, seed, arms)
        per_seed.append(run_seed(name, cfg, arm_cfgs, arms, seed))
    result: dict[str, Any] = {
        "config_overrides": list(TABLES[name].overrides),
        "sizes_seed0": per_seed[0]["sizes"],
        "arms": {arm: _arm_result(arm, per_seed) for arm in arms},
        "seconds": round(time.perf_counter() - started, 1),
    }
    means = {arm: result["arms"][arm]["auc"]["mean"] for arm in arms}
    if means.get("federated") is not None and means.get("pooled") is not None:
        result["gap_federated_pooled"] = round(means["federated"] - means["pooled"], 4)
    return result


# ------------------------------------------------------------------------------ the panel
def _arm_means(tables: dict[str, dict[str, Any]], arm: str) -> dict[str, float]:
    """Table → the arm's mean AUC over seeds, for the tables where it is defined."""
    return {t: r["arms"][arm]["auc"]["mean"] for t, r in tables.items()
            if arm in r["arms"] and r["arms"][arm]["auc"]["mean"] is not None}


def _below(upper: dict[str, float], lower: dict[str, float], margin: float,
           only: set[str] | None = None) -> list[str]:
    """Tables where ``lower`` is more than ``margin`` below ``upper``."""
    return [t for t in upper
            if t in lower and (only is None or t in only) and upper[t] - lower[t] > margin]


def panel_goals(tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals on the panel: federated within 0.02 AUC of pooled on average, no
    table below local-only, ε = 1 within 0.05 of non-private where a table has ≥ 500
    patients (each checked only when its arms ran)."""
    fed, pooled = _arm_means(tables, "federated"), _arm_means(tables, "pooled")
    local, eps1 = _arm_means(tables, "local"), _arm_means(tables, "dp_eps1")
    goals: dict[str, Any] = {}
    both = [t for t in fed if t in pooled]
    if both:
        gap = statistics.fmean(fed[t] - pooled[t] for t in both)
        goals["mean_gap_federated_pooled"] = json_number(gap)
        goals["federated_within_0.02_of_pooled"] = gap >= -0.02
    if fed and local:
        goals["tables_federated_below_local"] = _below(local, fed, 0.0)
    if eps1 and fed:
        large = {t for t, r in tables.items() if r["sizes_seed0"]["patients"] >= 500}
        goals["tables_eps1_more_than_0.05_below_nonprivate"] = _below(fed, eps1, 0.05, large)
    return goals


def panel_summary(tables: dict[str, dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Mean AUC per arm over the tables and the issue's goals checked on them."""
    mean_auc: dict[str, float | None] = {}
    for arm in arms:
        values = list(_arm_means(tables, arm).values())
        mean_auc[arm] = json_number(statistics.fmean(values)) if values else None
    return {"mean_auc": mean_auc, "goals": panel_goals(tables)}


LABELS = {"pooled": "pooled", "local": "local", "federated": "federated",
          "dp_eps1": "ε=1", "dp_eps4": "ε=4", "dp_eps100": "ε=100"}


def _cell(arm: dict[str, Any] | None) -> str:
    if arm is None or arm["auc"]["mean"] is None:
        return "–"
    sd, (low, high) = arm["auc"]["sd"], arm["ci95_mean"]
    text = f"{arm['auc']['mean']:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
    return text + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def markdown(result: dict[str, Any], arms: Sequence[str]) -> str:
    """The panel as a Markdown table: per arm the mean AUC ± sd over seeds [the seeds' mean
    95 % interval], and the gap federated − pooled."""
    head = ["table", "patients", *(LABELS[a] for a in arms), "fed − pooled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, table in result["tables"].items():
        gap = table.get("gap_federated_pooled")
        lines.append("| " + " | ".join([
            name, str(table["sizes_seed0"]["patients"]),
            *(_cell(table["arms"].get(a)) for a in arms),
            f"{gap:+.3f}" if gap is not None else "–"]) + " |")
    panel = result["panel"]
    mean_gap = panel["goals"].get("mean_gap_federated_pooled")
    lines.append("| " + " | ".join([
        "**panel mean**", "",
        *(f"{panel['mean_auc'][a]:.3f}" if panel["mean_auc"].get(a) is not None else "–"
          for a in arms),
        f"{mean_gap:+.3f}" if mean_gap is not None else "–"]) + " |")
    return "\n".join(lines)


def provenance(params: Path) -> dict[str, Any]:
    """Which code and which defaults gave the figures: the defaults are being tuned, so a
    result names the commit and the params file's hash (and whether the file was edited)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.rstrip()
        except OSError:
            return ""

    edited = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
              .splitlines() if line[3:].endswith((".py", ".yaml"))]
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "params_sha256": hashlib.sha256(params.read_bytes()).hexdigest(),
            "params_edited": bool(git("status", "--porcelain", "--", str(params))),
            "uncommitted": edited}  # tracked code and config files changed since the commit


def benchmark(params: Path, tables: Sequence[str], seeds: int, arms: Sequence[str],
              overrides: Sequence[str]) -> dict[str, Any]:
    started = time.perf_counter()
    results = {name: run_table(name, params, overrides, seeds, arms) for name in tables}
    # the recipe as the overrides leave it (read with a table's own keys: a schema.* override
    # names that table's features)
    cfg = load_config(params, [*TABLES[tables[0]].overrides, *overrides])
    return {
        "config": {
            "params": str(params.relative_to(ROOT) if params.is_relative_to(ROOT) else params),
            "overrides": list(overrides), "seeds": list(range(seeds)), "arms": list(arms),
            "recipe": {"model": cfg.model, "rounds": cfg.rounds,
                       "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                       "learning_rate": cfg.learning_rate,
                       "dp_learning_rate": cfg.privacy.learning_rate,
                       "compression": cfg.compression.enabled,
                       "aggregation": cfg.aggregation.method,
                       "anomaly": cfg.anomaly.enabled, "partition": cfg.data.partition,
                       "test_fraction": cfg.data.test_fraction},
            "auc": "exact, from each arm's predictions on the pooled test rows",
            "interval": f"Hanley-McNeil {CONFIDENCE:.0%} two-sided, on test rows",
        },
        "tables": results,
        "panel": panel_summary(results, arms),
        "total_seconds": round(time.perf_counter() - started, 1),
        "provenance": provenance(params),
        "environment": environment(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # tiny models: one thread is faster, and keeps the figures independent of the core count
    torch.set_num_threads(1)
    try:
        result = benchmark(args.params, args.tables, args.seeds, args.arms, args.overrides)
    except (ConfigError, DataError, DatasetUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return emit(result, args.out, summary=markdown(result, args.arms))


if __name__ == "__main__":
    sys.exit(main())
