"""The typed configuration: ``params.yaml`` parsed and validated, with ``key=value`` overrides.

``params.yaml`` is the only configuration. :func:`load_config` reads it, applies overrides
given as dotted keys (``rounds=5``, ``data.partition=by_patient``) and validates the result
against :class:`PipelineConfig`. Every error is a :class:`ConfigError` whose message names the
key, what was given and what is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from fl_core.data.schema import (
    DEFAULT_SCHEMA,
    DatasetSchema,
    FeatureSpec,
    with_range_defaults,
)
from fl_core.model.networks import MODELS
from fl_core.privacy.accountants import ACCOUNTANTS
from fl_core.privacy.dpsgd import GRAD_SAMPLE_MODES
from fl_core.privacy.randomness import RANDOMNESS
from fl_core.registry import registered, unknown
from fl_core.robust.aggregators import AGGREGATORS, PRE_AGGREGATIONS, check_robustness
from fl_core.robust.attacks import ATTACKS


class ConfigError(ValueError):
    """A configuration key is unknown or its value is not accepted."""


MAX_SEED = 2**32 - 1
"""Largest ``seed``: numpy's legacy seeding (``RandomState``, and libraries that call it) takes
at most 2**32 − 1, ``torch.Generator().manual_seed`` at most 2**64 − 1 and
``numpy.random.default_rng`` any size; derived seeds (``seed + 1000 + shadow``,
``seed + client``) stay far below torch's limit."""
MAX_COUNT = 2**31 - 1  # a size or count torch and numpy index with int32 or int64 alike


# A pluggable part is named by a key of its registry: the registry is the one list of names.
ModelName = Annotated[str, AfterValidator(registered(MODELS))]
AggregatorName = Annotated[str, AfterValidator(registered(AGGREGATORS))]
PreAggregationName = Annotated[str, AfterValidator(registered(PRE_AGGREGATIONS))]
AttackName = Annotated[str, AfterValidator(registered(ATTACKS))]
AccountantName = Annotated[str, AfterValidator(registered(ACCOUNTANTS))]
GradSampleModeName = Annotated[str, AfterValidator(registered(GRAD_SAMPLE_MODES))]

REGISTRIES: dict[str, Mapping[str, Any]] = {
    "model": MODELS,
    "aggregation.method": AGGREGATORS,
    "aggregation.pre_aggregation": PRE_AGGREGATIONS,
    "attack.kind": ATTACKS,
    "privacy.accountant": ACCOUNTANTS,
    "privacy.grad_sample_mode": GRAD_SAMPLE_MODES,
    "privacy.randomness": RANDOMNESS,
}
"""Dotted config key → the registry its value is checked against."""


