"""``fedpriv run --dry-run``: the user's configuration and schema tried on synthetic rows.

Rows are drawn from the dataset schema alone (:mod:`fl_core.data.synthetic`: no patient file
is read) and written to a temporary folder; then the real stages run on them, in that
folder: GX validation, the partition (with the per-site data report), a few rounds of
training with the configured recipe (DP-SGD calibrated for the configured number of rounds),
the membership audit (two shadows) and the promotion gate. By design:

* nothing is charged: the training is :func:`train_uncharged` (no ledger is opened, not
  even checked; the privacy accounting is computed and printed), and preflight's ledger
  and MLflow checks are skipped;
* nothing is registered (MLflow is never imported) and nothing is published: every file is
  in the temporary folder, removed at the end (``reports/`` and ``data/`` are untouched);
* it runs in simulation (all sites in this process), also for a ``federation.mode=sites``
  configuration: the sites' own policies, ledgers and endpoints are not tried.

The labels are random, so the model learns nothing and the gate refuses it on its figures:
that is expected. What counts is what the gate would refuse *whatever the data*: the gate is
evaluated again with ideal figures (perfect separation on a million test patients, an audit
that finds nothing); a refusal left then (reproducible noise, no DP, the audit off, a
threshold no model can meet, a DP implementation audit that failed) is a configuration error
(exit 2), found before a real run spends budget on it.
"""

from __future__ import annotations

import math
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.artifacts import Paths, read_training
from adapters.audit import audit_model
from adapters.data_report import REPORT_JSON
from adapters.dp_audit import dp_audit_metrics
from adapters.partition import load_client_data, partition_data
from adapters.publish import collect_metrics
from adapters.train import print_progress, write_training_outputs
from adapters.validate import validate_data
from fl_core.audit.gate import evaluate_gate, gate_thresholds
from fl_core.config.model import ConfigError, PipelineConfig, site_slug
from fl_core.data.synthetic import SyntheticPlan, split_by_site, synthetic_rows
from fl_core.federation.wiring import (
    describe_compression,
    federate,
    make_dpsgd,
    parameter_count,
)
from fl_core.privacy.accounting import describe_privacy, privacy_summary
from fl_core.results import TrainingSummary

DRY_RUN_ROUNDS = 2
"""Rounds trained in a dry run (fewer if the configuration asks for fewer)."""

DRY_RUN_SHADOWS = 2
"""Shadow models of the dry run's membership audit (fewer if configured)."""

BY_PATIENT_SHARE = 30
"""Synthetic patients per client under ``data.partition=by_patient`` (all sites together)."""

IDEAL_TEST_PATIENTS = 1_000_000
"""Per class, in the ideal evaluation the gate is tried against."""


