"""Final accuracy under attack: attacks × defenses × malicious fraction, mean over seeds.

The default dataset split ``by_patient`` into 20 clients (IID), the default pipeline otherwise
(logistic regression, 20 rounds) with dense updates; for each seed the partition and
transforms are built once and every (attack, fraction, defense) cell runs the pipeline's own
federated run (``tasks.train.federate``) on it. Malicious clients are ``round(fraction·20)``
clients chosen by the seed. Cells: the final pooled test accuracy (true labels), mean over
seeds. Defenses are the aggregators alone (anomaly detection off), plus FedAvg with anomaly
detection and reputation, and centered clipping with it. Output: one JSON object on
stdout, Markdown tables on stderr.

    .venv/bin/python benchmarks/robustness.py                 # 3 seeds, about 10 min on 1 core
    .venv/bin/python benchmarks/robustness.py --seeds 1 --fractions 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from report import emit, require_public_dataset  # benchmarks/report.py: the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.config_files import load_config  # noqa: E402
from adapters.tables import ClinicalTable  # noqa: E402
from fl_core.robust.attacks import ATTACKS as ATTACK_REGISTRY  # noqa: E402

ATTACKS = tuple(ATTACK_REGISTRY)  # every registered attack, ``none`` (the baseline) first
DEFENSES: dict[str, list[str]] = {
    "fedavg": ["aggregation.method=fedavg"],
    "fedavg+anomaly": ["aggregation.method=fedavg", "anomaly.enabled=true"],
    "multi_krum": ["aggregation.method=multi_krum"],
    "trimmed_mean": ["aggregation.method=trimmed_mean"],
    "median": ["aggregation.method=median"],
    "geometric_median": ["aggregation.method=geometric_median"],
    "centered_clipping": ["aggregation.method=centered_clipping"],
    "centered_clipping+anomaly": ["aggregation.method=centered_clipping",
                                  "anomaly.enabled=true"],
    "nnm+trimmed_mean": ["aggregation.method=trimmed_mean", "aggregation.pre_aggregation=nnm"],
}
# dense updates: the table compares aggregators, and coordinate-wise rules cannot run on sparse
# updates (the configuration refuses that combination)
BASE = ["data.partition=by_patient", "data.num_clients=20", "anomaly.enabled=false",
        "privacy.enabled=false",
        "compression.enabled=false"]


def run(seeds: int, fractions: list[float], attacks: list[str],
        defenses: list[str]) -> dict[str, Any]:
    from fl_core.federation.wiring import federate, make_dpsgd

    torch.set_num_threads(1)
    started = time.perf_counter()
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    base_cfg = load_config(ROOT / "params.yaml", BASE)
    require_public_dataset(ROOT / base_cfg.data.path)  # not charged: public data only
    loader = ClinicalTable.get(base_cfg.data, ROOT)
    for seed in range(seeds):
        data, _, _ = loader.partitioned(base_cfg.data, seed)
        for attack in attacks:
            for fraction in ([0.0] if attack == "none" else fractions):
                key = "none" if attack == "none" else f"{attack}@{fraction:.0%}"
                for defense in defenses:
                    overrides = [*BASE, *DEFENSES[defense], f"seed={seed}",
                                 f"attack.kind={attack}", f"attack.fraction={fraction}"]
                    cfg = load_config(ROOT / "params.yaml", overrides)
                    result = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data)).result
                    accuracy = result.history[-1].accuracy
                    cells.setdefault(key, {}).setdefault(defense, []).append(accuracy)
                print(f"seed {seed} {key:<18} " + " ".join(
                    f"{d} {cells[key][d][-1]:.3f}" for d in defenses),
                    file=sys.stderr, flush=True)
    table = {key: {d: round(statistics.fmean(v), 4) for d, v in row.items()}
             for key, row in cells.items()}
    clean = table["none"]["fedavg"] if "none" in table else None
    return {
        "benchmark": "robustness", "seeds": seeds, "clients": 20, "fractions": fractions,
        "base_overrides": BASE, "defenses": {d: DEFENSES[d] for d in defenses},
        "clean_fedavg_accuracy": clean,
        "mean_accuracy": table,
        "per_seed": {k: {d: [round(a, 4) for a in v] for d, v in row.items()}
                     for k, row in cells.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    table = result["mean_accuracy"]
    defenses = list(result["defenses"])
    out = []
    for fraction in result["fractions"]:
        out.append(f"\n**{fraction:.0%} malicious** (clean FedAvg "
                   f"{result['clean_fedavg_accuracy']:.3f})\n")
        out.append("| attack | " + " | ".join(defenses) + " |")
        out.append("|---" * (len(defenses) + 1) + "|")
        for key, row in table.items():
            if key != "none" and not key.endswith(f"@{fraction:.0%}"):
                continue
            best = max(row.values())
            cells = [f"**{row[d]:.3f}**" if row[d] == best else f"{row[d]:.3f}"
                     for d in defenses]
            out.append(f"| {key.split('@')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=list(DEFENSES))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args.seeds, args.fractions, args.attacks, args.defenses)
    return emit(result, args.out, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
