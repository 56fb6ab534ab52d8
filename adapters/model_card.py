"""A model card for every registered model version: what a reviewer needs on one page.

The card is written while the version is registered (:meth:`ModelCard.writer`, called by
:func:`adapters.mlflow_registration.register_model` before the version's final mark), so a
version without its card does not survive: a failure rolls the registration back. It holds
the model and its intended use; the data per site **as released** under the privacy rules
(docs/privacy.md: the declared training and test patients of each site, each site's noisy
accuracy and the merged noisy evaluation histogram; no exact per-site label count, which
sites mode never releases); the features and the dataset schema file itself; discrimination
with its one-sided lower confidence bounds (the gate's, :mod:`fl_core.audit.confidence`); a
reliability diagram from the released histogram; the privacy guarantee; both audits'
verdicts; the gate's decision and reasons; and the lineage (data hash, code version, MLflow
run, ledger heads).

Stored with the version: ``model_card/model_card.md`` (and ``.html``, ``calibration.png``)
and ``schema.yaml`` among the registering run's artifacts; the version's description is the
card's one-line summary and its ``privacy.*`` tags state ε, δ and the unit
(:func:`adapters.publish.privacy_tags`); once the registration is final a copy lands in the
run's reports (``reports/model_card.md``, ``calibration.png``, ``model_card.html``),
published with them.

Every figure is printed at a precision that keeps it true: ε and δ rounded up (the guarantee
is never stated stronger than the accountant's), lower bounds rounded down, δ in scientific
notation, noisy counts marked as such (:func:`fl_core.results.format_bound`).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.artifacts import Paths, atomic_path, read_json, write_text_atomic
from adapters.lineage import DATA_HASH_KEY
from adapters.schema_files import PACKAGE_ROOT, load_schema, resolve_schema_path
from fl_core import __version__
from fl_core.audit.confidence import EvaluationBounds, evaluation_bounds
from fl_core.audit.gate import GateDecision
from fl_core.config.model import PipelineConfig
from fl_core.data.schema import DatasetSchema, FeatureSpec, LabelRule
from fl_core.results import AuditReport, PrivacyReport, TrainingReport, format_bound

if TYPE_CHECKING:
    from mlflow import MlflowClient

CARD_FOLDER = "model_card"
"""The folder of the registering run's artifacts that holds the card."""
CARD_NAME, HTML_NAME, PLOT_NAME, SCHEMA_NAME = (
    "model_card.md", "model_card.html", "calibration.png", "schema.yaml")
DATA_REPORT_NAME = "data_report.md"
"""The per-site data report (:mod:`adapters.data_report`) in the run's reports: embedded in
the card in simulation only (the coordinator holds the table there; in sites mode each site
keeps its own report and nothing of it reaches the coordinator)."""
UNIT = "patient (add/remove one patient's records at one site)"
"""The privacy unit and neighbouring relation, as the ``privacy.unit`` tag states it."""

# a writer of the card once the version exists: (client, run id, version, decision, aliases)
CardWriter = Callable[["MlflowClient", str, str, GateDecision, Sequence[str]], None]


@dataclass(frozen=True)
class SiteFacts:
    """One site as released: declared sizes (public by declaration) and its noisy accuracy
    at the final evaluation (None: it did not answer it)."""

    site: str
    train_patients: int | None
    test_patients: int | None
    accuracy: float | None


