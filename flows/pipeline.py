"""The Prefect flow ``fl-pipeline``: validate → partition → train → audit → register.

Each stage is a task from ``tasks/`` with retries for transient faults only; the stages pass
files in the run's own workspace (``<state_dir>/runs/<run_id>/``), published to ``reports/``
and ``data/`` (the files ``dvc repro`` tracks) once the run has succeeded.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from adapters.artifacts import (
    Paths,
    UnpublishedError,
    claim_workspace,
    end_workspace,
    new_run_id,
    publish_run,
    reap_dead_workspaces,
    release_workspace,
)
from adapters.config_files import load_config
from adapters.dp_audit import dp_audit_markdown, kept_verdicts
from adapters.ledger_store import LedgerIntegrityError
from adapters.preflight import PreflightError, preflight
from adapters.publish import describe_budget
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.data.tables import DataError
from fl_core.data.validation import DataValidationError
from fl_core.privacy.ledger import BudgetExceededError, MissingChargeError
from fl_core.results import AuditReport, PublishOutcome, Registration, TrainingSummary
from flows.site_dispatch import run_at_sites
from tasks.audit import audit
from tasks.dp_audit import dp_audit
from tasks.partition import partition
from tasks.publish import publish
from tasks.train import train
from tasks.validate import validate

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    DataError, DataValidationError, ConfigError, PreflightError, BudgetExceededError,
    MissingChargeError, LedgerIntegrityError)
"""Errors `fedpriv` reports in one line with their own exit code (docs/errors.md)."""


class BriefExpectedErrors(logging.Filter):
    """Prefect logs a failed flow run's exception with its whole traceback (60-odd lines
    through its engine); for :data:`EXPECTED_ERRORS` the message says it all: the record
    keeps its one-line message and loses the traceback (terminal and Prefect API alike)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


