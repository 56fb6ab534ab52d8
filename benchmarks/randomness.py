"""What secret noise costs: the OS-entropy source against the seeded Mersenne Twister.

Side by side in one process, one thread, best of ``--repeats``:

* **draws** — ``normal(10^6)`` and ``uniform(10^6)`` from :class:`SecureRandom` (os.urandom,
  Box–Muller in float64, four draws per value as in Opacus's ``secure_mode``) and from
  :class:`SeededRandom` (``torch.normal`` / ``torch.rand`` on a seeded ``torch.Generator``, what
  Opacus uses without ``secure_mode``);
* **DP-SGD** — the default recipe's local training of every client for 20 rounds
  (``PatientDPTrainer`` on the seed-0 partition of the embedded data), noise and Poisson
  sampling from each source.

Output: JSON on stdout (``--out`` for a copy), Markdown on stderr.

    .venv/bin/python benchmarks/randomness.py --out benchmarks/results/randomness.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import emit, environment, require_public_dataset  # benchmarks/report.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.config_files import load_config  # noqa: E402
from adapters.tables import ClinicalTable  # noqa: E402
from fl_core.federation.wiring import make_dpsgd  # noqa: E402
from fl_core.model.networks import build_model  # noqa: E402
from fl_core.privacy.dpsgd import PatientDPTrainer, group_records  # noqa: E402
from fl_core.privacy.randomness import RandomSource, SecureRandom, SeededRandom  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
SOURCES: dict[str, Callable[[int], RandomSource]] = {
    "secure": lambda r: SecureRandom(), "reproducible": SeededRandom}


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def draw_costs(n: int, repeats: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, make in SOURCES.items():
        source = make(0)
        out[name] = {
            "normal_seconds": round(best_of(repeats, lambda s=source: s.normal((n,), 1.0)), 5),
            "uniform_seconds": round(best_of(repeats, lambda s=source: s.uniform(n)), 5),
        }
    return out


def training_costs(repeats: int) -> dict[str, float]:
    """The default recipe's local DP training, every client, 20 rounds, per source."""
    cfg = load_config(ROOT / "params.yaml")
    require_public_dataset(ROOT / cfg.data.path)  # not charged: public data only
    data = ClinicalTable.get(cfg.data, ROOT).partitioned(cfg.data, 0)[0]
    recipe = make_dpsgd(cfg=cfg, data=data)  # the run's recipe, σ calibrated as a run does
    assert recipe is not None, "the default configuration has DP-SGD on"
    grouped = [group_records(d.x_train, d.y_train, d.patient_ids()) for d in data]
    features = int(data[0].x_train.shape[1])

    def run(make: Callable[[int], RandomSource]) -> None:
        for patients in grouped:
            model = build_model(cfg.model, features, hidden_units=cfg.hidden_units, seed=0)
            trainer = PatientDPTrainer(model=model, data=patients, cfg=recipe)
            for r in range(cfg.rounds):
                trainer.train(cfg.local_epochs, make(r))

    return {name: round(best_of(repeats, lambda m=make: run(m)), 4)
            for name, make in SOURCES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="values per draw")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draws = draw_costs(args.n, args.repeats)
    training = training_costs(max(1, args.repeats // 2))
    result: dict[str, Any] = {
        "environment": environment(),
        "n": args.n,
        "draws": draws,
        "normal_ratio_secure_over_reproducible": round(
            draws["secure"]["normal_seconds"] / draws["reproducible"]["normal_seconds"], 2),
        "dp_training_seconds": training,
        "dp_training_ratio_secure_over_reproducible": round(
            training["secure"] / training["reproducible"], 3),
    }
    table = "\n".join([
        f"| source | normal({args.n:g}) s | uniform({args.n:g}) s | DP training, 4 clients × "
        f"20 rounds, s |", "|---|---|---|---|",
        *(f"| {k} | {draws[k]['normal_seconds']} | {draws[k]['uniform_seconds']} | "
          f"{training[k]} |" for k in SOURCES)])
    return emit(result, args.out, table)


if __name__ == "__main__":
    raise SystemExit(main())
