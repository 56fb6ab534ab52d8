"""``federation.mode=sites`` at the coordinator, without Prefect: what the sites reported at
the start becomes the run's ``validation.json`` and ``partition.json`` (summaries and counts
only: no patient id or cell value reaches the coordinator), and the run goes on only with the
sites that are ready, and not at all if one of them cannot afford it."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adapters.artifacts import Paths, write_json_atomic
from adapters.metrics import record_site_check
from fl_core.config.model import PipelineConfig
from fl_core.data.tables import DataError
from fl_core.federation.coordinator import RoundFailedError
from fl_core.federation.messages import SiteReady
from fl_core.privacy.ledger import BUDGET_REFUSAL, BudgetExceededError
from fl_core.results import SitesValidation


def _summary(message: SiteReady) -> dict[str, Any]:
    """The site's validation summary, the budget it reported having left (by its own policy
    and ledger: the coordinator records it, it does not decide it) and its ledger's head."""
    reported = {"budget_left": message.budget_left, "ledger_head": message.ledger_head}
    try:
        parsed = json.loads(message.validation)
    except ValueError:
        return {"passed": message.passed, "unreadable": True, **reported}
    summary = parsed if isinstance(parsed, dict) else {"passed": message.passed}
    return {**summary, **reported}


def record_sites(cfg: PipelineConfig, root: str | Path, run_id: str,
                 ready: Mapping[str, SiteReady], refused: Mapping[str, str],
                 seconds: float) -> list[str]:
    """Write the sites' validation summaries and split counts; return the sites that train.

    A site whose data failed validation stops the run (exit 3, like a failed file in
    simulation); a site that never came up or refused (no worker, its ledger's cap) is left
    out and named; fewer than ``min_clients`` sites left fails the run (exit 4)."""
    paths = Paths.of(cfg, root, run_id)
    started = time.perf_counter()
    record_site_check(cfg, run_id, ready, refused)  # monitoring on only
    _write_validation(paths, ready, refused, seconds)
    _refuse_unaffordable(refused)
    # in the configured order (the simulation's), not the order the sites came up in
    usable = [spec.id for spec in cfg.federation.sites
              if spec.id in ready and spec.id not in refused]
    for site, why in refused.items():  # every ready site passed: _write_validation raised if not
        print(f"site {site} is left out of this run: {why}")
    write_json_atomic(paths.partition, {
        "scheme": "by_site", "mode": "sites", "seed": cfg.seed,
        "sites": {s: {"train": ready[s].train_patients, "test": ready[s].test_patients}
                  for s in usable}})
    _check_enough_sites(cfg, usable, refused)
    counts = ", ".join(f"{s} ({ready[s].train_patients} train / {ready[s].test_patients} test "
                       f"patients, ε budget left {ready[s].budget_left:.3g})" for s in usable)
    print(f"sites ready: {counts} in {seconds + time.perf_counter() - started:.1f} s")
    return usable


def _write_validation(paths: Paths, ready: Mapping[str, SiteReady], refused: Mapping[str, str],
                      seconds: float) -> None:
    """``validation.json`` from the sites' summaries; a site whose data failed stops the run."""
    invalid = {s: m for s, m in ready.items() if not m.passed}
    report = SitesValidation(success=not invalid, seconds=round(seconds, 3),
                             sites={s: _summary(m) for s, m in ready.items()},
                             unavailable=dict(refused))
    write_json_atomic(paths.validation, report.to_dict())
    if invalid:
        raise DataError(
            "; ".join(f"[{s}] {refused.get(s, 'failed validation')}" for s in invalid))


def _refuse_unaffordable(refused: Mapping[str, str]) -> None:
    """A site that cannot afford the run (its own ledger, its own cap) stops it here, before
    any instruction is sent: no site has charged its ledger yet (they charge on their first
    instruction), so the run costs nobody anything."""
    poor = {s: why.removeprefix(BUDGET_REFUSAL) for s, why in refused.items()
            if why.startswith(BUDGET_REFUSAL)}
    if poor:
        raise BudgetExceededError(
            f"site(s) {', '.join(sorted(poor))} cannot afford this run, by their own policy and "
            f"ledger; nothing was trained and no site was charged: "
            + " | ".join(f"[{s}] {why}" for s, why in sorted(poor.items())))


def _check_enough_sites(cfg: PipelineConfig, usable: list[str],
                        refused: Mapping[str, str]) -> None:
    if len(usable) < cfg.min_clients:
        raise RoundFailedError(
            f"only {len(usable)} site(s) ready ({', '.join(usable) or 'none'}), min_clients="
            f"{cfg.min_clients}: " + "; ".join(f"{s}: {w}" for s, w in refused.items()))
