"""What monitoring costs a run (``adapters.metrics``), off and on, in one process.

* ``import``: in fresh interpreters, whether importing the stages (train, audit, publish)
  loads ``prometheus_client`` (it must not), and the time ``import prometheus_client`` takes
  when monitoring is on (median of ``--repeats`` interpreters).
* ``round_sink``: the median time of ``RunMetrics.on_round`` on a round of ``--sites`` sites
  (no Pushgateway: the registry update alone), beside ``print_progress`` (to /dev/null).
* ``train``: ``train_model`` on the embedded heart table, ``--rounds`` rounds, monitoring off
  and on (``monitoring.listen`` set so the registry is filled; nothing is served or pushed),
  alternating, median of ``--repeats`` each, in a throwaway project.

Output: one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/monitoring.py --out benchmarks/results/monitoring.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit, require_public_dataset  # benchmarks/report.py: the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = "import adapters.train, adapters.audit, adapters.publish"


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def import_cost(repeats: int) -> dict[str, Any]:
    """Whether the stages import prometheus_client, and what importing it costs."""
    loaded = _fresh(f"import sys; {STAGES}; print('prometheus_client' in sys.modules)")
    times = [float(_fresh("import time; t = time.perf_counter(); import prometheus_client; "
                          "print(time.perf_counter() - t)")) for _ in range(repeats)]
    return {"stages_import_prometheus_client": loaded == "True",
            "prometheus_client_import_seconds": statistics.median(times)}


def round_sink_cost(sites: int, repeats: int) -> dict[str, Any]:
    from adapters.metrics import RunMetrics
    from adapters.train import print_progress
    from fl_core.federation.coordinator import RoundRecord

    ids = [f"site-{i:03d}" for i in range(sites)]
    record = RoundRecord(
        round=1, train_loss=math.nan, test_loss=0.5, accuracy=0.7, auc=0.8,
        balanced_accuracy=0.7, bytes_uploaded=1000, bytes_downloaded=4000,
        bytes_uploaded_uncompressed=4000, bytes_downloaded_uncompressed=4000,
        clients_ok=sites, aggregated_clients=ids, client_accuracy=dict.fromkeys(ids, 0.7),
        flagged_clients=ids[:1])
    metrics = RunMetrics("bench")

    def timed(call: Any) -> float:
        out = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            out.append(time.perf_counter() - started)
        return statistics.median(out)

    with contextlib.redirect_stdout(io.StringIO()):
        progress = timed(lambda: print_progress(record, 10))
    return {"sites": sites, "on_round_seconds": timed(lambda: metrics.on_round(record)),
            "print_progress_seconds": progress}


def train_cost(rounds: int, repeats: int) -> dict[str, Any]:
    from adapters.config_files import load_config
    from adapters.partition import partition_data
    from adapters.train import train_model
    from adapters.validate import validate_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data" / "raw").mkdir(parents=True)
        shutil.copy(ROOT / "data" / "raw" / "heart_disease_uci.csv", root / "data" / "raw")
        require_public_dataset(root / "data" / "raw" / "heart_disease_uci.csv")  # not charged
        shutil.copytree(ROOT / "data" / "schemas", root / "data" / "schemas")
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        base = [f"rounds={rounds}", "privacy.randomness=reproducible",
                "privacy.lifetime_epsilon=1000"]
        configs = {"off": load_config(root / "params.yaml", base),
                   "on": load_config(root / "params.yaml",
                                     [*base, "monitoring.listen=127.0.0.1:9"])}
        with contextlib.redirect_stdout(io.StringIO()):
            validate_data(configs["off"], root)
            partition_data(configs["off"], root)
            train_model(configs["off"], root)  # warm-up
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(repeats):
            for name, cfg in configs.items():
                started = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    train_model(cfg, root)
                seconds[name].append(time.perf_counter() - started)
                print(f"train {name}: {seconds[name][-1]:.2f} s", file=sys.stderr)
    off, on = (statistics.median(seconds[k]) for k in ("off", "on"))
    return {"rounds": rounds, "off_seconds": off, "on_seconds": on, "on_over_off": on / off,
            "all_seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"import": import_cost(args.repeats),
              "round_sink": round_sink_cost(args.sites, 1000),
              "train": train_cost(args.rounds, args.repeats)}
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
