"""Typed stage results, and the one table of the figures a run reports.

Every stage returns one of these frozen dataclasses and every caller reads attributes;
where a stage writes a file (``reports/*.json``), its writer in ``adapters/`` converts the
result (``to_dict``) and a later stage reads it back typed (``from_dict``).

:class:`ValidationSummary` is what the validate stage found (``validation.json``;
:class:`SitesValidation` in sites mode); :class:`PartitionSummary` how the patients were
split; :class:`TrainingSummary` what a training run produced, with every round as a typed
:class:`~fl_core.federation.coordinator.RoundRecord` until a writer in ``adapters/``
flattens them (``rounds.csv``, the ``history`` of ``train.json``, the curves);
:class:`TrainingReport` is ``train.json`` read back by the later stages (its rounds as the
rows that writer flattened, which MLflow logs per step; ``rounds.csv`` stays a file for
people and DVC plots, never parsed back); :class:`PrivacyReport` what a training run spent
and the guarantee its model carries; :class:`AuditReport` what the membership audit found
(``audit.json``); :class:`Registration` and :class:`PublishOutcome` what the register /
publish stage did (``registration.json``, ``metrics.json``). The DP audit's typed result is
:class:`fl_core.audit.dp_audit.DPAuditResult`, beside the audit that computes it.
:data:`RUN_METRICS` lists every field of ``reports/metrics.json`` once, with the report it
comes from.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from types import SimpleNamespace
from typing import Any

from fl_core.federation.coordinator import RoundRecord, TrainingResult


def _require(name: str, required: list[str], raw: Mapping[str, Any], stage: str) -> None:
    """A report read back from JSON lacking a field (written by an older version) is an
    error that says which stage to re-run."""
    missing = sorted(set(required) - set(raw))
    if missing:
        raise ValueError(f"{name} lacks {', '.join(missing)}: re-run the '{stage}' stage")


def _from_dict(cls: type, raw: Mapping[str, Any], stage: str) -> Any:
    """``cls(**raw)`` for a report read back from JSON (keys it does not know are ignored)."""
    fields = dataclasses.fields(cls)
    _require(cls.__name__, [f.name for f in fields if f.default is dataclasses.MISSING
                            and f.default_factory is dataclasses.MISSING], raw, stage)
    return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


@dataclass(frozen=True)
class PrivacyReport:
    """A training run's privacy: what it spent and what its model's guarantee is.

    ``epsilon`` is None when the run had no patient-level DP-SGD (the model is not private
    per patient); ``client_level_epsilon`` is set with server-side DP-FedAvg. The guarantee:
    (``epsilon``, ``delta``)-DP per patient, add/remove one patient; ``epsilon_replace_one``
    at ``delta_replace_one`` under replace-one
    (:func:`fl_core.privacy.accountants.replace_one_epsilon`).
    """

    enabled: bool
    randomness: str
    epsilon: float | None = None
    delta: float | None = None
    client_level_epsilon: float | None = None
    client_rate: float | None = None
    server_noise_multiplier: float | None = None
    server_clip_norm: float | None = None
    epsilon_replace_one: float | None = None
    delta_replace_one: float | None = None
    # what the run's released statistics (evaluation; the audit in sites mode) cost each
    # site's test patients, at ``delta`` (fl_core.privacy.release.statistics_epsilon)
    statistics_epsilon: float | None = None
    target_epsilon: float | None = None
    lifetime_epsilon: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    max_grad_norm: float | None = None
    grad_sample_mode: str | None = None
    steps_planned: int | None = None
    client_steps: dict[str, int] = field(default_factory=dict)
    client_epsilon: dict[str, float] = field(default_factory=dict)
    site_epsilon: dict[str, float] = field(default_factory=dict)
    site_patients: dict[str, int] = field(default_factory=dict)
    ledger_run_id: str | None = None
    # federation.mode=sites: each site charged its own ledger (site → its ledger run id)
    site_ledger_runs: dict[str, str] = field(default_factory=dict)
    # ... and the head of its hash-chained ledger it reported at the start (site → hash)
    site_ledger_heads: dict[str, str] = field(default_factory=dict)
    dataset: str | None = None
    model_fixes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PrivacyReport:
        return _from_dict(cls, raw, "train")


@dataclass(frozen=True)
class AuditReport:
    """The membership-inference audit of one model (``audit.json``); the ``mia_*`` figures
    and the ε lower bound are the worst case over the attacks in ``attacks``."""

    enabled: bool
    seconds: float
    mia_auc: float | None = None
    mia_attack_accuracy: float | None = None
    mia_tpr_at_1pct_fpr: float | None = None
    mia_tpr_at_0_1pct_fpr: float | None = None
    mia_advantage: float | None = None
    empirical_epsilon_lower_bound: float | None = None
    mia_strongest_attack: str | None = None
    attacks: list[dict[str, Any]] = field(default_factory=list)
    members: int = 0
    non_members: int = 0
    population: int = 0
    shadow_models: int = 0
    online: bool = False
    delta: float | None = None
    confidence: float | None = None
    accountant_epsilon: float | None = None
    privacy_consistent: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AuditReport:
        return _from_dict(cls, raw, "audit")


@dataclass(frozen=True)
class TrainingFigures:
    """What a federated training run produced, as every later stage reads it: the last
    round's figures, the run's totals and its privacy (the fields of ``train.json`` but its
    ``history``)."""

    accuracy: float
    auc: float
    balanced_accuracy: float  # at probability 0.5, like accuracy
    test_loss: float
    rounds: int
    clients: int
    partition: str
    bytes_uploaded: int
    bytes_downloaded: int
    bytes_uploaded_uncompressed: int
    bytes_downloaded_uncompressed: int
    compression_ratio: float
    downlink_compression_ratio: float
    compression: str
    aggregation: str
    client_accuracy: dict[str, float]
    # the last round's merged (noisy) evaluation histogram [2, bins] and the sites it holds;
    # every site whose update went into an aggregate (the gate checks each one evaluated)
    evaluation_histogram: list[list[float]]
    evaluated_sites: list[str]
    trained_sites: list[str]
    client_failures: list[str]
    flagged_clients: list[str]
    flagged_client_rounds: int
    rejected_client_rounds: int
    excluded_clients: list[str]
    malicious_clients: list[str]
    privacy: PrivacyReport
    epsilon: float | None
    delta: float | None
    seconds: float

    def figures(self) -> dict[str, Any]:
        """The figures as JSON-able data: ``train.json`` but its ``history``."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingFigures)}
        return {**raw, "privacy": self.privacy.to_dict()}


