"""Time and peak memory of the robust aggregators in ``fl_core.robust.aggregators``.

For each cell of a grid of n clients × d parameters (default n ∈ {20, 50, 100}, d ∈ {10^5,
10^6}) the stacked updates are ``torch.randn(n, d)`` (float32, seeded generator), and every
method below runs on that same tensor, side by side, in one process on one CPU thread
(``torch.set_num_threads(1)`` unless ``--threads``):

* ``fedavg``, ``multi_krum``, ``krum``, ``trimmed_mean``, ``coordinate_median``,
  ``geometric_median``, ``centered_clipping``, ``nearest_neighbour_mixing`` from
  ``fl_core.robust.aggregators``. ``f = floor(0.3 n)`` Byzantine clients for the rules that
  take ``f``; for Krum and Multi-Krum ``f = min(floor(0.3 n), (n - 3) // 2)`` (they need
  ``n > 2f + 2``).
* ``loop_multi_krum_reference``: Multi-Krum written as a pure pairwise Python loop (one
  ``torch.sum((u[i] - u[j]) ** 2)`` per ordered pair, n² vector operations), then the same
  scores and selection; the cell reports ``same_selection``, whether it picks the same clients
  as ``fl_core``'s ``multi_krum``. Its time is estimated from one pair operation before it runs.
* ``bare_gram_matmul``: ``updates @ updates.T`` alone, the cost floor of Multi-Krum.

Time: median of repeats after one warm-up call (5 repeats, 3 for cells with n·d ≥ 5·10^7);
the loop reference runs once, without warm-up, in cells with n²·d ≥ 10^9.

Peak memory: the extra resident memory a call needs beyond what the process already holds
(the stacked updates included). Before each timed call: ``gc.collect()``, glibc
``malloc_trim(0)`` (so freed heap pages do not hide new allocations), write ``5`` to
``/proc/self/clear_refs`` (resets the kernel's high-water mark VmHWM to the current RSS) and
read VmRSS; after it read VmHWM. ``peak_extra_bytes = (VmHWM − VmRSS) · 1024``, the largest over
the timed calls; ``peak_over_stacked`` divides it by the stacked updates' ``4·n·d`` bytes. Both
are ``null``, with a reason, where ``/proc/self/clear_refs`` cannot be written.

Per cell: ``multi_krum_over_bare_matmul`` (time ratio) and ``loop_over_multi_krum`` (speed-up
of ``multi_krum`` over the loop reference). A ``targets`` block checks, in the n=100, d=10^6
cell: Multi-Krum time ≤ 1.5× the bare matmul, ≥ 10× faster than the loop reference, and peak
memory ≤ 2× the stacked updates. Output: one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/aggregation.py --out /tmp/agg.json
    .venv/bin/python benchmarks/aggregation.py --clients 20 50 --dims 1e5 --repeats 3
    .venv/bin/python benchmarks/aggregation.py --skip-loop-above 1e9
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import emit, environment  # benchmarks/report.py: the script's own folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_core.robust.aggregators import (
    centered_clipping,
    coordinate_median,
    fedavg,
    geometric_median,
    krum,
    multi_krum,
    nearest_neighbour_mixing,
    trimmed_mean,
)

BIG_CELL_ELEMENTS = 50_000_000  # n·d from which a cell gets --big-repeats
BIG_LOOP_WORK = 1_000_000_000  # n²·d from which the loop reference runs once, no warm-up
TARGET_CELL = (100, 1_000_000)
TARGET_TIME_OVER_MATMUL = 1.5
TARGET_SPEEDUP_OVER_LOOP = 10.0
TARGET_PEAK_OVER_STACKED = 2.0


def loop_multi_krum_reference(
    updates: torch.Tensor, f: int, num_selected: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Multi-Krum as a pure pairwise loop: n² distance computations, no Gram matrix.

    Score of client i: the sum of its ``n − f − 2`` smallest squared distances to the others;
    the ``m = n − f`` clients with the lowest scores are averaged (uniform weights).
    """
    n = updates.shape[0]
    m = n - f if num_selected is None else num_selected
    neighbours = max(n - f - 2, 1)
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            dist[i][j] = float(torch.sum((updates[i] - updates[j]) ** 2))
    scores = [sum(sorted(dist[i][j] for j in range(n) if j != i)[:neighbours])
              for i in range(n)]
    chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:m])
    aggregate = torch.zeros(updates.shape[1], dtype=updates.dtype)
    for i in chosen:
        aggregate += updates[i]
    return aggregate / m, chosen


