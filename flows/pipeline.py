"""The Prefect flow ``fl-pipeline``: validate → partition → train → audit → register.

Each stage is a task from ``tasks/`` with retries for transient faults only; the stages pass
files (the same files ``dvc repro`` tracks), so a flow run and a DVC run are one pipeline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from fl_core.config import load_config
from tasks.audit import audit
from tasks.partition import partition
from tasks.publish import publish
from tasks.train import train
from tasks.validate import validate


def summary_markdown(metrics: dict[str, Any], registration: dict[str, Any]) -> str:
    """The run summary shown in the Prefect UI."""

    def fmt(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in metrics.items())
    budget = registration.get("budget_spent") or {}
    privacy = (
        f"Privacy: {registration.get('privacy')}, (ε = {fmt(metrics.get('epsilon'))}, "
        f"δ = {metrics.get('delta'):g}) per patient; lifetime budget spent of "
        f"ε = {registration.get('lifetime_epsilon')}: "
        + ", ".join(f"{site} {eps:.2f}" for site, eps in budget.items())
        if metrics.get("epsilon") is not None
        else "Privacy: **not differentially private** (privacy.enabled=false)")
    gate = "passed → **champion**" if registration.get("gate_passed") else (
        "refused: " + "; ".join(registration.get("gate_reasons", [])))
    return (
        f"# fedpriv run\n\nModel `{registration.get('model_name')}` version "
        f"**{registration.get('model_version')}** (alias `challenger`); gate {gate}.\n\n"
        f"{privacy}.\n\nMLflow run `{registration.get('run_id')}`.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


@flow(name="fl-pipeline", log_prints=True)
def fl_pipeline(
    overrides: list[str] | None = None, params_path: str = "params.yaml", root: str = "."
) -> dict[str, Any]:
    """Run the whole pipeline; ``overrides`` are ``key=value`` strings over ``params.yaml``."""
    started = time.perf_counter()
    root_path = Path(root).resolve()
    cfg = load_config(root_path / params_path, overrides or [])
    validate(cfg, root_path)
    partition(cfg, root_path)
    train(cfg, root_path)
    audit(cfg, root_path)
    outcome = publish(cfg, root_path, wall_seconds=time.perf_counter() - started)
    create_markdown_artifact(
        key="fl-pipeline-summary",
        markdown=summary_markdown(outcome["metrics"], outcome["registration"]),
        description="fedpriv run summary",
    )
    return outcome
