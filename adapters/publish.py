"""Stage 5: assemble the run's metrics, register the model in MLflow, apply the promotion gate.

``reports/metrics.json`` (the DVC metrics file) and ``reports/registration.json`` are written
only after the registration has succeeded, so a failed run never leaves them half-updated.
A sites-mode run's round log gets the promotion decision (:mod:`adapters.round_log`); every
registered version gets its model card (:mod:`adapters.model_card`), stored with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adapters.accounting import open_ledger
from adapters.artifacts import Paths, read_json, read_training, read_validation, write_json_atomic
from adapters.data_report import report_paths
from adapters.dp_audit import dp_audit_metrics, verdict_path
from adapters.metrics import record_publication
from adapters.mlflow_registration import RegistrationResult, register_model
from adapters.model_card import UNIT, ModelCard
from adapters.pki import endpoint_files
from adapters.round_log import RunLog
from adapters.train import load_model
from fl_core.audit.gate import evaluate_gate, gate_thresholds
from fl_core.config.model import PipelineConfig
from fl_core.data.transform import TabularTransform
from fl_core.privacy.ledger import MissingChargeError
from fl_core.results import (
    AuditReport,
    PrivacyReport,
    PublishOutcome,
    Registration,
    TrainingReport,
    format_bound,
    run_metrics,
)


def collect_metrics(paths: Paths, trained: TrainingReport,
                    wall_seconds: float | None = None) -> dict[str, Any]:
    """The flat ``reports/metrics.json`` of the run (:data:`fl_core.results.RUN_METRICS`)."""
    validated = read_validation(paths)  # validation must have run, in either mode
    audited = AuditReport.from_dict(read_json(paths.audit, "audit"))
    if wall_seconds is None:  # stage by stage (dvc repro): the stages' own times
        wall_seconds = validated.seconds + trained.seconds + audited.seconds
    return run_metrics(trained, audited, wall_seconds)


def publish_results(
    cfg: PipelineConfig, root: str | Path = ".", wall_seconds: float | None = None,
    register: bool = True, run_id: str | None = None,
) -> PublishOutcome:
    """Write metrics.json and, with ``register``, register the trained model with its metrics
    and reports in MLflow (challenger; champion if the gate passes). Without ``register``
    (the DVC pipeline unless ``mlflow.register_from_dvc``) the gate's verdict is still
    computed and reported, and nothing is registered."""
    paths = Paths.of(cfg, root, run_id)
    # A derived configuration, the same settings located: state_dir at the project root,
    # wherever the process was started. The MLflow store and its artifact root resolve from
    # it (cfg.mlflow_tracking_uri), and the registration logs it as the run's parameters;
    # adapters.preflight checks the store located the same way.
    cfg = cfg.model_copy(update={"state_dir": str(paths.state)})
    trained = read_training(paths)
    privacy = trained.privacy
    if register:
        require_ledger_charge(cfg, paths.root, privacy)  # never register an unaccounted model
    metrics = collect_metrics(paths, trained, wall_seconds)
    metrics.update(dp_audit_metrics(cfg, paths.root))  # the DP audit of this configuration
    budget_spent = _budget_spent(cfg, paths.root, privacy)
    if register:
        card = ModelCard(cfg, paths, trained, metrics)  # written and stored with the version
        try:
            result = _register(cfg, paths, trained, metrics, card, _run_log(cfg, paths, run_id))
            card.publish(paths.reports)  # the run's copy, once the version is final
        finally:
            card.discard()
        run, version, aliases, gate = (result.run_id, result.model_version,
                                       list(result.aliases), result.gate)
    else:
        run, version, aliases = None, None, []
        gate = evaluate_gate(metrics, gate_thresholds(cfg))
    registration = Registration(
        registered=register, run_id=run, model_name=cfg.mlflow.model_name,
        model_version=version, aliases=aliases, gate_passed=gate.passed,
        gate_reasons=list(gate.reasons), privacy=privacy_tags(privacy)["privacy"],
        budget_spent=budget_spent, lifetime_epsilon=cfg.privacy.lifetime_epsilon,
        charged_at_sites=sorted(privacy.site_ledger_runs))
    write_json_atomic(paths.metrics, metrics)
    write_json_atomic(paths.registration, registration.to_dict())
    record_publication(cfg, paths.root, run_id, privacy, registration)  # monitoring on only
    return PublishOutcome(metrics=metrics, registration=registration)


def publish_for_dvc(cfg: PipelineConfig, root: str | Path = ".") -> PublishOutcome:
    """The DVC pipeline's last stage (``fedpriv stage publish``): ``metrics.json`` and the
    gate's verdict; the model is registered only with ``mlflow.register_from_dvc``."""
    return publish_results(cfg, root, register=cfg.mlflow.register_from_dvc)


def describe_budget(registration: Registration) -> str:
    """What the run cost against the lifetime cap: the coordinator's ledger, or (sites mode)
    each site's own ledger, which only the site reads."""
    cap = registration.lifetime_epsilon
    at_sites = registration.charged_at_sites
    if at_sites:
        return (f"charged to each site's own ledger ({', '.join(at_sites)}; `fedpriv budget` "
                f"at the site), lifetime cap ε={cap:g}")
    return (f"lifetime budget spent of ε={cap:g} (composed, most-exposed patient): "
            + ", ".join(f"{site} {eps:.2f}" for site, eps in registration.budget_spent.items()))


GUARANTEE = ("(ε, δ)-DP per patient, add/remove one patient's records at one site; covers every "
             "model update and the released model (ε: training patients) and the released "
             "evaluation and sites-mode audit histograms (loss-threshold attack only; "
             "Gaussian mechanism; privacy.statistics_epsilon: test patients); site sizes "
             "public by declaration; not covered: the validation summary, budget_left, the "
             "simulation's pooled audit figures (docs/privacy.md)")


