"""Accuracy against bytes: the default pipeline with and without compression, over seeds.

Each arm is the default configuration (``params.yaml``) with DP-SGD off (the arms measure
compression alone) and a few ``compression.*`` overrides;
for each seed 0..N-1 the stages ``partition`` and ``train`` run exactly as ``fedpriv stage``
runs them (validation once), in a scratch copy of the project, so partitions, transforms, model
initialisation and local training are the pipeline's own. Reported per arm: the final pooled
test accuracy and AUC (mean and sample sd over seeds), upload bytes per client and round, the
upload compression ratio against dense float32 payloads (headers included), and the mean
training seconds. Output: one JSON object on stdout, a Markdown table on stderr.

    .venv/bin/python benchmarks/compression_accuracy.py
    .venv/bin/python benchmarks/compression_accuracy.py --set model=mlp --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from report import emit, require_public_dataset  # benchmarks/report.py: the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.config_files import load_config  # noqa: E402

ARMS: dict[str, list[str]] = {
    "dense (no compression)": ["compression.enabled=false"],
    "top-10% 8-bit, error feedback": ["compression.ratio=0.1"],
    "top-10% 8-bit, no error feedback": ["compression.ratio=0.1",
                                         "compression.error_feedback=false"],
    "top-1% 8-bit, error feedback": ["compression.ratio=0.01"],
    "top-1% 8-bit, no error feedback": ["compression.ratio=0.01",
                                        "compression.error_feedback=false"],
    "top-1% 8-bit, error feedback + momentum 0.5 + warm-up 4": [
        "compression.ratio=0.01", "compression.momentum=0.5", "compression.warmup_rounds=4"],
    "top-10% 8-bit, error feedback, compressed downlink": [
        "compression.ratio=0.1", "compression.downlink=compressed"],
}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(overrides: list[str], seeds: int) -> dict[str, Any]:
    # every arm compresses the logistic regression (under min_parameters it would go dense)
    overrides = ["privacy.enabled=false", "compression.min_parameters=0", *overrides]
    from adapters.partition import partition_data
    from adapters.train import train_model
    from adapters.validate import validate_data

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        shutil.copytree(ROOT / "data" / "raw", root / "data" / "raw")
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        require_public_dataset(root / load_config(root / "params.yaml", overrides).data.path)
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet:
            validate_data(load_config(root / "params.yaml", overrides), root)
        arms = []
        for name, arm in ARMS.items():
            runs = []
            for seed in range(seeds):
                cfg = load_config(root / "params.yaml", [*overrides, *arm, f"seed={seed}"])
                with contextlib.redirect_stdout(io.StringIO()):
                    partition_data(cfg, root)
                    runs.append(train_model(cfg, root))
            acc_mean, acc_sd = _mean_sd([r.accuracy for r in runs])
            auc_mean, auc_sd = _mean_sd([r.auc for r in runs])
            first = runs[0]
            client_rounds = first.rounds * first.clients
            arms.append({
                "arm": name,
                "overrides": arm,
                "accuracy_mean": round(acc_mean, 4), "accuracy_sd": round(acc_sd, 4),
                "auc_mean": round(auc_mean, 4), "auc_sd": round(auc_sd, 4),
                "accuracy_per_seed": [round(r.accuracy, 4) for r in runs],
                "upload_bytes_per_client_round": round(first.bytes_uploaded / client_rounds, 1),
                "download_bytes_per_client_round": round(first.bytes_downloaded / client_rounds,
                                                         1),
                "compression_ratio": round(statistics.fmean(r.compression_ratio
                                                            for r in runs), 2),
                "train_seconds_mean": round(statistics.fmean(r.seconds for r in runs), 3),
            })
            print(f"{name}: {acc_mean:.3f} ± {acc_sd:.3f}", file=sys.stderr, flush=True)
    base = arms[0]["accuracy_mean"]
    for arm in arms:
        arm["accuracy_change_points"] = round(100 * (arm["accuracy_mean"] - base), 2)
    return {"benchmark": "compression_accuracy", "overrides": overrides, "seeds": seeds,
            "arms": arms}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| arm | accuracy | Δ vs dense (points) | AUC | up B/client/round | up ratio "
             "| down B/client/round |", "|---|---|---|---|---|---|---|"]
    for a in result["arms"]:
        lines.append(
            f"| {a['arm']} | {a['accuracy_mean']:.3f} ± {a['accuracy_sd']:.3f} | "
            f"{a['accuracy_change_points']:+.1f} | {a['auc_mean']:.3f} ± {a['auc_sd']:.3f} | "
            f"{a['upload_bytes_per_client_round']:.0f} | {a['compression_ratio']:.1f}× | "
            f"{a['download_bytes_per_client_round']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override for every arm (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args.overrides, args.seeds)
    return emit(result, args.out, markdown(result))


if __name__ == "__main__":
    sys.exit(main())