@dataclass(frozen=True)
class CalibrationBin:
    """One score bin of the released evaluation histogram: its range, the noisy number of
    test patients in it and of them positive (clamped at 0), and whether the DP noise
    dominates it (total below three standard deviations of its noise)."""

    low: float
    high: float
    patients: float
    positives: float
    noisy: bool

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2

    @property
    def observed(self) -> float | None:
        """Share of positives in the bin (None: nobody in it after noise)."""
        return min(self.positives / self.patients, 1.0) if self.patients > 0 else None


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states, gathered from the run's reports (:func:`gather_facts`); the
    renderer (:func:`render_markdown`) is pure."""

    model_name: str
    version: str
    run_id: str
    registered_at: str
    model: str
    mode: str
    rounds: int
    aggregation: str
    compression: str
    dataset_id: str
    dataset_description: str | None
    label: LabelRule
    features: Mapping[str, FeatureSpec]
    schema_path: str
    schema_text: str
    schema_note: str | None
    sites: tuple[SiteFacts, ...]
    histogram: list[list[float]]
    cell_noise: float
    evaluation: EvaluationBounds | None
    accuracy: float
    privacy: PrivacyReport
    guarantee: str
    audit: AuditReport | None
    audit_limits: Mapping[str, float]
    dp_audit: Mapping[str, float | None]
    gate_passed: bool
    gate_reasons: tuple[str, ...]
    aliases: tuple[str, ...]
    data_sha256: str | None
    code_version: str
    ledger_heads: Mapping[str, str] = field(default_factory=dict)
    data_report: str | None = None


# --- pure: figures to text -----------------------------------------------------------------


def calibration_bins(histogram: Sequence[Sequence[float]], cell_noise: float
                     ) -> list[CalibrationBin]:
    """The reliability diagram's bins from a released ``[2, bins]`` histogram (row 0: label 0,
    row 1: label 1; equal bins of predicted probability, :func:`fl_core.privacy.release.
    unit_bins`)."""
    if len(histogram) != 2 or len(histogram[0]) != len(histogram[1]) or not histogram[0]:
        return []
    bins = len(histogram[0])
    spread = 3 * cell_noise * math.sqrt(2)  # the noise of a bin's total: two cells
    out = []
    for i, (neg, pos) in enumerate(zip(histogram[0], histogram[1], strict=True)):
        positives, patients = max(float(pos), 0.0), max(float(neg), 0.0) + max(float(pos), 0.0)
        out.append(CalibrationBin(i / bins, (i + 1) / bins, patients, positives,
                                  noisy=patients < spread))
    return out


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _figure(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def positive_rule(label: LabelRule) -> str:
    """What makes a row positive, in words."""
    if label.positive_if is not None:
        return f"`{label.column}` {label.positive_if}"
    return f"`{label.column}` in {', '.join(label.positive_values or [])}"


def discrimination_text(facts: CardFacts) -> str:
    """AUC with its one-sided lower bound (rounded down) and the confidence, for a summary."""
    b = facts.evaluation
    if b is None or not math.isfinite(b.auc):
        return "AUC undefined (the evaluation has an empty class)"
    level = f"{b.confidence * 100:g} %"
    return (f"AUC {b.auc:.3f} (one-sided {level} lower bound "
            f"{format_bound(b.auc_lower, up=False)})")


def privacy_text(privacy: PrivacyReport) -> str:
    """(ε, δ) and the unit, rounded up: what the tags and the summary state."""
    if privacy.epsilon is None:
        return ("not differentially private per patient"
                + ("" if privacy.client_level_epsilon is None else
                   f" (client-level DP-FedAvg ε ≤ "
                   f"{format_bound(privacy.client_level_epsilon, up=True)})"))
    return (f"(ε ≤ {format_bound(privacy.epsilon, up=True)}, δ = "
            f"{format_bound(privacy.delta, up=True)})-DP per {UNIT}")


def summary(facts: CardFacts) -> str:
    """The version's description: model, discrimination with CI, ε/δ/unit, the gate."""
    gate = ("passed: champion" if facts.gate_passed
            else f"refused champion ({len(facts.gate_reasons)} reason(s), see the model card)")
    return (f"{facts.model_name} v{facts.version}: {facts.model} on `{facts.dataset_id}`, "
            f"{len(facts.sites)} sites; {discrimination_text(facts)}; "
            f"{privacy_text(facts.privacy)}; gate {gate}. Model card: artifacts "
            f"{CARD_FOLDER}/{CARD_NAME} of run {facts.run_id}.")