class _Section(BaseModel):
    # NaN and ±inf satisfy no bound that matters (nan compares False, inf passes ge=0)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FeatureReference(_Section):
    """A numeric feature's declared preprocessing; nothing in it is computed from patients.

    A value ``x`` becomes ``(clip(x, low, high) − center) / scale``; a missing value is
    ``fill`` first. The output therefore lies in ``[(low − center)/scale, (high − center)/scale]``
    whatever the input. Left out, ``center`` is the midpoint ``(low + high)/2``, ``scale`` the
    half-width ``(high − low)/2`` (so the output lies in [−1, 1]) and ``fill`` is ``center``.
    """

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    center: float = Field(allow_inf_nan=False)
    scale: float = Field(gt=0, allow_inf_nan=False)
    fill: float = Field(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _range_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        low, high = raw.get("low"), raw.get("high")
        if not all(isinstance(v, int | float) for v in (low, high)):
            return raw  # the field checks name what is missing or malformed
        return with_range_defaults(raw)

    @model_validator(mode="after")
    def _fill_in_range(self) -> FeatureReference:
        if not self.low <= self.fill <= self.high:
            raise ValueError(
                f"fill={self.fill:g} must lie in [low, high] = [{self.low:g}, {self.high:g}]")
        return self


class DataConfig(_Section):
    """Which table, which dataset schema, which features, and how patients become clients.

    ``schema`` (``data.schema``) is the dataset schema file (relative: to the project root):
    column names, label rule, feature types, valid ranges and the declared preprocessing all
    come from it (:mod:`fl_core.data.schema`). ``spec`` is that schema, loaded: filled in by
    :func:`load_config` (or from ``schema`` when a ``DataConfig`` is built directly), and
    carried in the dumped configuration so that a site needs no schema file of its own.
    ``features`` selects some of the schema's features (default: all of them).

    ``site_files`` (site → file, relative to the project root) replaces ``path`` when the
    schema declares ``site_source: file`` (one file per site, no site column): each file is
    read as that site's rows (:meth:`sources`). In sites mode each worker names its own file
    instead and the coordinator needs neither.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              populate_by_name=True)

    path: str = "data/raw/heart_disease_uci.csv"
    site_files: dict[str, str] | None = Field(None, min_length=1)
    schema_path: str = Field(DEFAULT_SCHEMA, alias="schema", min_length=1)
    spec: DatasetSchema
    features: list[str] = Field(min_length=1)
    drop_incomplete: bool = True
    one_hot: bool = True
    partition: Literal["by_site", "by_patient"] = "by_site"
    num_clients: int = Field(20, ge=2, le=1000)
    dirichlet_alpha: float | None = Field(None, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _schema_and_features(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        out = dict(raw)
        if out.get("spec") is None:  # reading the schema file is the adapters' (config_files)
            raise ValueError("spec: the dataset schema is not loaded; build the configuration "
                             "with adapters.config_files (load_config, build_config)")
        if out.get("features") is None:
            spec = out["spec"]
            names = spec.features if isinstance(spec, DatasetSchema) else spec.get("features")
            out["features"] = list(names or [])
        return out

    @model_validator(mode="after")
    def _known_features(self) -> DataConfig:
        unknown = [f for f in self.features if f not in self.spec.features]
        if unknown:
            raise ValueError(
                f"unknown feature(s) {unknown}; accepted (data.schema "
                f"{self.schema_path}): {', '.join(self.spec.features)}")
        return self

    @model_validator(mode="after")
    def _site_files_fit_schema(self) -> DataConfig:
        if self.site_files is None:
            return self
        if self.spec.site_source != "file":
            raise ValueError(
                f"site_files: the schema {self.schema_path} reads each row's site from the "
                f"column {self.spec.site!r} (site_source: column); give one data.path, or "
                f"declare site_source: file in the schema")
        unknown = [s for s in self.site_files if s not in self.spec.sites]
        if unknown:
            raise ValueError(f"site_files: unknown site(s) {unknown}; the schema's sites: "
                             f"{', '.join(self.spec.sites)}")
        return self

    def sources(self, root: str | Path = ".") -> tuple[tuple[Path, str | None], ...]:
        """The raw files to read (under ``root``, the project root), each with the site it
        holds (None: its site column says which): ``((path, None),)``, or every
        ``site_files`` entry in order."""
        if self.site_files:
            return tuple((Path(root) / path, site) for site, path in self.site_files.items())
        return ((Path(root) / self.path, None),)

    @property
    def source_text(self) -> str:
        """What messages call the data: ``path``, or ``data.site_files (N files)``."""
        return f"data.site_files ({len(self.site_files)} files)" if self.site_files else self.path

    @property
    def reference(self) -> dict[str, FeatureReference]:
        """The declared preprocessing of each selected numeric feature (from the schema)."""
        return {name: feature_reference(self.spec.feature(name)) for name in self.features
                if self.spec.feature(name).numeric}

    @property
    def missing_category(self) -> dict[str, str]:
        """The value standing in for a missing one, per selected categorical/boolean feature."""
        return {name: str(self.spec.feature(name).fill) for name in self.features
                if not self.spec.feature(name).numeric}

    @property
    def missing_indicators(self) -> tuple[str, ...]:
        """Selected features with "not measured" tokens: each gets a 0/1 missing column."""
        return tuple(n for n in self.features if self.spec.feature(n).missing_values)


def feature_reference(spec: FeatureSpec) -> FeatureReference:
    """A numeric feature's declared preprocessing, from its schema entry."""
    return FeatureReference(low=spec.low, high=spec.high, center=spec.center, scale=spec.scale,
                            fill=spec.fill)


class CompressionConfig(_Section):
    """Uplink (and optionally downlink) compression: error feedback + top-k + b-bit values."""

    enabled: bool = True
    ratio: float = Field(0.1, gt=0, le=1)
    bits: int = Field(8, ge=2, le=8)
    chunk_size: int = Field(1024, ge=0, le=MAX_COUNT)
    stochastic_rounding: bool = False
    error_feedback: bool = True
    momentum: float = Field(0.0, ge=0, lt=1)
    warmup_rounds: int = Field(0, ge=0, le=10_000)
    downlink: Literal["dense", "compressed"] = "dense"
    # a model with fewer parameters sends dense float32 (an update of a few hundred bytes
    # gains nothing, and top-10 % of 20 coefficients moves 2 per round: docs/compression.md)
    min_parameters: int = Field(4096, ge=0)


class AggregationConfig(_Section):
    """How the server combines updates, and how many Byzantine clients it is built to tolerate."""

    method: AggregatorName = "centered_clipping"
    byzantine_fraction: float = Field(0.3, ge=0, lt=0.5)
    pre_aggregation: PreAggregationName = "none"
    bucket_size: int = Field(2, ge=1, le=1000)
    max_norm_factor: float = Field(100.0, ge=0)

    def num_byzantine(self, n_clients: int) -> int:
        """``f = ⌊byzantine_fraction · n⌋``."""
        return int(self.byzantine_fraction * n_clients + 1e-9)


class AnomalyConfig(_Section):
    enabled: bool = True
    # robust z-scores of fewer updates flag honest outliers
    min_clients: int = Field(5, ge=3, le=1000)
    z_threshold: float = Field(3.0, gt=0)
    reputation_decay: float = Field(0.8, ge=0, lt=1)
    exclude_at: float = Field(2.0, gt=0)


class AttackConfig(_Section):
    """Simulated Byzantine clients (benchmarks and drills; ``none`` in production)."""

    kind: AttackName = "none"
    fraction: float = Field(0.0, ge=0, lt=1)
    scale: float = Field(4.0, gt=0)
    noise_std: float = Field(1.0, gt=0)
    ipm_epsilon: float = Field(0.5, gt=0)


class ServerDPConfig(_Section):
    """Client-level DP-FedAvg on the server: clip each update, add noise to the sum."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, gt=0)


class PrivacyConfig(_Section):
    """Patient-level DP-SGD at every client, the run's (ε, δ) and the lifetime budget."""

    enabled: bool = True
    epsilon: float = Field(1.0, gt=0, le=100)  # for the whole run, per patient
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)  # per-patient clipping bound C
    sample_rate: float = Field(1.0, gt=0, le=1)  # Poisson sampling rate of patients
    accountant: AccountantName = "prv"
    grad_sample_mode: GradSampleModeName = "hooks"
    learning_rate: float | None = Field(0.5, gt=0, le=10)  # None = the top-level learning_rate
    # a site whose expected batch (sample_rate x patients) is B > reference_batch steps
    # B / reference_batch times as far: its noise on the mean gradient is σC/B (None: off)
    reference_batch: int | None = Field(256, ge=1)
    lifetime_epsilon: float = Field(10.0, gt=0)  # per site and dataset, over all runs
    ledger: str | None = None  # None = <state_dir>/privacy_ledger.sqlite
    # where DP noise and sampling come from: secure (OS entropy, promotable) | reproducible
    randomness: str = "secure"
    server: ServerDPConfig = Field(default_factory=ServerDPConfig)
    # the statistics a site releases besides its updates (fl_core/privacy/release.py): the
    # evaluation's noisy histogram (σ per cell, bins per label, even) on every k-th round and
    # the last (0: the last only), and the membership audit's (σ per cell, bins)
    # (defaults measured on the heart data: benchmarks/dp_statistics.py, docs/results.md)
    evaluation_noise: float = Field(2.0, ge=0, le=1e6)
    evaluation_bins: int = Field(4, ge=2, le=4096)
    evaluation_every: int = Field(0, ge=0)
    audit_noise: float = Field(4.0, ge=0, le=1e6)
    audit_bins: int = Field(8, ge=1, le=4096)

    @field_validator("randomness")
    @classmethod
    def _known_randomness(cls, value: str) -> str:
        if value not in RANDOMNESS:
            raise ValueError(f"{unknown(RANDOMNESS, value)} (reproducible noise is for "
                             f"simulation and tests; such a model is never champion)")
        return value

    @field_validator("evaluation_bins")
    @classmethod
    def _even_bins(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"evaluation_bins={value}: must be even (0.5 is a bin edge)")
        return value

    @model_validator(mode="after")
    def _private_releases_are_noisy(self) -> PrivacyConfig:
        if self.enabled and (self.evaluation_noise == 0 or self.audit_noise == 0):
            raise ValueError("privacy.evaluation_noise and privacy.audit_noise must be > 0 "
                             "with privacy.enabled: an exact statistic has no finite ε")
        return self

    @model_validator(mode="after")
    def _run_fits_lifetime(self) -> PrivacyConfig:
        if self.enabled and self.epsilon > self.lifetime_epsilon:
            raise ValueError(
                f"privacy.epsilon={self.epsilon:g} exceeds privacy.lifetime_epsilon="
                f"{self.lifetime_epsilon:g}: no run could ever fit; lower privacy.epsilon")
        return self


