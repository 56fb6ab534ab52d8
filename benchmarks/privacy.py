"""What differential privacy costs: accuracy against ε, and local-training time with DP.

**Privacy–utility.** The default pipeline (``params.yaml``: the four hospitals, compressed
updates, centered clipping, patient-level DP-SGD) at ε ∈ {0.5, 1, 2, 4, 8} and without DP
(ε = ∞), δ = 1e-5, over seeds 0..N-1; each cell runs the pipeline's own federated run
(``tasks.train.federate``) on that seed's partition. Cells: final pooled test accuracy, mean
and sample sd over seeds. Writes ``benchmarks/results/privacy_utility.csv`` (a DVC plot), the
plot ``benchmarks/results/privacy_utility.png``, and logs both with the JSON to MLflow
(experiment ``fedpriv-benchmarks`` in the local store) unless ``--no-mlflow``.

**Cost of DP.** Local training of the default model on the default data (seed 0 partition),
20 rounds per client as in the pipeline, one thread, best of ``--repeats``:

* ``plain`` — the non-private pipeline's local training (``train_local``: shuffled batches of
  ``batch_size``, ``local_epochs`` epochs per round);
* ``plain_poisson`` — plain SGD on exactly the Poisson batches DP-SGD draws (the same
  patients per step, no clipping, no noise): Opacus's own comparisons are of this kind;
* ``dp_hooks`` / ``dp_functorch`` — ``PatientDPTrainer`` with that Opacus grad-sample mode
  (per-patient gradients, clipping, noise, accountant), built once per client as in the
  pipeline.

Ratios are DP time over ``plain`` (what DP costs the pipeline) and over ``plain_poisson``
(the per-step overhead).

**Preprocessing** (issue 11), side by side on the same seeds' partitions, default recipe:

* ``fitted`` — the transform before issue 11, rebuilt here for the baseline only
  (:func:`fitted_transform`): standardised by the pooled training patients' mean and sd,
  missing values → training mean / mode. It leaks: those statistics are not accounted;
* ``declared`` — the pipeline's declared preprocessing (the dataset schema): centred on
  clinical decision thresholds with textbook scales, clipped to the validation ranges;
  nothing fitted;
* ``normal`` — declared, the first declaration tried: centred on normal values instead
  (resting BP 120, cholesterol 200, maximum heart rate 220 − 55 = 165);
* ``range`` — declared from the validation ranges alone: midpoint and half-width.

Each at ε = 1 with reproducible noise (derived from ``seed``), at ε = 1 with secure noise
(from the OS: nobody can regenerate it, so those cells vary run to run; ``--secure-draws``
runs per seed, 8 by default), and without DP.

Output: JSON on stdout, Markdown on stderr.

    .venv/bin/python benchmarks/privacy.py                      # 5 seeds, about 4 min
    .venv/bin/python benchmarks/privacy.py --seeds 2 --epsilons 1 --no-mlflow
    .venv/bin/python benchmarks/privacy.py --skip-utility --skip-timing --no-mlflow  # preproc.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from report import emit, require_public_dataset  # benchmarks/report.py: the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.config_files import load_config
from adapters.tables import ClinicalTable
from fl_core.config.model import DataConfig, FeatureReference, PipelineConfig
from fl_core.data.tables import ClientData
from fl_core.data.transform import TabularTransform
from fl_core.privacy.randomness import SeededRandom  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def client_data(cfg: PipelineConfig, seed: int) -> list[ClientData]:
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    return ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, seed)[0]


def privacy_utility(seeds: int, epsilons: list[float], overrides: list[str]) -> dict[str, Any]:
    from fl_core.federation.wiring import federate, make_dpsgd

    # reproducible noise (from each seed): the same command gives the same table
    arms: list[tuple[float, list[str]]] = [
        (e, [f"privacy.epsilon={e}", "privacy.randomness=reproducible"]) for e in epsilons]
    arms.append((math.inf, ["privacy.enabled=false"]))
    rows = []
    for epsilon, arm in arms:
        accuracies, aucs, spent, sigmas, seconds = [], [], [], [], []
        for seed in range(seeds):
            cfg = load_config(ROOT / "params.yaml", [*overrides, *arm, f"seed={seed}"])
            started = time.perf_counter()
            data = client_data(cfg, seed)
            run = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
            seconds.append(time.perf_counter() - started)
            last = run.result.history[-1]
            accuracies.append(last.accuracy)
            aucs.append(last.auc)
            if run.dp is not None:
                spent.append(max(run.result.site_epsilon.values(), default=0.0))
                sigmas.append(run.dp.noise_multiplier)
        row = {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "accuracy_mean": round(statistics.fmean(accuracies), 4),
            "accuracy_sd": round(statistics.stdev(accuracies), 4) if seeds > 1 else 0.0,
            "auc_mean": round(statistics.fmean(aucs), 4),
            "epsilon_spent": round(max(spent), 4) if spent else None,
            "noise_multiplier": round(sigmas[0], 4) if sigmas else None,
            "per_seed_accuracy": [round(a, 4) for a in accuracies],
            "seconds_per_run": round(statistics.fmean(seconds), 2),
        }
        rows.append(row)
        print(f"ε={epsilon:<4g} accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_sd']:.4f}"
              f"  σ={row['noise_multiplier']}  ({row['seconds_per_run']} s/run)",
              file=sys.stderr, flush=True)
    private = [r for r in rows if r["epsilon"] is not None]
    baseline = rows[-1]
    gaps = {f"{r['epsilon']:g}": round(baseline["accuracy_mean"] - r["accuracy_mean"], 4)
            for r in private}
    targets = {}
    for eps, within in ((1.0, 0.01), (0.5, 0.03)):
        if f"{eps:g}" in gaps:
            targets[f"epsilon_{eps:g}_within_{within:g}"] = {
                "gap": gaps[f"{eps:g}"], "at_most": within, "met": gaps[f"{eps:g}"] <= within}
    return {"rows": rows, "non_private": baseline, "gap_to_non_private": gaps,
            "targets": targets}


def fitted_transform(config: DataConfig, train: pd.DataFrame) -> TabularTransform:
    """BASELINE ONLY: the preprocessing before issue 11, fitted on the pooled training patients.

    Numeric x → ``(x − mean) / sd`` with the training mean and population sd (after missing
    values became the training mean), no clipping (±1e12); a missing category → the training
    mode. Expressed as a :class:`TabularTransform` whose "declared" constants are these
    statistics: exactly what the pipeline no longer does, because they are not private.
    """
    reference = {}
    for col in (c for c in config.features if config.spec.feature(c).numeric):
        num = pd.to_numeric(train[col], errors="coerce").astype(float)
        mean = float(num.mean())
        sd = float(num.fillna(mean).std(ddof=0))
        reference[col] = FeatureReference(low=-1e12, high=1e12, center=mean,
                                          scale=sd if sd > 1e-12 else 1.0, fill=mean)
    modes = {col: str(train[col].dropna().mode().iloc[0])
             for col in config.missing_category if col in config.features}
    declared = TabularTransform.from_config(config)
    return replace(declared, reference=reference, missing_category=modes)


def range_overrides(cfg: PipelineConfig) -> list[str]:
    """The schema's numeric features declared by [low, high] alone: centre and scale the
    midpoint/half-width, fill the centre."""
    return [f"schema.features.{col}.{key}={value:g}" for col, r in cfg.data.reference.items()
            for key, value in (("center", (r.low + r.high) / 2), ("scale", (r.high - r.low) / 2),
                               ("fill", (r.low + r.high) / 2))]


# the first declaration tried (docs/privacy.md): normal values as centres
NORMAL_VALUES = [f"schema.features.{col}.{key}={value}"
                 for col, center in (("trestbps", 120), ("chol", 200), ("thalch", 165))
                 for key, value in (("center", center), ("fill", center))]
SECURE_NOISE = ["privacy.randomness=secure"]


def _encoded(cfg: PipelineConfig, preprocessing: str, seed: int) -> list[ClientData]:
    """That seed's partition, encoded by the fitted baseline or by the declared transform."""
    loader = ClinicalTable.get(cfg.data, ROOT)
    partition = loader.partition(cfg.data, seed)
    if preprocessing == "fitted":
        train_ids = [i for c in partition.clients for i in c.train_ids]
        transform = fitted_transform(cfg.data,
                                     loader.table[loader.table[cfg.data.spec.patient_id].isin(train_ids)])
    else:
        transform = loader.fit_transform(cfg.data, partition)
    return loader.client_data(partition, transform)


