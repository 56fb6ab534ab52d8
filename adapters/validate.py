"""Stage 1: Great Expectations validation of the raw table, per site. Fails fast, never retried."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adapters.artifacts import Paths, write_json_atomic
from fl_core.config import PipelineConfig
from fl_core.data import file_fingerprint
from fl_core.validation import raise_if_failed, validate_file


def validate_data(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> dict[str, Any]:
    """Validate ``data.path``; write ``reports/validation.json``; raise if it failed."""
    paths = Paths.of(cfg, root, run_id)
    started = time.perf_counter()
    source = paths.root / cfg.data.path
    report = validate_file(source, cfg.data)
    summary = {
        "file": str(cfg.data.path),
        "sha256": file_fingerprint(source) if source.is_file() else None,
        "success": report.success,
        "sites": report.sites,
        "failures": [
            {"site": f.site, "expectation": f.expectation, "column": f.column,
             "observed": f.observed, "detail": f.detail}
            for f in report.failures
        ],
        "seconds": round(time.perf_counter() - started, 3),
        "results": report.results,
    }
    write_json_atomic(paths.validation, summary)
    raise_if_failed(source, report)
    print(f"validation passed: {sum(report.sites.values())} rows, sites {report.sites}")
    return summary


# A validation failure is a ValueError: the retry condition refuses it, so it fails fast.