@dataclass(frozen=True)
class TrainingSummary(TrainingFigures):
    """The train stage's result: its figures and every round, typed (flattened only by the
    writers in ``adapters/``)."""

    history: tuple[RoundRecord, ...]

    @classmethod
    def of_run(cls, result: TrainingResult, *, clients: int, partition: str, compression: str,
               aggregation: str, malicious: list[str], privacy: PrivacyReport,
               seconds: float) -> TrainingSummary:
        h, last = result.history, result.history[-1]
        up = sum(r.bytes_uploaded for r in h)
        up_raw = sum(r.bytes_uploaded_uncompressed for r in h)
        down = sum(r.bytes_downloaded for r in h)
        down_raw = sum(r.bytes_downloaded_uncompressed for r in h)
        return cls(
            accuracy=last.accuracy, auc=last.auc, balanced_accuracy=last.balanced_accuracy,
            test_loss=last.test_loss, rounds=len(h),
            clients=clients, partition=partition, bytes_uploaded=up, bytes_downloaded=down,
            bytes_uploaded_uncompressed=up_raw, bytes_downloaded_uncompressed=down_raw,
            compression_ratio=up_raw / max(up, 1), downlink_compression_ratio=down_raw / max(
                down, 1),
            compression=compression, aggregation=aggregation,
            client_accuracy=dict(last.client_accuracy),
            evaluation_histogram=[list(row) for row in last.evaluation_histogram],
            evaluated_sites=list(last.evaluated_clients),
            trained_sites=sorted({c for r in h for c in r.aggregated_clients}),
            client_failures=[str(f) for f in result.failures],
            flagged_clients=sorted({c for r in h for c in r.flagged_clients}),
            flagged_client_rounds=sum(len(r.flagged_clients) for r in h),
            rejected_client_rounds=sum(len(r.rejected_clients) for r in h),
            excluded_clients=sorted({c for r in h for c in r.excluded_clients}),
            malicious_clients=sorted(malicious), privacy=privacy,
            epsilon=privacy.epsilon, delta=privacy.delta,
            seconds=round(seconds, 3), history=tuple(h))

    def failed_rounds(self) -> dict[str, list[int]]:
        """Each site that failed a round → the rounds it failed, in order of first failure."""
        failed: dict[str, list[int]] = {}
        for record in self.history:
            for site in record.failed_clients:
                failed.setdefault(site, []).append(record.round)
        return failed