def bare_gram_matmul(updates: torch.Tensor) -> torch.Tensor:
    """``updates @ updates.T``: the one pass over the updates that Multi-Krum cannot avoid."""
    return updates @ updates.T


class PeakMemory:
    """Extra resident memory of one call, from the kernel's resettable high-water mark."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._malloc_trim: Callable[[int], int] | None = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            self._malloc_trim = libc.malloc_trim
        except (OSError, AttributeError):
            self._malloc_trim = None
        try:
            self._reset()
            self._status_kib("VmRSS")
            self._status_kib("VmHWM")
        except (OSError, KeyError) as error:
            self.reason = f"cannot reset or read the RSS high-water mark: {error}"

    @property
    def available(self) -> bool:
        return self.reason is None

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(f"{field} not in /proc/self/status")

    def prepare(self) -> None:
        """Free what can be freed, then reset the high-water mark to the current RSS."""
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        if self.available:
            self._reset()

    def rss_kib(self) -> int | None:
        return self._status_kib("VmRSS") if self.available else None

    def hwm_kib(self) -> int | None:
        return self._status_kib("VmHWM") if self.available else None


def measure(
    fn: Callable[[], Any], repeats: int, warm_up: bool, memory: PeakMemory
) -> dict[str, Any]:
    """Median seconds over ``repeats`` calls and the largest extra peak RSS among them."""
    if warm_up:
        fn()  # first calls pay for allocation and lazy initialisation
    times: list[float] = []
    peaks: list[int] = []
    for _ in range(repeats):
        memory.prepare()
        before = memory.rss_kib()
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
        after = memory.hwm_kib()
        del result
        times.append(elapsed)
        if before is not None and after is not None:
            peaks.append(max(after - before, 0) * 1024)
    return {
        "seconds": round(statistics.median(times), 6),
        "repeats": repeats,
        "warm_up": warm_up,
        "peak_extra_bytes": max(peaks) if peaks else None,
    }


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


def krum_f(n: int) -> int:
    return min(math.floor(0.3 * n), (n - 3) // 2)


def estimate_loop_seconds(updates: torch.Tensor) -> float:
    """n² times the median cost of one pair operation ``torch.sum((u_0 − u_1)²)``."""
    n = updates.shape[0]
    j = 1 if n > 1 else 0

    def pair() -> float:
        return float(torch.sum((updates[0] - updates[j]) ** 2))

    pair()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        pair()
        times.append(time.perf_counter() - started)
    return n * n * statistics.median(times)


def run_cell(
    n: int, d: int, repeats: int, seed: int, skip_loop_above: float | None, memory: PeakMemory
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, d, generator=generator, dtype=torch.float32)
    f = math.floor(0.3 * n)
    fk = krum_f(n)
    stacked = n * d * updates.element_size()
    methods: dict[str, Callable[[], Any]] = {
        "fedavg": lambda: fedavg(updates),
        "multi_krum": lambda: multi_krum(updates, fk),
        "krum": lambda: krum(updates, fk),
        "trimmed_mean": lambda: trimmed_mean(updates, f),
        "coordinate_median": lambda: coordinate_median(updates),
        "geometric_median": lambda: geometric_median(updates),
        "centered_clipping": lambda: centered_clipping(updates),
        "nearest_neighbour_mixing": lambda: nearest_neighbour_mixing(updates, f),
        "bare_gram_matmul": lambda: bare_gram_matmul(updates),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        results[name] = measure(fn, repeats, warm_up=True, memory=memory)
        print(f"n={n:>4} d={d:>9,} {name:<26} {results[name]['seconds']:9.4f} s",
              file=sys.stderr, flush=True)

    loop_work = n * n * d
    same_selection: bool | None = None
    if skip_loop_above is not None and loop_work > skip_loop_above:
        results["loop_multi_krum_reference"] = {
            "skipped": f"n²·d = {loop_work:.3g} > --skip-loop-above {skip_loop_above:.3g}"}
        print(f"n={n:>4} d={d:>9,} loop_multi_krum_reference  skipped", file=sys.stderr,
              flush=True)
    else:
        estimate = estimate_loop_seconds(updates)
        big = loop_work >= BIG_LOOP_WORK
        loop_repeats = 1 if big else repeats
        print(f"n={n:>4} d={d:>9,} loop_multi_krum_reference  estimated "
              f"{estimate * (loop_repeats + (0 if big else 1)):.1f} s for "
              f"{loop_repeats} run(s){'' if big else ' + warm-up'}", file=sys.stderr, flush=True)
        picked: list[list[int]] = []

        def loop_call() -> torch.Tensor:
            aggregate, chosen = loop_multi_krum_reference(updates, fk)
            picked.append(chosen)
            return aggregate

        entry = measure(loop_call, loop_repeats, warm_up=not big, memory=memory)
        entry["estimated_seconds"] = round(estimate, 3)
        results["loop_multi_krum_reference"] = entry
        print(f"n={n:>4} d={d:>9,} {'loop_multi_krum_reference':<26} {entry['seconds']:9.4f} s",
              file=sys.stderr, flush=True)
        same_selection = picked[-1] == multi_krum(updates, fk).selected

    for entry in results.values():
        if "skipped" not in entry:
            entry["peak_over_stacked"] = ratio(entry["peak_extra_bytes"], stacked)
    loop_seconds = results["loop_multi_krum_reference"].get("seconds")
    mk_seconds = results["multi_krum"]["seconds"]
    return {
        "n": n, "d": d, "f": f, "f_krum": fk, "stacked_bytes": stacked, "repeats": repeats,
        "methods": results,
        "same_selection": same_selection,
        "multi_krum_over_bare_matmul": ratio(mk_seconds, results["bare_gram_matmul"]["seconds"]),
        "loop_over_multi_krum": ratio(loop_seconds, mk_seconds, 1),
    }


def targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    n, d = TARGET_CELL
    cell = next((c for c in cells if (c["n"], c["d"]) == TARGET_CELL), None)
    if cell is None:
        return {"cell": {"n": n, "d": d}, "reason": "cell not in the grid", "all_met": None}

    def check(value: float | None, limit: float, at_most: bool) -> dict[str, Any]:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        return {"value": value, ("at_most" if at_most else "at_least"): limit, "met": met}

    checks = {
        "multi_krum_time_over_bare_matmul": check(
            cell["multi_krum_over_bare_matmul"], TARGET_TIME_OVER_MATMUL, at_most=True),
        "multi_krum_speedup_over_loop_reference": check(
            cell["loop_over_multi_krum"], TARGET_SPEEDUP_OVER_LOOP, at_most=False),
        "multi_krum_peak_over_stacked": check(
            cell["methods"]["multi_krum"]["peak_over_stacked"], TARGET_PEAK_OVER_STACKED,
            at_most=True),
    }
    met = [c["met"] for c in checks.values()]
    return {
        "cell": {"n": n, "d": d},
        **checks,
        "all_met": None if None in met else all(met),
    }


def run(
    clients: list[int], dims: list[int], repeats: int, big_repeats: int, seed: int,
    skip_loop_above: float | None, threads: int,
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(threads)
    memory = PeakMemory()
    if not memory.available:
        print(f"peak memory not measured: {memory.reason}", file=sys.stderr, flush=True)
    cells = []
    for n in clients:
        for d in dims:
            cell_repeats = big_repeats if n * d >= BIG_CELL_ELEMENTS else repeats
            cells.append(run_cell(n, d, cell_repeats, seed, skip_loop_above, memory))
    return {
        "benchmark": "aggregation",
        **environment(),
        "seed": seed,
        "peak_memory": {
            "method": "VmHWM - VmRSS after gc.collect, malloc_trim(0) and clear_refs=5",
            "available": memory.available,
            "reason": memory.reason,
        },
        "cells": cells,
        "targets": targets(cells),
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[20, 50, 100],
                        help="numbers of clients n (default: %(default)s)")
    parser.add_argument("--dims", nargs="+", type=float, default=[1e5, 1e6],
                        help="parameters per update d (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per method after a warm-up (default: %(default)s)")
    parser.add_argument("--big-repeats", type=int, default=3,
                        help=f"timed calls in cells with n·d >= {BIG_CELL_ELEMENTS:.0e} "
                             "(default: %(default)s)")
    parser.add_argument("--skip-loop-above", type=float, default=None, metavar="N",
                        help="skip the loop reference in cells whose n²·d exceeds N, "
                             "e.g. 1e9 (default: never skip)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.big_repeats < 1 or args.threads < 1:
        parser.error("--repeats, --big-repeats and --threads must be >= 1")
    result = run(args.clients, [int(d) for d in args.dims], args.repeats, args.big_repeats,
                 args.seed, args.skip_loop_above, args.threads)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