def brief_expected_errors() -> None:
    """Install :class:`BriefExpectedErrors` on Prefect's flow- and task-run loggers (once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, BriefExpectedErrors) for f in logger.filters):
            logger.addFilter(BriefExpectedErrors())


def summary_markdown(metrics: dict[str, Any], registration: Registration) -> str:
    """The run summary shown in the Prefect UI."""

    from fl_core.results import format_metric as fmt

    rows = "\n".join(f"| {k} | {fmt(v)} |" for k, v in metrics.items())
    statistics = metrics.get("statistics_epsilon")
    released = ("" if statistics is None else
                f"released statistics ε = {fmt(statistics)} for the test patients; ")
    privacy = (
        f"Privacy: {registration.privacy}, (ε = {fmt(metrics['epsilon'])}, "
        f"δ = {metrics['delta']:g}) per patient, add/remove one patient "
        f"(replace-one ε = {fmt(metrics['epsilon_replace_one'])}); {released}DP noise "
        f"{metrics['randomness']}; {describe_budget(registration)}"
        if metrics["epsilon"] is not None
        else "Privacy: **not differentially private** (privacy.enabled=false)")
    gate = "passed → **champion**" if registration.gate_passed else (
        "refused: " + "; ".join(registration.gate_reasons))
    return (
        f"# fedpriv run\n\nModel `{registration.model_name}` version "
        f"**{registration.model_version}** (alias `challenger`); gate {gate}.\n\n"
        f"{privacy}.\n\nMLflow run `{registration.run_id}`.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


def failures_markdown(training: TrainingSummary) -> str:
    """The sites that failed a round, and which rounds (from the run's round records)."""
    failed = training.failed_rounds()
    if not failed:
        return ""
    lines = "\n".join(f"| {site} | {', '.join(map(str, rounds))} |"
                      for site, rounds in failed.items())
    return (f"\n## Sites that failed a round\n\nThe rounds went on without them (see "
            f"`rounds.csv` and the log for why).\n\n| site | rounds |\n|---|---|\n{lines}\n")


def audit_markdown(report: AuditReport) -> str:
    """Every attack's figures, for the Prefect UI."""
    if not report.enabled:
        return "\n**Audit disabled**: the gate refuses promotion.\n"
    rows = "\n".join(
        f"| {a['attack']} | {a['auc']:.3f} | {a['tpr_at_1pct_fpr']:.3f} | "
        f"{a['tpr_at_0_1pct_fpr']:.3f} | {a['advantage']:.3f} | {a['epsilon_lower_bound']:.3f} |"
        for a in report.attacks)
    verdict = ("consistent with the accountant" if report.privacy_consistent
               else "**PRIVACY FAILURE: the attack beats the DP guarantee**")
    return (f"\n## Membership-inference audit\n\n{report.members} members vs "
            f"{report.non_members} non-members, {report.shadow_models} shadow models, "
            f"{report.seconds:.1f} s; {verdict}.\n\n| attack | AUC | TPR@1%FPR | "
            f"TPR@0.1%FPR | advantage | ε lower bound |\n|---|---|---|---|---|---|\n{rows}\n")


def mark_crashed(reaped: list[dict[str, Any]]) -> None:
    """Mark the Prefect flow runs of killed runs CRASHED (their workspaces are gone)."""
    if not reaped:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for owner in reaped:
            done = ("its registration had completed: published its results"
                    if owner.get("published") else "removed its workspace")
            how = "a killed" if owner.get("killed", True) else "an unpublished"
            print(f"reaped {how} run (pid {owner['pid']}, {owner['workspace']}): {done}")
            if not owner.get("flow_run_id"):
                continue
            try:
                if client.read_flow_run(owner["flow_run_id"]).state.is_final():
                    continue  # it ended on its own: keep its state
                client.set_flow_run_state(owner["flow_run_id"], Crashed(
                    message=f"process {owner['pid']} was killed; found by a later run"),
                    force=True)
            except Exception as exc:  # the record may be gone: cleaning up must not fail runs
                print(f"could not mark flow run {owner['flow_run_id']} crashed: {exc}")


@flow(name="fl-pipeline", log_prints=True)
def fl_pipeline(
    overrides: list[str] | None = None, params_path: str = "params.yaml", root: str = ".",
    config: PipelineConfig | None = None,
) -> PublishOutcome:
    """Run the whole pipeline on ``config``, as ``fedpriv run`` parsed it; without one (a
    deployment's run), on ``params_path`` with ``overrides`` (``key=value`` strings).

    The configuration is a flow-run parameter, shown in the Prefect UI: settings, paths and
    the dataset schema (column names, ranges, categories), never a patient's data; it holds
    no secret unless one is written into it (keep credentials out of ``mlflow.tracking_uri``:
    MLflow reads them from its own environment variables).
    """
    started = time.perf_counter()
    brief_expected_errors()
    root_path = Path(root).resolve()
    cfg = config if config is not None else load_config(root_path / params_path,
                                                        overrides or [])
    # this run's own workspace, claimed first: a kill from here on is found by a later run;
    # a concurrent run in the same checkout never sees its files
    run_id = new_run_id()
    workspace = Paths.of(cfg, root_path, run_id)
    claim_workspace(workspace, str(runtime.flow_run.id))
    try:
        preflight(cfg, root_path)  # MLflow store, ledger, reports: before anything is trained
    except BaseException:
        shutil.rmtree(workspace.workspace, ignore_errors=True)  # nothing in it yet
        release_workspace(workspace)
        raise
    mark_crashed(reap_dead_workspaces(cfg, root_path))  # what killed runs left behind
    print(f"run {run_id}: workspace {workspace.workspace}")
    try:
        dp_audited = None
        if cfg.federation.mode == "sites":  # each site in its own session, at the site
            trained, audited = run_at_sites(
                cfg, root_path, run_id, charge_key=str(runtime.flow_run.id).replace("-", ""))
        else:
            validate(cfg, root_path, run_id=run_id)
            partition(cfg, root_path, run_id=run_id)
            trained = train(cfg, root_path, run_id=run_id)
            audited = audit(cfg, root_path, run_id=run_id)
        # the gate reads the verdict kept for this configuration (adapters.dp_audit)
        dp_audited = dp_audit(cfg, root_path, run_id=run_id) if cfg.audit_dp.in_pipeline \
            else None
        outcome = publish(cfg, root_path, wall_seconds=time.perf_counter() - started,
                          run_id=run_id)
    except BaseException:
        end_workspace(workspace, "failed")  # kept for its reports; not a killed run's
        raise
    try:
        publish_run(cfg, root_path, run_id)  # reports/ and data/ now show this run
    except OSError as exc:  # the registry is final: say so, and publish at the next start
        end_workspace(workspace, "unpublished")
        registration = outcome.registration
        raise UnpublishedError(
            f"model {registration.model_name} v{registration.model_version} is "
            f"registered (aliases: {', '.join(registration.aliases) or 'none'}) "
            f"but the published reports could not be updated ({exc}); they still show the "
            f"previous run. The next run publishes this one's from {workspace.workspace}"
        ) from exc
    create_markdown_artifact(
        key="fl-pipeline-summary",
        markdown=summary_markdown(outcome.metrics, outcome.registration)
        + failures_markdown(trained)
        + audit_markdown(audited)
        + "".join(dp_audit_markdown(r) for r in
                  ([dp_audited] if dp_audited else kept_verdicts(cfg, root_path))),
        description="fedpriv run summary",
    )
    roc = Paths.of(cfg, root_path).roc_plot
    if roc.exists():
        create_link_artifact(key="fl-pipeline-mia-roc", link=roc.as_uri(),
                             link_text="membership-inference ROC, every attack (log scale)",
                             description="also in the MLflow run under reports/")
    release_workspace(workspace)  # finished: nothing left for a later run to clean up
    return outcome