def _feature_row(name: str, spec: FeatureSpec) -> str:
    if spec.type in ("numeric", "integer"):
        values = f"{spec.low:g} to {spec.high:g}" if spec.low is not None and \
            spec.high is not None else "—"
    elif spec.type == "categorical":
        values = ", ".join(spec.categories or [])
    else:
        values = f"{spec.true_value} / {spec.false_value}"
    missing = ", ".join(str(v) for v in spec.missing_values) or "—"
    return (f"| `{name}` | {spec.type} | {spec.unit or '—'} | {values} | {missing} | "
            f"{spec.description or ''} |")


def _model_section(f: CardFacts) -> str:
    aliases = ", ".join(f"`{a}`" for a in f.aliases) or "none"
    return (
        f"## Model\n\n| | |\n|---|---|\n| registered model | `{f.model_name}` |\n"
        f"| version | {f.version} (aliases: {aliases}) |\n| registered | {f.registered_at} |\n"
        f"| network | {f.model} |\n| training | federated, {f.rounds} rounds, {f.mode} "
        f"mode; aggregation {f.aggregation}; {f.compression} |\n| MLflow run | `{f.run_id}` |\n"
        f"\n## Intended use\n\nEstimates the probability that a patient is positive "
        f"({positive_rule(f.label)}) from one row of the `{f.dataset_id}` table"
        f"{f' ({f.dataset_description})' if f.dataset_description else ''}, with the "
        f"features below, at hospitals like those below. For research and decision "
        f"support reviewed by a clinician; not a diagnosis on its own, and not validated "
        f"outside these sites or for other populations.\n")


def _data_section(f: CardFacts) -> str:
    rows = "\n".join(
        f"| {s.site} | {_count(s.train_patients)} | {_count(s.test_patients)} | "
        f"{_figure(s.accuracy)} |" for s in f.sites)
    b = f.evaluation
    prevalence = "—"
    if b is not None and b.patients > 0:
        prevalence = (f"{b.positives:,.0f} positive of {b.patients:,.0f} test patients "
                      f"(≈ {b.positives / b.patients:.0%}, noisy counts)")
    out = (
        f"## Data per site (as released)\n\nThe coordinator sees each site's declared "
        f"patient counts (public by declaration) and its DP-noised evaluation; it never sees "
        f"a site's exact labels, so no per-site prevalence is released (docs/privacy.md).\n\n"
        f"| site | training patients | test patients | test accuracy (noisy) |\n"
        f"|---|---|---|---|\n{rows}\n\nTest prevalence, all evaluated sites together: "
        f"{prevalence}.\n")
    if f.data_report:
        out += (f"\n### Before training\n\nSimulation: exact counts of the table the "
                f"coordinator process holds, not covered by the DP guarantee.\n\n"
                f"{demote_headings(f.data_report, 4).strip()}\n")
    return out


def demote_headings(text: str, level: int) -> str:
    """``text`` with its top-level markdown heading at ``level`` (``#`` → ``###`` for 3), the
    others below it, so an embedded document stays inside the section that holds it."""
    def demote(line: str) -> str:
        return "#" * (level - 1) + line if line.startswith("#") else line

    fence = False
    out = []
    for line in text.splitlines():
        fence ^= line.lstrip().startswith("```")
        out.append(line if fence else demote(line))
    return "\n".join(out)


def _features_section(f: CardFacts) -> str:
    rows = "\n".join(_feature_row(name, spec) for name, spec in f.features.items())
    note = f"\n{f.schema_note}\n" if f.schema_note else ""
    return (
        f"## Features\n\n| feature | type | unit | values | read as missing | description |\n"
        f"|---|---|---|---|---|---|\n{rows}\n\n### Dataset schema (`{f.schema_path}`)\n{note}"
        f"\n```yaml\n{f.schema_text.rstrip()}\n```\n")


