"""Stage 1: Great Expectations validation of the raw table, per site. Fails fast, never retried."""

from __future__ import annotations

import time
from pathlib import Path

from adapters.artifacts import Paths, write_json_atomic
from adapters.gx_validation import validate_sources
from adapters.tables import file_fingerprint
from fl_core.config.model import PipelineConfig
from fl_core.data.validation import raise_if_failed
from fl_core.results import ValidationSummary


def validate_data(
    cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None
) -> ValidationSummary:
    """Validate ``data.path`` (or each of ``data.site_files``); write
    ``reports/validation.json``; raise if it failed."""
    paths = Paths.of(cfg, root, run_id)
    started = time.perf_counter()
    sources = cfg.data.sources(paths.root)
    report = validate_sources(sources, cfg.data)
    digests = {site: file_fingerprint(path) if path.is_file() else None
               for path, site in sources}
    per_site = cfg.data.site_files is not None  # one file per site: file and digest by site
    summary = ValidationSummary(
        file=dict(cfg.data.site_files) if per_site else str(cfg.data.path),
        sha256=digests if per_site else digests[None],
        success=report.success,
        sites=report.sites,
        failures=[
            {"site": f.site, "expectation": f.expectation, "column": f.column,
             "observed": f.observed, "detail": f.detail}
            for f in report.failures
        ],
        seconds=round(time.perf_counter() - started, 3),
        results=report.results,
    )
    write_json_atomic(paths.validation, summary.to_dict())
    raise_if_failed(cfg.data.source_text if per_site else sources[0][0], report)
    print(f"validation passed: {sum(report.sites.values())} rows, sites {report.sites}")
    return summary


# A validation failure is a ValueError: the retry condition refuses it, so it fails fast.