def preprocessing_comparison(seeds: int, overrides: list[str],
                             secure_draws: int) -> dict[str, Any]:
    """Fitted vs declared preprocessing at ε = 1 (reproducible and secure noise) and no DP.

    A secure cell runs every seed ``secure_draws`` times: each run is a fresh draw of noise
    nobody can regenerate, so more draws estimate the same expectation more tightly.
    """
    from fl_core.federation.wiring import federate, make_dpsgd

    base = load_config(ROOT / "params.yaml", overrides)
    preprocessing = {"fitted": [], "declared": [], "normal": NORMAL_VALUES,
                     "range": range_overrides(base)}
    privacy = {"epsilon_1": ["privacy.epsilon=1", "privacy.randomness=reproducible"],
               "epsilon_1_secure": ["privacy.epsilon=1", *SECURE_NOISE],
               "none": ["privacy.enabled=false"]}
    rows = []
    for prep, prep_overrides in preprocessing.items():
        for arm, arm_overrides in privacy.items():
            draws = secure_draws if arm.endswith("_secure") else 1
            per_seed, aucs = [], []
            for seed in range(seeds):
                cfg = load_config(ROOT / "params.yaml",
                                  [*overrides, *prep_overrides, *arm_overrides, f"seed={seed}"])
                data = _encoded(cfg, prep, seed)
                dp = make_dpsgd(cfg=cfg, data=data)
                runs = [federate(cfg, data, dp=dp).result.history[-1] for _ in range(draws)]
                per_seed.append([r.accuracy for r in runs])
                aucs += [r.auc for r in runs]
            accuracies = [a for seed_runs in per_seed for a in seed_runs]
            rows.append({
                "preprocessing": prep, "privacy": arm, "runs": len(accuracies),
                "accuracy_mean": round(statistics.fmean(accuracies), 4),
                "accuracy_sd": round(statistics.stdev(accuracies), 4) if seeds > 1 else 0.0,
                "auc_mean": round(statistics.fmean(aucs), 4),
                "per_seed_accuracy": [round(statistics.fmean(a), 4) for a in per_seed],
            })
            print(f"{prep:<9} {arm:<17} accuracy {rows[-1]['accuracy_mean']:.4f} ± "
                  f"{rows[-1]['accuracy_sd']:.4f} ({len(accuracies)} runs)",
                  file=sys.stderr, flush=True)
    return {"rows": rows, "targets": _preprocessing_targets(rows),
            "secure_noise": f"the *_secure cells draw DP noise and sampling from the OS, "
                            f"{secure_draws} draws per seed: they differ from run to run"}