class AuditConfig(_Section):
    """The membership-inference audit and what it must show for a model to be promoted."""

    enabled: bool = True
    shadow_models: int = Field(8, ge=2, le=256)
    # cap on population patients; None = all
    population_size: int | None = Field(None, ge=10, le=MAX_COUNT)
    online: bool = False  # LiRA online: shadows also train on the target's evaluated members
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of the empirical ε lower bound
    max_auc: float = Field(0.60, ge=0, le=1)
    max_tpr_at_0_1pct_fpr: float = Field(0.05, ge=0, le=1)


class DPAuditConfig(_Section):
    """The white-box canary audit of the DP implementation (``fedpriv audit-dp``;
    docs/audits.md). Its cost is ``runs × (1 + regenerate)`` training runs of
    ``rounds`` rounds; it trains no model that is released."""

    in_pipeline: bool = False  # run it in `fedpriv run` before registration (adds its cost)
    # patient: DP-SGD with canary patients at every client; client: DP-FedAvg (privacy.server)
    # with one canary client per model coordinate
    level: Literal["patient", "client"] = "patient"
    runs: int = Field(16, ge=2, le=10_000)  # audit training runs (independent canary draws)
    # canaries per client and run, one per model coordinate; None = every coordinate
    canaries_per_client: int | None = Field(None, ge=1, le=MAX_COUNT)
    rounds: int | None = Field(None, ge=1, le=100_000)  # None = the recipe's `rounds`
    confidence: float = Field(0.99, gt=0.5, lt=1)  # of the ε lower bound (all bounds together)
    # also score against a replay of the run from the configuration's seed (noise that can be
    # regenerated cancels out); doubles the cost
    regenerate: bool = True


