"""The white-box DP audit's power, false alarms and drills (``fedpriv audit-dp``; issue 16).

For ε ∈ {1, 4, 16} (δ = 1e-5, the default recipe otherwise: the four hospitals, logistic
regression, 20 rounds × 2 DP-GD steps, compressed updates, centered clipping, secure noise)
``--reps`` independent audits with the configured ``audit_dp`` settings (16 audit runs, every
coordinate a canary at every client, regeneration replays, 99 % confidence). Reported per ε:
the accountant's ε, every repetition's ε lower bound, their min/mean/max, the power
``ε_lb/ε``, the false alarms (ε_lb > ε), the estimated separation μ̂ next to the ideal
``√T/σ`` of an uncompressed, exactly Gaussian implementation, and seconds per audit. The
baseline, measured in the same process: one ordinary federated training run of the recipe
(``fl_core.federation.wiring.federate``), the unit the audit's cost is counted in.

Then each broken-DP drill at ε = 1 (``--drill-runs`` audit runs): ε_lb against the claim;
the sampling drills (they replace the trainer's Poisson sampler) at ``q = 0.1`` over 5
rounds, patient level only.

Client level (``audit_dp.level=client``): DP-FedAvg (fedavg, no norm filter, anomaly off) at
server noise multipliers ``--server-sigmas`` (4 and 2: ε ≈ 5 and 11.5 per client over 20
rounds), ``--reps`` audits each with one canary client per coordinate, and the
client-level drills.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/audit_dp.py --out benchmarks/results/audit_dp.json
    .venv/bin/python benchmarks/audit_dp.py --reps 2 --epsilons 4    # quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import require_public_dataset  # noqa: E402  (benchmarks/report.py)

from adapters.config_files import load_config  # noqa: E402
from adapters.tables import ClinicalTable  # noqa: E402
from fl_core.audit.canary import DRILLS  # noqa: E402
from fl_core.audit.dp_audit import audit_dp  # noqa: E402
from fl_core.federation.wiring import federate, make_dpsgd  # noqa: E402


def _config(epsilon: float, extra: list[str]) -> Any:
    """The recipe at ``epsilon``; refused unless the data is the public embedded dataset
    (audit runs zero the patients' gradients, yet benchmarks never read real patients)."""
    cfg = load_config(ROOT / "params.yaml", [f"privacy.epsilon={epsilon}",
                                             "privacy.lifetime_epsilon=1000", *extra])
    require_public_dataset(ROOT / cfg.data.path)
    return cfg


def _gaussian(result: Any) -> dict[str, Any]:
    raw = next(b for b in result.bounds if b.scores == "raw" and b.method == "gaussian")
    return {"mu_hat": raw.mu_hat, "mu_lower": raw.mu_lower}


DP_FEDAVG = ["privacy.server.enabled=true", "aggregation.method=fedavg",
             "aggregation.max_norm_factor=0", "anomaly.enabled=false", "audit_dp.level=client"]


def power(epsilons: list[float], reps: int, extra: list[str],
          server_sigmas: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    rows = []
    cells = [(e, extra) for e in epsilons] + [
        (1.0, [*DP_FEDAVG, f"privacy.server.noise_multiplier={s}", *extra])
        for s in server_sigmas]
    for epsilon, cell_extra in cells:
        cfg = _config(epsilon, cell_extra)
        data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)[0]
        started = time.perf_counter()
        federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
        one_training = time.perf_counter() - started
        results = [audit_dp(cfg, data) for _ in range(reps)]
        bounds = [r.epsilon_lower_bound for r in results]
        first = results[0]
        ideal = math.sqrt(first.steps) / first.noise_multiplier
        rows.append({
            "level": first.level, "epsilon": first.epsilon, "delta": first.delta,
            "repetitions": reps,
            "epsilon_lower_bounds": bounds, "min": min(bounds),
            "mean": statistics.fmean(bounds), "max": max(bounds),
            "power_min": min(bounds) / first.epsilon,
            "false_alarms": sum(b > r.epsilon for b, r in zip(bounds, results, strict=True)),
            "mu_hat_mean": statistics.fmean(_gaussian(r)["mu_hat"] for r in results),
            "mu_ideal": ideal, "canaries": first.canaries, "runs": first.runs,
            "training_runs": first.training_runs, "confidence": first.confidence,
            "seconds_per_audit": statistics.fmean(r.seconds for r in results),
            "baseline_seconds_one_training": one_training})
        print(f"ε={first.epsilon:.3f}: ε_lb {min(bounds):.2f}..{max(bounds):.2f} "
              f"(false alarms {rows[-1]['false_alarms']}/{reps}), μ̂ "
              f"{rows[-1]['mu_hat_mean']:.3f} vs ideal {ideal:.3f}, "
              f"{rows[-1]['seconds_per_audit']:.1f} s per audit", file=sys.stderr)
    return rows


SAMPLED = ["privacy.sample_rate=0.1", "audit_dp.rounds=5"]
"""The sampling drills' recipe: at q = 1 there is nothing to sample (the audit refuses them)."""


def drills(runs: int, extra: list[str], level: str) -> list[dict[str, Any]]:
    server = [*DP_FEDAVG, "privacy.server.noise_multiplier=4"] if level == "client" else []
    cfg = _config(1.0, [f"audit_dp.runs={runs}", *server, *extra])
    sampled = _config(1.0, [f"audit_dp.runs={runs}", *SAMPLED, *extra])
    data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)[0]
    rows = []
    for name, drill in DRILLS.items():
        if level == "client" and (drill.per_record or drill.breaks_sampling):
            continue  # a patient-level fault
        r = audit_dp(sampled if drill.breaks_sampling else cfg, data, drill=name)
        rows.append({"level": level, "drill": name, "description": drill.description,
                     "epsilon": r.epsilon,
                     "epsilon_lower_bound": r.epsilon_lower_bound,
                     "caught": r.privacy_failure, "runs": r.runs, "seconds": r.seconds,
                     "bounds": [b.__dict__ for b in r.bounds]})
        print(f"drill {name} ({level} level): ε_lb {r.epsilon_lower_bound:.2f} vs ε "
              f"{r.epsilon:.2f} "
              f"({'caught' if r.privacy_failure else 'MISSED'})", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 4.0, 16.0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--drill-runs", type=int, default=16)
    parser.add_argument("--server-sigmas", nargs="*", type=float, default=[4.0, 2.0])
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    out = {"power": power(args.epsilons, args.reps, args.extra, tuple(args.server_sigmas)),
           "drills": drills(args.drill_runs, args.extra, "patient")
           + drills(args.drill_runs, args.extra, "client")}
    out["seconds"] = time.perf_counter() - started
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