def _discrimination_section(f: CardFacts) -> str:
    b = f.evaluation
    if b is None:
        return "## Discrimination\n\nNo final evaluation was released.\n"
    level = f"{b.confidence * 100:g} %"
    return (
        f"## Discrimination\n\nOn the final evaluation's released histogram "
        f"({b.patients:,.0f} test patients, {b.positives:,.0f} positive, "
        f"{b.negatives:,.0f} negative: noisy counts; each cell's noise σ = "
        f"{f.cell_noise:.3g}). Lower bounds are one-sided at {level}, sampling and DP noise "
        f"both counted, rounded down.\n\n| figure | value | lower bound |\n|---|---|---|\n"
        f"| AUC | {_figure(b.auc)} | {format_bound(b.auc_lower, up=False)} |\n"
        f"| balanced accuracy (P ≥ 0.5) | {_figure(b.balanced_accuracy)} | "
        f"{format_bound(b.balanced_accuracy_lower, up=False)} |\n"
        f"| accuracy (P ≥ 0.5) | {_figure(f.accuracy)} | — |\n")


def _calibration_section(f: CardFacts) -> str:
    bins = calibration_bins(f.histogram, f.cell_noise)
    if not bins:
        return "## Calibration\n\nNo final evaluation was released.\n"
    rows = "\n".join(
        f"| {b.low:.2f}–{b.high:.2f} | {b.mid:.3f} | {b.patients:,.0f} | "
        f"{_figure(b.observed)}{' (noise-dominated)' if b.noisy else ''} |" for b in bins)
    return (
        f"## Calibration\n\n![reliability diagram]({PLOT_NAME})\n\nPredicted probability "
        f"per bin (its middle) against the share of positives among the bin's test "
        f"patients, from the released histogram (noisy counts, clamped at 0).\n\n"
        f"| predicted | bin middle | test patients (noisy) | positive share (noisy) |\n"
        f"|---|---|---|---|\n{rows}\n")


def _privacy_section(f: CardFacts) -> str:
    p = f.privacy
    if p.epsilon is None:
        return f"## Privacy\n\n**{privacy_text(p)}.**\n"
    statistics = ("" if p.statistics_epsilon is None else
                  f"| released statistics (evaluation, sites-mode audit) | ε ≤ "
                  f"{format_bound(p.statistics_epsilon, up=True)} per test patient at the "
                  f"same δ |\n")
    return (
        f"## Privacy\n\n**{privacy_text(p)}**; ε and δ rounded up.\n\n| | |\n|---|---|\n"
        f"| mechanism | patient-level DP-SGD ({p.accountant} accountant, noise multiplier "
        f"{p.noise_multiplier:.4g}, clip {p.max_grad_norm:g}, sample rate {p.sample_rate:g}) |\n"
        f"| unit | {UNIT} |\n| ε (training patients) | {format_bound(p.epsilon, up=True)} |\n"
        f"| δ | {format_bound(p.delta, up=True)} |\n"
        f"| replace-one | ε ≤ {format_bound(p.epsilon_replace_one, up=True)}, δ = "
        f"{format_bound(p.delta_replace_one, up=True)} |\n{statistics}"
        f"| noise | {p.randomness} |\n| lifetime cap per patient | ε "
        f"{format_bound(p.lifetime_epsilon, up=True)} |\n\nGuarantee: {f.guarantee}\n")


def _audit_section(f: CardFacts) -> str:
    a = f.audit
    if a is None or not a.enabled:
        membership = "Membership-inference audit: **not run** (the gate refuses promotion)."
    else:
        within = (a.mia_auc is not None and a.mia_auc <= f.audit_limits["audit.max_auc"]
                  and a.mia_tpr_at_0_1pct_fpr is not None
                  and a.mia_tpr_at_0_1pct_fpr <= f.audit_limits["audit.max_tpr_at_0_1pct_fpr"])
        verdict = ("**PRIVACY FAILURE**: its ε lower bound exceeds the accountant's ε"
                   if not a.privacy_consistent else
                   "within the gate's limits" if within else "**beyond the gate's limits**")
        membership = (
            f"Membership-inference audit ({a.members:,} members vs {a.non_members:,} "
            f"non-members; strongest attack {a.mia_strongest_attack}): AUC "
            f"{_figure(a.mia_auc)} (limit {f.audit_limits['audit.max_auc']:g}), TPR at "
            f"0.1 % FPR {_figure(a.mia_tpr_at_0_1pct_fpr)} (limit "
            f"{f.audit_limits['audit.max_tpr_at_0_1pct_fpr']:g}), empirical ε lower bound "
            f"{format_bound(a.empirical_epsilon_lower_bound, up=False)} vs accountant ε "
            f"{format_bound(a.accountant_epsilon, up=True)}: {verdict}.")
    d = f.dp_audit
    bound, eps = d.get("dp_audit_epsilon_lower_bound"), d.get("dp_audit_epsilon")
    if bound is None or eps is None:
        white_box = ("White-box DP implementation audit (`fedpriv audit-dp`): no verdict kept "
                     "for this configuration.")
    else:
        white_box = (
            f"White-box DP implementation audit (`fedpriv audit-dp`): ε lower bound "
            f"{format_bound(bound, up=False)} vs accountant ε {format_bound(eps, up=True)}: "
            + ("**PRIVACY FAILURE**." if bound > eps else "consistent with the accountant."))
    return f"## Audits\n\n- {membership}\n- {white_box}\n"