def _preprocessing_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Declared preprocessing at ε = 1 within 2 points of the non-private model."""
    acc = {(r["preprocessing"], r["privacy"]): r["accuracy_mean"] for r in rows}
    targets = {}
    for prep in ("declared", "normal", "range"):
        for arm in ("epsilon_1", "epsilon_1_secure"):
            gap = round(acc[(prep, "none")] - acc[(prep, arm)], 4)
            targets[f"{prep}_{arm}_within_0.02_of_non_private"] = {
                "gap": gap, "gap_to_fitted_non_private": round(
                    acc[("fitted", "none")] - acc[(prep, arm)], 4),
                "gap_to_fitted_same_privacy": round(acc[("fitted", arm)] - acc[(prep, arm)], 4),
                "at_most": 0.02, "met": gap <= 0.02}
    return targets


def _plain_poisson(model: torch.nn.Module, batches: list[torch.Tensor], patients: Any,
                   lr: float) -> None:
    from fl_core.privacy.dpsgd import patient_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        patient_loss(model(patients.x[batch]), patients.y[batch], patients.mask[batch]).backward()
        optimizer.step()


def dp_cost(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """Seconds of local training for 20 rounds on every client, per arm (best of repeats)."""
    from fl_core.federation.site_client import LocalTrainingConfig, train_local
    from fl_core.federation.wiring import make_dpsgd
    from fl_core.model.networks import build_model
    from fl_core.privacy.accountants import steps_per_epoch
    from fl_core.privacy.dpsgd import PatientDPTrainer, group_records

    cfg = load_config(ROOT / "params.yaml", [*overrides, "seed=0"])
    data = client_data(cfg, 0)
    features = int(data[0].x_train.shape[1])
    local = LocalTrainingConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                learning_rate=cfg.learning_rate, seed=0)
    dp = make_dpsgd(cfg=cfg, data=data)
    assert dp is not None, "the default configuration has DP-SGD on"
    q = dp.sample_rate
    rounds = cfg.rounds

    def model() -> torch.nn.Module:
        return build_model(cfg.model, features, hidden_units=cfg.hidden_units, seed=0)

    def plain() -> None:
        for d in data:
            m = model()
            for r in range(rounds):
                train_local(m, d.x_train, d.y_train, local, seed=r)

    grouped = {d.client_id: group_records(d.x_train, d.y_train, d.patient_ids()) for d in data}

    def poisson_batches(n: int, r: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(r)
        return [torch.nonzero(torch.rand(n, generator=g) < q)[:, 0]
                for _ in range(cfg.local_epochs * steps_per_epoch(q))]

    def plain_poisson() -> None:
        for d in data:
            m, p = model(), grouped[d.client_id]
            for r in range(rounds):
                _plain_poisson(m, poisson_batches(p.num_patients, r), p, dp.learning_rate)

    def private(mode: str) -> Any:
        def arm() -> None:
            import dataclasses

            recipe = dataclasses.replace(dp, grad_sample_mode=mode)
            for d in data:
                trainer = PatientDPTrainer(model=model(), data=grouped[d.client_id], cfg=recipe)
                for r in range(rounds):
                    trainer.train(cfg.local_epochs, SeededRandom(r))
        return arm

    arms = {"plain": plain, "plain_poisson": plain_poisson, "dp_hooks": private("hooks"),
            "dp_functorch": private("functorch")}
    seconds: dict[str, float] = {}
    for name, arm in arms.items():
        arm()  # warm-up: imports, first-call dispatch
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            arm()
            times.append(time.perf_counter() - started)
        seconds[name] = round(min(times), 4)
        print(f"{name:<14} {seconds[name]:.3f} s", file=sys.stderr, flush=True)
    ratios = {f"{mode}_over_plain": round(seconds[mode] / seconds["plain"], 2)
              for mode in ("dp_hooks", "dp_functorch")}
    ratios.update({f"{mode}_over_plain_poisson": round(seconds[mode] / seconds["plain_poisson"], 2)
                   for mode in ("dp_hooks", "dp_functorch")})
    best = min(("dp_hooks", "dp_functorch"), key=seconds.__getitem__)
    return {
        "clients": {d.client_id: grouped[d.client_id].num_patients for d in data},
        "rounds": rounds, "local_epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
        "sample_rate": q, "steps_per_round_dp": cfg.local_epochs * steps_per_epoch(q),
        "seconds": seconds, "ratios": ratios, "fastest_dp_mode": best.removeprefix("dp_"),
        "target": {"dp_over_plain": ratios[f"{best}_over_plain"], "at_most": 2.0,
                   "met": ratios[f"{best}_over_plain"] <= 2.0},
    }


def write_outputs(result: dict[str, Any], log_mlflow: bool) -> None:
    from adapters.plots import privacy_utility_plot

    if "privacy_utility" not in result:
        return
    rows = result["privacy_utility"]["rows"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "privacy_utility.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epsilon", "accuracy_mean", "accuracy_sd",
                                                "auc_mean", "noise_multiplier"],
                                extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows([r for r in rows if r["epsilon"] is not None])
    privacy_utility_plot([r for r in rows if r["epsilon"] is not None],
                         result["privacy_utility"]["non_private"],
                         RESULTS / "privacy_utility.png")
    if log_mlflow:
        import json
        import os

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        cfg = load_config(ROOT / "params.yaml")
        mlflow.set_tracking_uri(f"sqlite:///{ROOT / cfg.state_dir / 'mlflow.db'}")
        mlflow.set_experiment("fedpriv-benchmarks")
        with mlflow.start_run(run_name="privacy-utility"), tempfile.TemporaryDirectory() as tmp:
            for r in rows:
                if r["epsilon"] is not None:
                    mlflow.log_metric("accuracy_at_epsilon_" + f"{r['epsilon']:g}",
                                      r["accuracy_mean"])
            mlflow.log_metric("accuracy_non_private", result["privacy_utility"]["non_private"]
                              ["accuracy_mean"])
            path = Path(tmp) / "privacy.json"
            path.write_text(json.dumps(result, indent=2))
            for artifact in (path, RESULTS / "privacy_utility.csv",
                             RESULTS / "privacy_utility.png"):
                mlflow.log_artifact(str(artifact))


def markdown(result: dict[str, Any]) -> str:
    out: list[str] = []
    if "privacy_utility" in result:
        pu = result["privacy_utility"]
        out += ["| ε (δ = 1e-5) | σ | accuracy (mean ± sd) | AUC | gap to non-private |",
                "|---|---|---|---|---|"]
        base = pu["non_private"]["accuracy_mean"]
        for r in pu["rows"]:
            eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:g}"
            sigma = "—" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
            out.append(f"| {eps} | {sigma} | {r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f}"
                       f" | {r['auc_mean']:.3f} | {base - r['accuracy_mean']:+.3f} |")
    if "preprocessing" in result:
        out += ["", "| preprocessing | privacy | runs | accuracy (mean ± sd) | AUC |",
                "|---|---|---|---|---|"]
        out += [f"| {r['preprocessing']} | {r['privacy']} | {r['runs']} | "
                f"{r['accuracy_mean']:.3f} ± {r['accuracy_sd']:.3f} | {r['auc_mean']:.3f} |"
                for r in result["preprocessing"]["rows"]]
    if "dp_cost" in result:
        c = result["dp_cost"]
        out += ["", "| arm | seconds | DP over plain | DP over plain, same batches |",
                "|---|---|---|---|"]
        for name, sec in c["seconds"].items():
            ratio = c["ratios"].get(f"{name}_over_plain", "")
            same = c["ratios"].get(f"{name}_over_plain_poisson", "")
            out.append(f"| {name} | {sec:.3f} | {ratio} | {same} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a params.yaml key for every arm")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-utility", action="store_true", help="no ε sweep")
    parser.add_argument("--skip-preprocessing", action="store_true",
                        help="no fitted-vs-declared preprocessing comparison")
    parser.add_argument("--secure-draws", type=int, default=8,
                        help="runs per seed of the secure-noise cells (fresh noise each)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "privacy", "seeds": args.seeds,
                              "overrides": args.overrides, "threads": 1}
    if not args.skip_utility:
        result["privacy_utility"] = privacy_utility(args.seeds, args.epsilons, args.overrides)
    if not args.skip_preprocessing:
        result["preprocessing"] = preprocessing_comparison(args.seeds, args.overrides,
                                                           args.secure_draws)
    if not args.skip_timing:
        result["dp_cost"] = dp_cost(args.repeats, args.overrides)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(result, not args.no_mlflow)
    return emit(result, args.out, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