class SiteSpec(_Section):
    """One hospital in ``federation.mode=sites``: its id (the value of its rows' site column)
    and the Prefect work pool its own worker polls (default ``site-<id slug>``)."""

    id: str = Field(min_length=1, max_length=200)
    work_pool: str | None = None

    @property
    def pool(self) -> str:
        return self.work_pool or f"site-{site_slug(self.id)}"


def site_slug(site: str) -> str:
    """A site's name as a folder or pool name: lower case, each run of characters other
    than ASCII letters and digits one ``-`` (``St. Mary's North`` → ``st-mary-s-north``)."""
    return re.sub(r"[^a-z0-9]+", "-", site.lower()).strip("-")


HOST_PORT_PATTERN = r"^[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}$"


class EndpointConfig(_Section):
    """The coordinator's federation endpoint in ``federation.mode=sites`` (gRPC over mutual
    TLS; docs/deployment.md): where it listens, what the sites dial, its certificates."""

    # host:port to bind; port 0 = any free port (the address sites get is then resolved)
    listen: str = Field("127.0.0.1:0", pattern=HOST_PORT_PATTERN)
    # host:port the sites dial, when it differs from ``listen`` (a NAT, a proxy, 0.0.0.0)
    address: str | None = Field(None, pattern=HOST_PORT_PATTERN)
    # the PKI folder (relative: to the root): ca/ca.crt, ca/crl.pem, server/server.{key,crt}
    pki: str = ".fedpriv/pki"
    # the largest message accepted, declared before any byte of it is read
    max_message_mb: float = Field(256.0, gt=0, le=4096)