def _gate_section(f: CardFacts) -> str:
    if f.gate_passed:
        return "## Promotion gate\n\n**Passed**: this version is `champion`.\n"
    reasons = "\n".join(f"- {r}" for r in f.gate_reasons)
    return (f"## Promotion gate\n\n**Refused** champion (this version is `challenger` "
            f"only):\n\n{reasons}\n")


def _lineage_section(f: CardFacts) -> str:
    heads = "\n".join(f"| tag `{tag}` (ledger head) | `{value}` |"
                      for tag, value in sorted(f.ledger_heads.items()))
    data = (f"`{f.data_sha256}`" if f.data_sha256 else
            "held by each site (sites mode: the data never leave it)")
    return (
        f"## Lineage\n\n| | |\n|---|---|\n| data SHA-256 | {data} |\n"
        f"| code | {f.code_version} |\n| MLflow run | `{f.run_id}` |\n"
        f"| privacy ledger run | {f.privacy.ledger_run_id or ', '.join(f'{s}: {r}' for s, r in sorted(f.privacy.site_ledger_runs.items())) or '—'} |\n"  # noqa: E501
        f"{heads}\n")


def render_markdown(facts: CardFacts) -> str:
    """The card as markdown (pure)."""
    sections = (_model_section, _data_section, _features_section, _discrimination_section,
                _calibration_section, _privacy_section, _audit_section, _gate_section,
                _lineage_section)
    head = f"# Model card: {facts.model_name} version {facts.version}\n\n{summary(facts)}\n"
    return "\n".join([head, *(section(facts) for section in sections)])


def render_html(markdown_text: str, title: str) -> str | None:
    """The card as a standalone HTML page, if the ``markdown`` package is there (None if not)."""
    try:
        import markdown
    except ImportError:
        return None
    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}"
            f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}"
            f"</style></head><body>\n{body}\n</body></html>\n")


# --- the run's facts (files, git) ----------------------------------------------------------


def site_facts(paths: Paths, trained: TrainingReport) -> tuple[SiteFacts, ...]:
    """Each site of the run's partition with its declared sizes (``partition.json``: counts in
    sites mode, patient ids in simulation) and its noisy final accuracy."""
    raw = read_json(paths.partition, "partition")
    if "sites" in raw:  # sites mode: the counts the sites declared (adapters.site_reports)
        sizes = {s: (c.get("train"), c.get("test")) for s, c in raw["sites"].items()}
    else:
        sizes = {c["client_id"]: (len(c["train"]), len(c["test"])) for c in raw["clients"]}
    evaluated = set(trained.evaluated_sites)
    return tuple(SiteFacts(site, train, test, trained.client_accuracy.get(site)
                           if site in evaluated else None)
                 for site, (train, test) in sizes.items())


