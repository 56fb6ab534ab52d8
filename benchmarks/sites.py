"""What a round costs when every site is its own process behind the message store.

Side by side in one run, the same configuration and seed (reproducible noise, so both train
the same model):

* **simulation** — the four sites in the coordinator's process (``federate``: the in-process
  transport, each site on a thread);
* **sites** — each site a separate Python process (:func:`adapters.site_session.serve_site`,
  what the Prefect flow ``fl-site`` runs at a hospital) reading only its own CSV, the
  coordinator exchanging framed messages with them through a folder
  (:class:`adapters.message_store.StoreTransport`).

Reported: each mode's mean and median seconds per round (fit + evaluation exchange), the
coordination overhead per round (sites − simulation), the seconds until all four sessions
are ready (process start, imports, GX validation, split, ledger charge: paid once per run;
in a Prefect deployment add the worker's pick-up, about 1 s with
``PREFECT_WORKER_QUERY_SECONDS=1``), and the final accuracy of both.

    .venv/bin/python benchmarks/sites.py --out benchmarks/results/sites.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit, environment, require_public_dataset  # benchmarks/report.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.config_files import load_config  # noqa: E402
from adapters.message_store import READY, FolderStore, StoreTransport  # noqa: E402
from adapters.site_files import split_by_site  # noqa: E402
from adapters.tables import ClinicalTable  # noqa: E402
from fl_core.config.model import PipelineConfig
from fl_core.federation.messages import Shutdown, SiteReady, decode_message, encode_message  # noqa: E402
from fl_core.federation.wiring import federate, federate_over, make_dpsgd  # noqa: E402

SITE_PROCESS = """
import sys
from pathlib import Path
from adapters.message_store import FolderStore
from adapters.site_session import SiteSession, serve_site
from adapters.config_files import load_config
root, csv, site, index, store, session, state = sys.argv[1:8]
cfg = load_config(Path(root) / "params.yaml", sys.argv[8:])
serve_site(cfg, csv_path=Path(csv), site=site, index=int(index),
           session=SiteSession(FolderStore(Path(store), session), site, Path(state), session),
           idle_timeout_s=120)
"""


def round_seconds(history: list[Any]) -> list[float]:
    return [float(r.seconds) for r in history]


def simulation(cfg: PipelineConfig) -> tuple[list[float], float]:
    data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, cfg.seed)[0]
    run = federate(cfg, data, dp=make_dpsgd(cfg=cfg, data=data))
    return round_seconds(run.result.history), run.result.history[-1].accuracy


def sites(cfg: PipelineConfig, overrides: list[str], tmp: Path) -> tuple[list[float], float,
                                                                          float]:
    files = {}
    for site_file in split_by_site(ROOT / cfg.data.path, cfg.data.spec):
        path = tmp / "sites" / site_file.slug / "data.csv"
        path.parent.mkdir(parents=True)
        path.write_text(site_file.text())
        files[site_file.site] = path
    store = FolderStore(tmp / "store", "bench")
    started = time.perf_counter()
    procs = [subprocess.Popen(
        [sys.executable, "-c", SITE_PROCESS, str(ROOT), str(path), site, str(index),
         str(store.path.parent), "bench", str(tmp / "state" / str(index)), *overrides],
        cwd=ROOT) for index, (site, path) in enumerate(files.items())]
    try:
        ready = {}
        while len(ready) < len(files):
            for site in files:
                raw = store.get(site, "up", READY)
                if raw is not None and site not in ready:
                    message = decode_message(raw, site=site, expect=SiteReady)
                    ready[site] = message
            time.sleep(0.02)
        ready_seconds = time.perf_counter() - started
        transport = StoreTransport(store, list(files))
        run = federate_over(cfg, transport=transport,
                            patients={s: m.train_patients for s, m in ready.items()},
                            num_features=next(iter(ready.values())).num_features)
    finally:
        for site in files:
            seq = max(store.newest(site, "down"), store.newest(site, "up")) + 1
            store.put(site, "down", f"{seq:06d}", encode_message(Shutdown("bench", -1, "done")))
        for proc in procs:
            proc.wait(timeout=60)
    return round_seconds(run.result.history), run.result.history[-1].accuracy, ready_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    overrides = [f"rounds={args.rounds}", "privacy.randomness=reproducible"]
    cfg = load_config(ROOT / "params.yaml", overrides)
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    sim_rounds, sim_accuracy = simulation(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        site_rounds, site_accuracy, ready_seconds = sites(cfg, overrides, Path(tmp))
    overhead = statistics.mean(site_rounds) - statistics.mean(sim_rounds)
    result: dict[str, Any] = {
        "environment": environment(),
        "sites": 4, "rounds": args.rounds,
        "simulation": {"mean_round_seconds": round(statistics.mean(sim_rounds), 4),
                       "median_round_seconds": round(statistics.median(sim_rounds), 4),
                       "accuracy": round(sim_accuracy, 6)},
        "sites_mode": {"mean_round_seconds": round(statistics.mean(site_rounds), 4),
                       "median_round_seconds": round(statistics.median(site_rounds), 4),
                       "accuracy": round(site_accuracy, 6),
                       "sessions_ready_seconds": round(ready_seconds, 2)},
        "coordination_overhead_seconds_per_round": round(overhead, 4),
    }
    table = "\n".join([
        "| mode | mean s/round | median s/round | accuracy |", "|---|---|---|---|",
        f"| simulation (threads) | {result['simulation']['mean_round_seconds']} | "
        f"{result['simulation']['median_round_seconds']} | {sim_accuracy:.4f} |",
        f"| sites (processes, folder store) | {result['sites_mode']['mean_round_seconds']} | "
        f"{result['sites_mode']['median_round_seconds']} | {site_accuracy:.4f} |",
        f"\ncoordination overhead {overhead:+.4f} s per round; sessions ready after "
        f"{ready_seconds:.1f} s (once per run)"])
    return emit(result, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