class FederationConfig(_Section):
    """How the coordinator talks to sites.

    ``mode=simulation`` (the default): every site in the coordinator's process.
    ``mode=sites``: each site is a Prefect flow run on its own work pool, started once per
    run, reading only its own file; its session dials out to the coordinator's federation
    endpoint (``endpoint``) over mutually authenticated TLS (docs/sites-mode.md).
    """

    mode: Literal["simulation", "sites"] = "simulation"
    sites: list[SiteSpec] = Field(default_factory=list)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    # a site that has not replied by then is failed for that round only
    round_timeout_s: float = Field(300.0, gt=0, le=86_400)
    # how long a site's session may take to start (worker pick-up, imports, validation)
    site_start_timeout_s: float = Field(180.0, gt=0, le=86_400)
    # the audit at a site scores its patients under the final model (no shadow model)
    audit_timeout_s: float = Field(600.0, gt=0, le=86_400)

    @property
    def session_idle_timeout_s(self) -> float:
        """How long a site's session waits for the next instruction before it gives up: past
        the longest the coordinator may be busy elsewhere (waiting for the other sites to
        start, for a round, for the others' audits)."""
        return self.site_start_timeout_s + max(2 * self.round_timeout_s,
                                               self.audit_timeout_s) + 60

    @model_validator(mode="after")
    def _sites_named_once(self) -> FederationConfig:
        ids = [s.id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ValueError(f"federation.sites names a site twice: {ids}")
        if self.mode == "sites" and not self.sites:
            raise ValueError("federation.mode=sites needs federation.sites: [{id, work_pool}]")
        return self


class GateConfig(_Section):
    # the decision is on lower confidence bounds (sampling + the evaluation's DP noise), so
    # five test patients or a majority-class model cannot pass; point figures are optional
    min_auc_lower: float = Field(0.6, ge=0, le=1)  # 0 = off
    min_balanced_accuracy_lower: float = Field(0.55, ge=0, le=1)  # at probability 0.5; 0 = off
    confidence: float = Field(0.95, ge=0.5, lt=1)  # one-sided
    min_test_patients: int = Field(50, ge=0)
    min_test_positives: int = Field(10, ge=0)
    min_test_negatives: int = Field(10, ge=0)
    # every site whose updates are in the model answered the final evaluation
    all_sites_evaluated: bool = True
    # `fedpriv run` / `stage register|publish` exit 10 when the gate refused champion
    refusal_exit: bool = False
    # optional rules on the point figures; 0 = off (accuracy passes on the majority class)
    min_accuracy: float = Field(0.0, ge=0, le=1)
    min_auc: float = Field(0.0, ge=0, le=1)
    min_balanced_accuracy: float = Field(0.0, ge=0, le=1)  # at probability 0.5


class MlflowConfig(_Section):
    tracking_uri: str | None = None
    experiment: str = Field("fedpriv", min_length=1)
    # the registered model; None (the default) = "fedpriv-<dataset schema id>", so that a run
    # on another table never becomes a version (or the champion) of another table's model
    model_name: str | None = Field(None, min_length=1)
    # the DVC pipeline's last stage (`fedpriv stage publish`) registers only when true;
    # `fedpriv run`, the Prefect deployment and `fedpriv stage register` always register
    register_from_dvc: bool = False


class MonitoringConfig(_Section):
    """Prometheus metrics (docs/monitoring.md). Off unless an address is set: with neither,
    nothing starts, nothing is pushed and ``prometheus_client`` is never imported."""

    # host:port or http(s)://host:port[/path] of a Pushgateway: each stage of a run pushes its
    # metrics there (job "fedpriv", grouping key run_id); a failed push warns once, never fails
    pushgateway: str | None = Field(None, pattern=r"^(https?://)?[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}"
                                                  r"(/[^\s]*)?$")
    # host:port where a long-lived process (the federation endpoint) serves /metrics
    listen: str | None = Field(None, pattern=HOST_PORT_PATTERN)
    # push at the end of every round too (an operator sees progress), not only per stage
    push_every_round: bool = True
    # seconds after training starts by which the run should be published (an alert's
    # fedpriv_run_deadline_timestamp_seconds); None: no deadline
    run_deadline_s: float | None = Field(None, gt=0, le=30 * 86_400)

    @property
    def enabled(self) -> bool:
        return self.pushgateway is not None or self.listen is not None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out



class PipelineConfig(_Section):
    seed: int = Field(42, ge=0, le=MAX_SEED)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelName = "logreg"
    hidden_units: int = Field(32, ge=1, le=4096)
    rounds: int = Field(20, ge=1, le=10_000)
    local_epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=MAX_COUNT)
    learning_rate: float = Field(0.1, gt=0, le=10)
    min_clients: int = Field(2, ge=1, le=1000)  # at most data.num_clients' upper bound
    client_fraction: float = Field(1.0, gt=0, le=1)  # Poisson share of clients per round
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    audit_dp: DPAuditConfig = Field(default_factory=DPAuditConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    reports_dir: str = "reports"
    state_dir: str = ".fedpriv"

    @model_validator(mode="after")
    def _model_name_from_schema(self) -> PipelineConfig:
        if self.mlflow.model_name is None:  # frozen: set once, here, while validating
            named = self.mlflow.model_copy(update={"model_name": f"fedpriv-{self.data.spec.id}"})
            object.__setattr__(self, "mlflow", named)
        return self

    @model_validator(mode="after")
    def _sites_mode_supported(self) -> PipelineConfig:
        if self.federation.mode != "sites":
            if self.data.spec.site_source == "file" and not self.data.site_files:
                raise ValueError(
                    f"data.site_files: the schema {self.data.schema_path} declares one file "
                    f"per site (site_source: file); name each site's file, e.g. "
                    f"data.site_files={{{self.data.spec.sites[0]}: <path>, ...}}")
            return self
        if self.data.partition != "by_site":
            raise ValueError("federation.mode=sites needs data.partition=by_site: each site "
                             "trains on its own patients")
        if self.attack.kind != "none" and self.attack.fraction > 0:
            raise ValueError("attack.*: simulated attacks run in federation.mode=simulation "
                             "only")
        check_min_clients(self.min_clients, len(self.federation.sites), "federation.sites")
        if self.audit_dp.in_pipeline:
            raise ValueError("audit_dp.in_pipeline runs in federation.mode=simulation; audit a "
                             "sites-mode recipe with `fedpriv audit-dp` at the coordinator")
        return self

    @model_validator(mode="after")
    def _aggregator_can_tolerate(self) -> PipelineConfig:
        # by_patient fixes the number of clients here; by_site is checked once the sites are known
        if self.data.partition == "by_patient":
            check_aggregation(self.aggregation, self.data.num_clients)
            check_min_clients(self.min_clients, self.data.num_clients, "data.num_clients")
        coordinate_wise = self.aggregation.method in ("trimmed_mean", "median")
        if coordinate_wise and self.compression.enabled and self.compression.ratio < 0.5:
            raise ValueError(
                f"aggregation.method={self.aggregation.method} with compression.ratio="
                f"{self.compression.ratio}: a coordinate-wise rule over sparse updates sees "
                f"mostly zeros in every coordinate and stops learning; use multi_krum, "
                f"geometric_median or centered_clipping, or set compression.enabled=false"
            )
        if self.privacy.server.enabled and self.aggregation.method != "fedavg":
            raise ValueError(
                f"privacy.server.enabled=true with aggregation.method="
                f"{self.aggregation.method}: DP-FedAvg's guarantee covers the clipped sum of "
                f"updates only; set aggregation.method=fedavg (and anomaly.enabled=false)")
        if self.client_fraction < 1 and self.compression.enabled \
                and self.compression.downlink == "compressed":
            raise ValueError(
                f"client_fraction={self.client_fraction} with compression.downlink=compressed: "
                f"a client that sits a round out would miss that round's model delta; use "
                f"compression.downlink=dense or client_fraction=1")
        _check_server_dp(self)
        return self

    @property
    def ledger_path(self) -> Path:
        if self.privacy.ledger:
            return Path(self.privacy.ledger)
        return Path(self.state_dir) / "privacy_ledger.sqlite"

    def flat(self) -> dict[str, Any]:
        """Dotted key → value, for logging as run parameters."""
        return _flatten(self.dumped(schema=False))

    def dumped(self, schema: bool = True) -> dict[str, Any]:
        """The configuration as JSON-able data (keys as in ``params.yaml``); ``schema=False``
        leaves out the loaded dataset schema (``data.spec``) and keeps its path."""
        exclude = None if schema else {"data": {"spec"}}
        return self.model_dump(mode="json", by_alias=True, exclude=exclude)

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{Path(self.state_dir).resolve() / 'mlflow.db'}"


def _check_server_dp(cfg: PipelineConfig) -> None:
    """DP-FedAvg bounds each client's influence on the clipped *sum* by S; anything that acts
    on the raw updates before it (mixing, bucketing, filtering by other clients' norms,
    excluding by anomaly score) lets one client move the result by more than S."""
    if not cfg.privacy.server.enabled:
        return
    agg = cfg.aggregation
    rule = ("client-level DP-FedAvg's guarantee needs every client's update to reach the "
            "clipped sum unmixed and unfiltered")
    if agg.pre_aggregation != "none":
        raise ValueError(
            f"privacy.server.enabled=true with aggregation.pre_aggregation="
            f"{agg.pre_aggregation}: {rule} ({agg.pre_aggregation} moves the clipped sum by "
            f"more than S); set aggregation.pre_aggregation=none")
    if agg.max_norm_factor > 0:
        raise ValueError(
            f"privacy.server.enabled=true with aggregation.max_norm_factor="
            f"{agg.max_norm_factor:g}: {rule} (rejecting updates by the round's median norm "
            f"depends on the other clients); set aggregation.max_norm_factor=0 (clipping to "
            f"privacy.server.clip_norm already bounds every update)")
    if cfg.anomaly.enabled:
        raise ValueError(
            f"privacy.server.enabled=true with anomaly.enabled=true: {rule} (excluding "
            f"clients by their raw updates sits outside the guarantee); set "
            f"anomaly.enabled=false")


def check_min_clients(min_clients: int, n_clients: int, source: str) -> None:
    """Raise :class:`ConfigError` if no round could ever have ``min_clients`` clients."""
    if min_clients > n_clients:
        raise ConfigError(
            f"min_clients={min_clients} exceeds the {n_clients} clients ({source}): no "
            f"round could succeed; lower min_clients to at most {n_clients}")


def check_aggregation(agg: AggregationConfig, n_clients: int) -> None:
    """Raise if ``aggregation.method`` cannot tolerate its Byzantine fraction of ``n_clients``."""
    try:
        check_robustness(agg.method, n_clients, agg.num_byzantine(n_clients))
    except ValueError as exc:
        raise ValueError(
            f"aggregation.method={agg.method} with aggregation.byzantine_fraction="
            f"{agg.byzantine_fraction} on {n_clients} clients: {exc}; lower "
            f"aggregation.byzantine_fraction or choose another aggregation.method"
        ) from None
