"""``fedpriv audit-dp`` and the pipeline's DP-audit step: run the white-box canary audit
(:mod:`fl_core.audit.dp_audit`) on the configured recipe, write ``reports/audit_dp.json``, and
keep the verdict per DP mechanism (``<state_dir>/audit_dp/<fingerprint>.json``) so that the
gate refuses to promote any model trained with a configuration the audit found broken.

The audit runs train on the clients' patient *counts* only (their gradients are zeroed): no
patient's data reaches any update, so the audit charges no privacy budget.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters.artifacts import Paths, write_json_atomic
from adapters.tables import ClinicalTable
from fl_core.audit.dp_audit import DPAuditResult, audit_dp, check_auditable, dp_fingerprint
from fl_core.config.model import PipelineConfig

DP_AUDIT_METRICS = ("dp_audit_epsilon", "dp_audit_epsilon_lower_bound", "dp_audit_power",
                    "dp_audit_confidence")
"""What a run's ``metrics.json`` (and MLflow) carry from the audit of its configuration."""


def verdict_path(cfg: PipelineConfig, root: Path, level: str | None = None) -> Path:
    """Where the verdict for this configuration's DP mechanism at ``level`` (default:
    ``audit_dp.level``) is kept."""
    return (root / cfg.state_dir / "audit_dp"
            / f"{dp_fingerprint(cfg)}-{level or cfg.audit_dp.level}.json")


def run_dp_audit(cfg: PipelineConfig, root: str | Path = ".", run_id: str | None = None,
                 drill: str | None = None) -> DPAuditResult:
    """Audit the configured DP implementation; write the report; keep the verdict (not a
    drill's: a drill breaks the implementation on purpose)."""
    root = Path(root).resolve()
    check_auditable(cfg)
    a = cfg.audit_dp
    where = (f"{a.canaries_per_client} coordinate(s)" if a.canaries_per_client
             else "every coordinate")
    who = "canary clients" if a.level == "client" else "canary patients at every client"
    print(f"DP audit{' drill ' + drill if drill else ''} ({a.level} level): {a.runs} audit "
          f"runs of {a.rounds or cfg.rounds} rounds, {who} on {where}"
          + (", each run replayed from the seed" if a.regenerate else ""))
    data = ClinicalTable.get(cfg.data, root).partitioned(cfg.data, cfg.seed)[0]
    step = max(1, a.runs // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"  audit run {done}/{total}", flush=True)

    result = audit_dp(cfg, data, drill=drill, progress=progress)
    report = result.to_json()
    write_json_atomic(Paths.of(cfg, root, run_id).audit_dp, report)
    if drill is None:
        write_json_atomic(verdict_path(cfg, root), report)
    return result


def kept_verdicts(cfg: PipelineConfig, root: Path) -> list[DPAuditResult]:
    """The kept verdicts of this configuration's DP mechanism, one per audited level."""
    paths = [verdict_path(cfg, root, level) for level in ("patient", "client")]
    return [DPAuditResult.from_json(json.loads(p.read_text())) for p in paths if p.exists()]


def dp_audit_metrics(cfg: PipelineConfig, root: Path) -> dict[str, float | None]:
    """The kept verdict for this configuration's DP mechanism as run metrics: of the levels
    audited, the one that proved most of its claim (None when it was never audited)."""
    verdicts = kept_verdicts(cfg, root)
    if not verdicts:
        return dict.fromkeys(DP_AUDIT_METRICS)
    report = max(verdicts, key=lambda v: v.epsilon_lower_bound - v.epsilon)
    return {"dp_audit_epsilon": report.epsilon,
            "dp_audit_epsilon_lower_bound": report.epsilon_lower_bound,
            "dp_audit_power": report.power, "dp_audit_confidence": report.confidence}


def dp_audit_markdown(report: DPAuditResult) -> str:
    """The audit's table, for the terminal and the Prefect UI."""
    rows = "\n".join(
        f"| {b.scores} | {b.method} | "
        f"{'' if b.mu_hat is None else format(b.mu_hat, '.3f')} | "
        f"{'' if b.mu_lower is None else format(b.mu_lower, '.3f')} | "
        f"{b.epsilon_lower_bound:.3f} |" for b in report.bounds)
    verdict = ("**PRIVACY FAILURE: the implementation leaks more than its accountant's ε**"
               if report.privacy_failure else "consistent with the accountant")
    drill = f" (drill: {report.drill})" if report.drill else ""
    return (f"\n## DP implementation audit{drill}\n\nε {report.epsilon:.3f} (accountant, "
            f"δ={report.delta:g}) vs ε lower bound {report.epsilon_lower_bound:.3f} at "
            f"{report.confidence:.0%} confidence (power {report.power:.2f}); "
            f"{report.canaries} canaries ({report.canaries_included} included) in "
            f"{report.runs} audit runs, {report.training_runs} trainings, "
            f"{report.seconds:.1f} s; {verdict}.\n\n| scores | bound | μ̂ | μ lower | "
            f"ε lower bound |\n|---|---|---|---|---|\n{rows}\n")