@dataclass(frozen=True)
class TrainingReport(TrainingFigures):
    """``train.json`` read back by the later stages: the figures, and the rounds as the rows
    the train stage's writer flattened them to (``adapters.train.round_row``), which the
    registration logs as MLflow step metrics."""

    round_rows: tuple[dict[str, Any], ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainingReport:
        """Read back ``train.json`` (an older file is an error saying to re-run the stage)."""
        names = [f.name for f in dataclasses.fields(TrainingFigures)]
        _require(cls.__name__, [*names, "history"], raw, "train")
        return cls(**{n: raw[n] for n in names if n != "privacy"},
                   privacy=PrivacyReport.from_dict(raw["privacy"]),
                   round_rows=tuple(raw["history"]))


@dataclass(frozen=True)
class ValidationSummary:
    """What the validate stage found (``validation.json`` in simulation): the file (or each
    site's file, ``data.site_files``) and its digest, rows validated per site, the failed
    checks (a row each, cell values included: this file stays with the data) and GX's own
    results."""

    file: str | dict[str, str]
    sha256: str | None | dict[str, str | None]
    success: bool
    sites: dict[str, int]
    failures: list[dict[str, Any]]
    seconds: float
    results: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SitesValidation:
    """``validation.json`` in sites mode: each ready site's own summary (counts and checks,
    no cell value) and why each other site is not in the run."""

    success: bool
    seconds: float
    sites: dict[str, dict[str, Any]]
    unavailable: dict[str, str]
    mode: str = "sites"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validation_from_dict(raw: Mapping[str, Any]) -> ValidationSummary | SitesValidation:
    """``validation.json`` read back, in either mode's form."""
    cls = SitesValidation if raw.get("mode") == "sites" else ValidationSummary
    return _from_dict(cls, raw, "validate")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ClientCounts:
    """One client's patients in the 80/20 split."""

    train: int
    test: int


@dataclass(frozen=True)
class PartitionSummary:
    """How the partition stage split the patients (``partition.json`` holds the split)."""

    scheme: str
    clients: dict[str, ClientCounts]
    dropped_rows: dict[str, int]  # rows of the file left out, by the key that leaves them out
    seconds: float


@dataclass(frozen=True)
class Registration:
    """What the register / publish stage did with the trained model (``registration.json``).

    ``registered`` is False when the DVC pipeline publishes without registering
    (``mlflow.register_from_dvc``): the gate's verdict is still computed, and there is no
    MLflow run (``run_id`` None, left out of the file) nor model version.
    """

    registered: bool
    run_id: str | None
    model_name: str | None
    model_version: str | None
    aliases: list[str]
    gate_passed: bool
    gate_reasons: list[str]
    privacy: str
    budget_spent: dict[str, float]
    lifetime_epsilon: float
    charged_at_sites: list[str]

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if not self.registered:
            del raw["run_id"]
        return raw


@dataclass(frozen=True)
class PublishOutcome:
    """The register / publish stage's result: the run's flat metrics (``metrics.json``,
    :data:`RUN_METRICS` and the DP audit's figures) and its registration."""

    metrics: dict[str, Any]
    registration: Registration


# Every field of reports/metrics.json, once: name → (report, key in that report). Reports:
# "train" (TrainingFigures), "privacy" (its privacy block), "audit" (audit.json), "run".
RUN_METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("train", "accuracy"),
    "auc": ("train", "auc"),
    "balanced_accuracy": ("train", "balanced_accuracy"),
    "epsilon": ("train", "epsilon"),
    "delta": ("train", "delta"),
    "mia_auc": ("audit", "mia_auc"),
    "mia_attack_accuracy": ("audit", "mia_attack_accuracy"),
    "mia_tpr_at_1pct_fpr": ("audit", "mia_tpr_at_1pct_fpr"),
    "mia_tpr_at_0_1pct_fpr": ("audit", "mia_tpr_at_0_1pct_fpr"),
    "empirical_epsilon_lower_bound": ("audit", "empirical_epsilon_lower_bound"),
    "mia_advantage": ("audit", "mia_advantage"),
    "bytes_uploaded": ("train", "bytes_uploaded"),
    "bytes_uploaded_uncompressed": ("train", "bytes_uploaded_uncompressed"),
    "bytes_downloaded": ("train", "bytes_downloaded"),
    "bytes_downloaded_uncompressed": ("train", "bytes_downloaded_uncompressed"),
    "compression_ratio": ("train", "compression_ratio"),
    "downlink_compression_ratio": ("train", "downlink_compression_ratio"),
    "flagged_client_rounds": ("train", "flagged_client_rounds"),
    "rejected_client_rounds": ("train", "rejected_client_rounds"),
    "client_level_epsilon": ("privacy", "client_level_epsilon"),
    "rounds": ("train", "rounds"),
    "wall_seconds": ("run", "wall_seconds"),
    "audit_seconds": ("audit", "seconds"),
    "epsilon_replace_one": ("privacy", "epsilon_replace_one"),
    "statistics_epsilon": ("privacy", "statistics_epsilon"),
    "randomness": ("privacy", "randomness"),
    "evaluation_histogram": ("train", "evaluation_histogram"),
    "evaluated_sites": ("train", "evaluated_sites"),
    "trained_sites": ("train", "trained_sites"),
}


