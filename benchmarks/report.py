"""How every benchmark reports: the JSON result on stdout, optionally a copy on disk."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any


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
