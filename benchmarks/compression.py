"""Wire size and speed of the top-k + b-bit codec against a naive top-k baseline.

For each update size n (10^4 … 10^7 float32 elements, standard normal, so the kept support is
random: the case the bound below is stated for) and each density p, in one process on one CPU
thread (``torch.set_num_threads(1)``):

* ``fedpriv``  ``TopKQuantizer(p, bits)``: framed, CRC-checked payload, indices Rice- or
               bitmap-coded, values at ``bits`` bits with a float32 scale per 1024 values.
* ``naive``    ``torch.topk`` of the magnitudes, then float32 values and int32 indices
               concatenated, plus an 8-byte (n, k) header; decoding scatters into zeros.

Reported per case: ``ratio`` = dense float32 payload bytes (``16 + 4n``, frame included) over
the payload's bytes; ``bound_ratio`` = ``32 / (p·b + H(p))``, the best any encoding of a random
support with b-bit values can do (H the binary entropy); ``fraction_of_bound``; encode and
decode throughput in million elements per second (median of repeats); and
``encode_decode_seconds``. Output: one JSON object on stdout.

    .venv/bin/python benchmarks/compression.py
    .venv/bin/python benchmarks/compression.py --sizes 1e4 1e6 --densities 0.1 --bits 4
"""

from __future__ import annotations

import argparse
import math
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import emit, environment  # benchmarks/report.py: the script's own folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_core.codec.dense import dense_size  # noqa: E402
from fl_core.codec.topk import TopKQuantizer

NAIVE_HEADER = struct.Struct("<II")


def naive_encode(x: torch.Tensor, density: float) -> bytes:
    k = max(1, round(density * x.numel()))
    _, indices = torch.topk(x.abs(), k, sorted=False)
    return (NAIVE_HEADER.pack(x.numel(), k) + indices.to(torch.int32).numpy().tobytes()
            + x[indices].numpy().tobytes())


def naive_decode(payload: bytes) -> torch.Tensor:
    n, k = NAIVE_HEADER.unpack_from(payload)
    body = bytearray(payload[NAIVE_HEADER.size :])
    indices = torch.frombuffer(body, dtype=torch.int32, count=k).long()
    values = torch.frombuffer(body, dtype=torch.float32, count=k, offset=4 * k)
    out = torch.zeros(n)
    out[indices] = values
    return out


def binary_entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(
    encode: Callable[[torch.Tensor], bytes], decode: Callable[[bytes], torch.Tensor],
    x: torch.Tensor, repeats: int,
) -> dict[str, float]:
    payload = encode(x)
    enc = median_seconds(lambda: encode(x), repeats)
    dec = median_seconds(lambda: decode(payload), repeats)
    n = x.numel()
    return {
        "bytes": len(payload),
        "ratio": round(dense_size(n) / len(payload), 2),
        "encode_melem_per_s": round(n / enc / 1e6, 1),
        "decode_melem_per_s": round(n / dec / 1e6, 1),
        "encode_decode_seconds": round(enc + dec, 4),
    }


def run(sizes: list[int], densities: list[float], bits: int, seed: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for n in sizes:
        x = torch.randn(n, generator=generator)
        repeats = 3 if n >= 5_000_000 else 7
        for p in densities:
            codec = TopKQuantizer(p, bits)
            ours = measure(codec.encode, codec.decode, x, repeats)
            naive = measure(lambda t, p=p: naive_encode(t, p), naive_decode, x, repeats)
            bound = 32 / (p * bits + binary_entropy(p))
            cases.append({
                "n": n, "density": p, "bits": bits,
                "bound_ratio": round(bound, 1),
                "fedpriv": {**ours, "fraction_of_bound": round(ours["ratio"] / bound, 3)},
                "naive": naive,
            })
            print(f"n={n:>9,} p={p:<6} fedpriv {ours['ratio']:>7.1f}x "
                  f"({ours['ratio'] / bound:.1%} of bound {bound:.1f}x), "
                  f"enc+dec {ours['encode_decode_seconds'] * 1000:.0f} ms | naive "
                  f"{naive['ratio']:.1f}x, {naive['encode_decode_seconds'] * 1000:.0f} ms",
                  file=sys.stderr, flush=True)
    return {
        "benchmark": "compression",
        **environment(),
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6, 1e7],
                        help="update sizes in elements (default: %(default)s)")
    parser.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.01, 0.001],
                        help="top-k densities (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=8, help="bits per kept value (2..8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run([int(s) for s in args.sizes], args.densities, args.bits, args.seed)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