def schema_facts(cfg: PipelineConfig, root: Path) -> tuple[str, str | None]:
    """The dataset schema file as it is (verbatim), and a note when it no longer reads as the
    schema the run used (then the run's own, as YAML, stands in for it)."""
    import yaml

    path = resolve_schema_path(cfg.data.schema_path, root)
    try:
        text = path.read_text(encoding="utf-8")
        if load_schema(path) == cfg.data.spec:
            return text, None
        why = "it has changed since the run read it"
    except (OSError, ValueError) as exc:  # SchemaError is a ValueError
        why = f"it cannot be read ({exc})"
    dumped = yaml.safe_dump(cfg.data.spec.model_dump(exclude_none=True), sort_keys=False,
                            allow_unicode=True)
    return dumped, (f"The file {cfg.data.schema_path} is not shown: {why}. This is the schema "
                    f"the run used, as loaded.")


def code_version(root: Path = PACKAGE_ROOT) -> str:
    """fedpriv's version and the git commit of the code that ran (``+ uncommitted changes``
    when the checkout differs from it; "not a git checkout" for an installed package)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return f"fedpriv {__version__} (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"fedpriv {__version__}, git commit `{commit}`" + (
        " + uncommitted changes" if dirty else "")


def released_bounds(cfg: PipelineConfig, trained: TrainingReport
                    ) -> tuple[float, EvaluationBounds | None]:
    """Each merged cell's noise and the bounds of the released histogram, as the gate computes
    them (:func:`fl_core.audit.gate.evaluate_gate`: same inputs, same deterministic figures)."""
    noise = cfg.privacy.evaluation_noise * math.sqrt(max(len(trained.evaluated_sites), 1))
    if not trained.evaluation_histogram:
        return noise, None
    try:
        return noise, evaluation_bounds(trained.evaluation_histogram, noise, cfg.gate.confidence)
    except ValueError:
        return noise, None


def gather_facts(cfg: PipelineConfig, paths: Paths, trained: TrainingReport,
                 metrics: Mapping[str, Any], *, run_id: str, version: str,
                 decision: GateDecision, aliases: Sequence[str],
                 ledger_heads: Mapping[str, str] | None = None) -> CardFacts:
    """The card's facts from the run's reports (``train.json``, ``audit.json``,
    ``partition.json``), the metrics and the gate's decision the registration used."""
    from adapters.publish import GUARANTEE
    from fl_core.audit.gate import gate_thresholds

    audit = (AuditReport.from_dict(read_json(paths.audit, "audit"))
             if paths.audit.exists() else None)
    schema_text, schema_note = schema_facts(cfg, paths.root)
    noise, bounds = released_bounds(cfg, trained)
    report = paths.reports / DATA_REPORT_NAME
    partition = read_json(paths.partition, "partition")
    spec: DatasetSchema = cfg.data.spec
    return CardFacts(
        model_name=str(cfg.mlflow.model_name), version=version, run_id=run_id,
        registered_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        model=cfg.model, mode=cfg.federation.mode, rounds=trained.rounds,
        aggregation=trained.aggregation, compression=trained.compression,
        dataset_id=spec.id, dataset_description=spec.description, label=spec.label,
        features={name: spec.feature(name) for name in cfg.data.features},
        schema_path=cfg.data.schema_path, schema_text=schema_text, schema_note=schema_note,
        sites=site_facts(paths, trained), histogram=trained.evaluation_histogram,
        cell_noise=noise, evaluation=bounds, accuracy=trained.accuracy,
        privacy=trained.privacy, guarantee=GUARANTEE, audit=audit,
        audit_limits=gate_thresholds(cfg),
        dp_audit={k: v for k, v in metrics.items() if k.startswith("dp_audit_")},
        gate_passed=decision.passed, gate_reasons=tuple(decision.reasons),
        aliases=tuple(aliases), data_sha256=partition.get(DATA_HASH_KEY),
        code_version=code_version(), ledger_heads=dict(ledger_heads or {}),
        data_report=report.read_text(encoding="utf-8")
        if report.is_file() and cfg.federation.mode == "simulation" else None)


# --- files and the registry ----------------------------------------------------------------