def format_metric(value: Any) -> str:
    """One ``metrics.json`` value as a summary prints it: small floats in scientific notation
    (δ = 1e-05, not 0.0000), a list of names joined, a histogram as its shape."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:,.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return f"{len(value)} × {len(value[0])} noisy counts (metrics.json)"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return "—" if value is None else str(value)


def format_bound(value: float | None, digits: int = 3, *, up: bool) -> str:
    """``value`` to ``digits`` significant figures rounded the way that keeps a statement true:
    ``up`` for a figure stated as at most (ε, δ: the guarantee may be no stronger than the
    accountant's), down for one stated as at least (a lower confidence bound); small and large
    magnitudes in scientific notation (δ = 1e-05, never 0.000). None reads "—"."""
    if value is None:
        return "—"
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    exact = Decimal(repr(float(value)))
    step = Decimal(1).scaleb(exact.adjusted() - digits + 1)
    rounded = exact.quantize(step, rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return f"{float(rounded):.{digits}g}"


def run_metrics(train: TrainingFigures, audit: AuditReport,
                wall_seconds: float) -> dict[str, Any]:
    """The flat ``metrics.json`` of a run; a stage that did not run leaves its fields None."""
    sources: dict[str, Any] = {"train": train, "privacy": train.privacy, "audit": audit,
                               "run": SimpleNamespace(wall_seconds=round(wall_seconds, 3))}
    return {name: getattr(sources[report], key) for name, (report, key) in RUN_METRICS.items()}