def _run_log(cfg: PipelineConfig, paths: Paths, run_id: str | None) -> RunLog | None:
    """A sites-mode flow run's round log, which gets the decision; None for a simulation (its
    replies are signed by nobody: no log) or a stage run (``reports/`` may hold an earlier
    run's published log, which is closed)."""
    if run_id is None or cfg.federation.mode != "sites" or not paths.round_log.exists():
        return None
    return RunLog.of_run(paths.round_log, run_id, endpoint_files(cfg, paths.root).server_key)


def _register(cfg: PipelineConfig, paths: Paths, trained: TrainingReport,
              metrics: dict[str, Any], card: ModelCard,
              round_log: RunLog | None = None) -> RegistrationResult:
    """The MLflow registration of the trained model (its ledger charge already checked)."""
    from adapters.serving import ServedModel

    privacy = trained.privacy
    _, saved = load_model(paths.model)
    served = ServedModel(saved, TabularTransform.from_config(cfg.data))
    kept = [verdict_path(cfg, paths.root, level) for level in ("patient", "client")]
    artifacts = [p for p in (paths.validation, *report_paths(paths), paths.train_summary,
                             paths.rounds_csv, paths.audit, paths.roc_plot, paths.training_plot,
                             paths.audit_dp, *kept)
                 if p.exists()]  # with the DP audits the gate read and the data report
    heads = ledger_head_tags(cfg, paths.root, privacy)
    tags = {**privacy_tags(privacy), **heads}
    return register_model(cfg, served, metrics, trained.round_rows, artifacts,
                          tags=tags, round_log=round_log, card=card.writer(heads))


def ledger_head_tags(cfg: PipelineConfig, root: Path, privacy: PrivacyReport) -> dict[str, str]:
    """The ledger heads the run and its version record (:mod:`adapters.ledger_anchor`): the
    coordinator's ledger after this run's charge, or (sites mode) the head each site
    reported of its own; what the next run's start compares its ledger with."""
    from adapters.ledger_anchor import head_tags, site_head_tag

    if privacy.site_ledger_heads:
        return {site_head_tag(site): head for site, head in privacy.site_ledger_heads.items()
                if re.fullmatch("[0-9a-f]{64}", head)}  # a site's text: recorded if a hash
    if privacy.ledger_run_id:  # charged here: require_ledger_charge found it in the ledger
        return head_tags(open_ledger(cfg, root))
    return {}


def privacy_tags(privacy: PrivacyReport) -> dict[str, str]:
    """MLflow run and version tags stating the model's guarantee (or its absence)."""
    noise = {"privacy.randomness": privacy.randomness}
    if privacy.epsilon is None:
        return {"privacy": "none" if privacy.client_level_epsilon is None
                else "client-level DP-FedAvg only", **noise}
    return {
        "privacy": "patient-level DP-SGD",
        "privacy.guarantee": GUARANTEE,
        **noise,
        # ε and δ rounded up (never a stronger guarantee than the accountant's), δ as 1e-05
        "privacy.epsilon_replace_one": format_bound(privacy.epsilon_replace_one, 6, up=True),
        "privacy.epsilon": format_bound(privacy.epsilon, 6, up=True),
        **({} if privacy.statistics_epsilon is None else
           {"privacy.statistics_epsilon": format_bound(privacy.statistics_epsilon, 6, up=True)}),
        "privacy.delta": format_bound(privacy.delta, 6, up=True),
        "privacy.unit": UNIT,
        "privacy.accountant": str(privacy.accountant),
        "privacy.noise_multiplier": f"{privacy.noise_multiplier:.6g}",
        "privacy.sample_rate": f"{privacy.sample_rate:g}",
        "privacy.max_grad_norm": f"{privacy.max_grad_norm:g}",
        "privacy.dataset": str(privacy.dataset),
        "privacy.ledger_run": str(privacy.ledger_run_id or ",".join(
            f"{site}:{run}" for site, run in privacy.site_ledger_runs.items())),
    }


def require_ledger_charge(cfg: PipelineConfig, root: Path, privacy: PrivacyReport) -> None:
    """Refuse to register a DP-SGD model whose training charge is not in the ledger.

    The train stage charges the ledger before it writes the model; a model without that
    charge (trained by an older version, or its ledger moved or deleted) is unaccounted.
    """
    if privacy.epsilon is None:
        return
    if privacy.site_ledger_runs:  # sites mode: each site charged its own ledger, at the site
        uncharged = sorted(s for s, steps in privacy.client_steps.items()
                           if steps > 0 and not privacy.site_ledger_runs.get(s))
        if uncharged:
            raise MissingChargeError(
                f"site(s) {', '.join(uncharged)} trained without reporting a charge of their "
                f"own privacy ledger: refusing to register")
        return
    run_id = privacy.ledger_run_id
    ledger = open_ledger(cfg, root)
    if not run_id or not ledger.has_run(run_id):
        raise MissingChargeError(
            f"the trained model's privacy charge (ledger run {run_id or 'none recorded'}) is "
            f"not in the ledger {ledger.path}: refusing to register a model whose use of "
            f"patients is unaccounted. Retrain with `fedpriv stage train` (it charges the "
            f"ledger), or point privacy.ledger at the ledger it was charged to")


def _budget_spent(cfg: PipelineConfig, root: Path, privacy: PrivacyReport) -> dict[str, float]:
    """Tight composed ε each of this run's sites has now spent (worst patient, all runs)."""
    if privacy.epsilon is None:
        return {}
    balances = open_ledger(cfg, root).balances(str(privacy.accountant))
    return {b.site: round(b.tight_epsilon, 6) for b in balances if b.site in privacy.site_epsilon}