def calibration_plot(bins: Sequence[CalibrationBin], target: Path) -> None:
    """The reliability diagram: each bin's positive share against its middle, the marker's
    area its (noisy) number of patients, hollow where the DP noise dominates the bin."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    largest = max((b.patients for b in bins), default=1.0) or 1.0
    for b in bins:
        if b.observed is None:
            continue
        ax.scatter([b.mid], [b.observed], s=30 + 400 * b.patients / largest,
                   facecolors="none" if b.noisy else "tab:blue", edgecolors="tab:blue")
        ax.annotate(f"{b.patients:,.0f}", (b.mid, b.observed), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    ax.scatter([], [], color="tab:blue", label="bin (area: its test patients)")
    ax.scatter([], [], facecolors="none", edgecolors="tab:blue", label="noise-dominated bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (bin middle)")
    ax.set_ylabel("share of positives in the bin (noisy)")
    ax.set_title("Reliability diagram (released evaluation)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class CardFiles:
    """The card's files in the run's reports."""

    markdown: Path
    plot: Path | None
    html: Path | None


def write_card(facts: CardFacts, reports: Path) -> CardFiles:
    """Write the card, its reliability diagram and (if cheap) its HTML page into ``reports``."""
    text = render_markdown(facts)
    bins = calibration_bins(facts.histogram, facts.cell_noise)
    plot = reports / PLOT_NAME if bins else None
    if plot is not None:
        calibration_plot(bins, plot)
    markdown_path = reports / CARD_NAME
    write_text_atomic(markdown_path, text)
    html = render_html(text, f"{facts.model_name} version {facts.version}")
    html_path = reports / HTML_NAME if html is not None else None
    if html_path is not None and html is not None:
        write_text_atomic(html_path, html)
    return CardFiles(markdown_path, plot, html_path)


def store_card(client: MlflowClient, facts: CardFacts, files: CardFiles) -> None:
    """Log the card with the version: its files under ``model_card/`` and the schema as
    ``schema.yaml`` among the run's artifacts, the summary as the version's description."""
    for path in (files.markdown, files.plot, files.html):
        if path is not None:
            client.log_artifact(facts.run_id, str(path), artifact_path=CARD_FOLDER)
    client.log_text(facts.run_id, facts.schema_text, SCHEMA_NAME)
    client.update_model_version(facts.model_name, facts.version, description=summary(facts))
    client.set_model_version_tag(facts.model_name, facts.version, "model_card",
                                 f"{CARD_FOLDER}/{CARD_NAME}")


class ModelCard:
    """A run's model card through its registration: :meth:`writer` is what
    :func:`adapters.mlflow_registration.register_model` calls once the version exists (its
    number is part of the card): it gathers the facts, writes the files into a staging folder
    and logs them with the version; a failure there fails the registration, which is rolled
    back. :meth:`publish` copies the card into the run's reports once the registration is
    final (a rolled-back version leaves no card there); :meth:`discard` removes the staging
    folder."""

    def __init__(self, cfg: PipelineConfig, paths: Paths, trained: TrainingReport,
                 metrics: Mapping[str, Any]) -> None:
        self.cfg, self.paths, self.trained, self.metrics = cfg, paths, trained, metrics
        self.staged: CardFiles | None = None
        self._folder: Path | None = None

    def writer(self, ledger_heads: Mapping[str, str] | None = None) -> CardWriter:
        """The registration's hook, with the ledger heads the version is tagged with."""

        def write(client: MlflowClient, run_id: str, version: str, decision: GateDecision,
                  aliases: Sequence[str]) -> None:
            facts = gather_facts(self.cfg, self.paths, self.trained, self.metrics,
                                 run_id=run_id, version=version, decision=decision,
                                 aliases=aliases, ledger_heads=ledger_heads)
            self.discard()
            self._folder = Path(tempfile.mkdtemp(prefix="fedpriv-model-card-"))
            files = write_card(facts, self._folder)
            store_card(client, facts, files)
            self.staged = files

        return write

    def publish(self, reports: Path) -> list[Path]:
        """Copy the stored card's files into ``reports`` (atomically, each); returns them."""
        if self.staged is None:
            return []
        copied = []
        for source in (self.staged.markdown, self.staged.plot, self.staged.html):
            if source is not None:
                with atomic_path(reports / source.name) as tmp:
                    shutil.copyfile(source, tmp)
                copied.append(reports / source.name)
        return copied

    def discard(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