@dataclass(frozen=True)
class DryRunResult:
    """What the dry run found."""

    rows: int
    patients: int
    sites: list[str]
    rounds: int
    epsilon: float | None
    synthetic_refusals: list[str]  # the gate on the synthetic model (random labels)
    config_refusals: list[str]  # what the gate refuses whatever the data
    data_report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The closing line(s) of ``fedpriv run --dry-run``."""
        if self.config_refusals:
            return ("dry run: the gate would refuse every model of this configuration: "
                    + "; ".join(self.config_refusals))
        return (f"dry run: schema and config OK on {self.rows} synthetic rows "
                f"({self.patients} patients) at {len(self.sites)} "
                f"site{'' if len(self.sites) == 1 else 's'}; nothing was "
                f"charged, nothing registered")


def synthetic_patients(cfg: PipelineConfig, asked: int) -> int:
    """Synthetic patients per site: ``asked``, or under ``data.partition=by_patient`` enough
    for its ``data.num_clients`` clients (the audit's population, test patients and those
    dropped as incomplete, needs 5 per client): a refusal for too few patients would be the
    dry run's, not the configuration's."""
    if cfg.data.partition != "by_patient":
        return asked
    return max(asked, math.ceil(BY_PATIENT_SHARE * cfg.data.num_clients
                                / len(cfg.data.spec.sites)))


def dry_config(cfg: PipelineConfig, folder: Path, data_files: Mapping[str | None, Path],
               rounds: int) -> PipelineConfig:
    """``cfg`` pointed at the synthetic file(s) and at ``folder`` for every state and
    report (ledger included), in simulation, with ``rounds`` rounds and a small audit."""
    if None in data_files:
        data = cfg.data.model_copy(update={"path": str(data_files[None]), "site_files": None})
    else:
        data = cfg.data.model_copy(update={"site_files": {str(s): str(p) for s, p in
                                                          data_files.items()}})
    return cfg.model_copy(update={
        "data": data, "rounds": min(cfg.rounds, rounds),
        "state_dir": str(folder / "state"), "reports_dir": str(folder / "reports"),
        "privacy": cfg.privacy.model_copy(update={"ledger": str(folder / "no-ledger.sqlite")}),
        "federation": cfg.federation.model_copy(update={"mode": "simulation"}),
        "audit": cfg.audit.model_copy(update={
            "shadow_models": min(cfg.audit.shadow_models, DRY_RUN_SHADOWS)}),
    })


def write_synthetic(cfg: PipelineConfig, folder: Path,
                    plan: SyntheticPlan) -> tuple[dict[str | None, Path], int, int]:
    """The synthetic table as CSV in ``folder``: one file, or one per site under
    ``site_source: file``. Returns the files (site → file; None: one file), rows, patients."""
    spec = cfg.data.spec
    frame = synthetic_rows(spec, plan)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str | None, Path] = {}
    if spec.site_source == "file":
        for site, part in split_by_site(spec, frame).items():
            files[site] = folder / f"synthetic-{site_slug(site) or 'site'}.csv"
            part.to_csv(files[site], index=False)
    else:
        files[None] = folder / "synthetic.csv"
        frame.to_csv(files[None], index=False)
    return files, len(frame), int(frame[spec.patient_id].nunique())


def train_uncharged(cfg: PipelineConfig, calibration: PipelineConfig,
                    paths: Paths) -> TrainingSummary:
    """The train stage without the ledger: σ calibrated for ``calibration``'s rounds (the
    configured run), ``cfg.rounds`` trained, the accounting computed and printed, nothing
    charged; writes the model and train.json into ``paths`` (the dry run's folder)."""
    started = time.perf_counter()
    data, transform, partition = load_client_data(cfg, paths)
    compression = describe_compression(
        cfg.compression, parameter_count(cfg, int(data[0].x_train.shape[1])))
    print(f"training {cfg.model} on {len(data)} clients, {cfg.rounds} rounds (dry run; "
          f"configured: {calibration.rounds}); {compression}; "
          f"aggregation {cfg.aggregation.method}")
    dp = make_dpsgd(cfg=calibration, data=data)  # the configured run's σ (and its errors)
    run = federate(cfg, data, dp=dp, on_round=lambda rec: print_progress(rec, cfg.rounds))
    privacy = privacy_summary(cfg, None, run.spent, run.dp, run.model_fixes,
                              len(run.result.history))
    print(describe_privacy(privacy) + " (dry run: not charged)")
    summary = TrainingSummary.of_run(
        run.result, clients=len(data), partition=partition.scheme,
        compression=compression, aggregation=cfg.aggregation.method,
        malicious=sorted(run.attack.malicious) if run.attack else [], privacy=privacy,
        seconds=time.perf_counter() - started)
    write_training_outputs(cfg, paths, summary, run, int(data[0].x_train.shape[1]),
                           transform.columns())
    return summary


def ideal_metrics(metrics: Mapping[str, Any], audited: bool) -> dict[str, Any]:
    """``metrics`` with every figure that depends on the data made ideal: a perfectly
    separating model evaluated on :data:`IDEAL_TEST_PATIENTS` per class at every site that
    trained, and (if the audit ran) an audit that found nothing. What the configuration
    decides (ε, the noise's source, the audits' presence and DP audit verdicts) is kept."""
    histogram = metrics.get("evaluation_histogram") or [[0.0] * 10] * 2
    bins = max(len(histogram[0]), 2)
    negatives = [float(IDEAL_TEST_PATIENTS)] + [0.0] * (bins - 1)
    ideal = {**metrics, "evaluation_histogram": [negatives, negatives[::-1]],
             "accuracy": 1.0, "auc": 1.0, "balanced_accuracy": 1.0}
    trained = metrics.get("trained_sites")
    if isinstance(trained, list) and trained:
        ideal["evaluated_sites"] = list(trained)
    if audited:
        ideal.update(mia_auc=0.5, mia_tpr_at_0_1pct_fpr=0.0, empirical_epsilon_lower_bound=0.0)
    return ideal


def gate_verdicts(cfg: PipelineConfig, metrics: Mapping[str, Any]) -> tuple[list[str],
                                                                           list[str]]:
    """The gate's refusals of the synthetic model, and those it would make whatever the
    data (:func:`ideal_metrics`)."""
    thresholds = gate_thresholds(cfg)
    synthetic = evaluate_gate(metrics, thresholds)
    always = evaluate_gate(ideal_metrics(metrics, cfg.audit.enabled), thresholds)
    return list(synthetic.reasons), list(always.reasons)


def dry_run(cfg: PipelineConfig, root: str | Path = ".", *, patients_per_site: int = 100,
            rounds: int = DRY_RUN_ROUNDS, keep: Path | None = None) -> DryRunResult:
    """Validate, partition, train (uncharged), audit and gate ``cfg`` on synthetic rows.

    Everything is written under a temporary folder (``keep``: that folder instead, kept
    for a look). Raises what the real run would raise for the same mistake (the exit codes
    of docs/errors.md), and :class:`ConfigError` when the gate would refuse any model."""
    started = time.perf_counter()
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory(prefix="fedpriv-dry-run-") as scratch:
        folder = Path(keep).resolve() if keep is not None else Path(scratch)
        plan = SyntheticPlan(patients_per_site=synthetic_patients(cfg, patients_per_site),
                             seed=cfg.seed)
        files, rows, patients = write_synthetic(cfg, folder / "data", plan)
        dry = dry_config(cfg, folder, files, rounds)
        run_id = "dryrun" + uuid.uuid4().hex[:12]
        paths = Paths.of(dry, root, run_id)
        print(f"dry run on {rows} synthetic rows ({patients} patients) drawn from the schema "
              f"{cfg.data.schema_path}; no patient file is read, nothing is charged or "
              f"registered; files in {folder}"
              + (" (kept)" if keep is not None else " (removed at the end; --keep DIR keeps "
                 "them)"))
        validate_data(dry, root, run_id=run_id)
        partition_data(dry, root, run_id=run_id)
        trained = train_uncharged(dry, cfg.model_copy(update={"federation": dry.federation}),
                                  paths)
        audit_model(dry, root, run_id=run_id)
        metrics = collect_metrics(paths, read_training(paths), time.perf_counter() - started)
        metrics.update(dp_audit_metrics(cfg, root))  # a kept verdict for this DP recipe
        synthetic, always = gate_verdicts(cfg, metrics)
        report = _report(paths)
    result = DryRunResult(rows=rows, patients=patients,
                          sites=[s["site"] for s in report.get("sites", [])],
                          rounds=dry.rounds, epsilon=trained.privacy.epsilon,
                          synthetic_refusals=synthetic, config_refusals=always,
                          data_report=report, seconds=time.perf_counter() - started)
    _print_gate(result)
    if always:
        raise ConfigError(result.summary())
    return result


def _report(paths: Paths) -> dict[str, Any]:
    import json

    path = paths.reports / REPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def _print_gate(result: DryRunResult) -> None:
    expected = [r for r in result.synthetic_refusals if r not in result.config_refusals]
    if expected:
        print("gate on the synthetic model (random labels: refusals of its figures are "
              "expected, not a problem):\n  " + "\n  ".join(expected))
    if result.epsilon is not None and not math.isnan(result.epsilon):
        print(f"privacy: the {result.rounds} dry-run rounds would have spent ε = "
              f"{result.epsilon:.3g} per patient; not charged")
