"""Building a federated run from the configuration: model, sites, codec, defense, DP, attack.

Everything :func:`federate` needs is chosen here from ``params.yaml`` (the pipeline's train
stage, the audit's shadow models, the audit sweep and the benchmarks all run the same
wiring): the model (Opacus-compatible when DP-SGD is on), one :class:`SiteClient` per client
with its codec and DP-SGD recipe (:func:`make_site_client`, which a site's session in sites
mode and the DP audit use too; the recipe calibrated once per run by :func:`make_dpsgd`),
the server's defense (robust aggregator, pre-aggregation, anomaly detection, DP-FedAvg), the
simulated attack, and the randomness source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_core.codec.dense import DenseCodec
from fl_core.codec.error_feedback import UpdateCompressor
from fl_core.codec.topk import TopKQuantizer
from fl_core.config.model import (
    CompressionConfig,
    ConfigError,
    PipelineConfig,
    check_aggregation,
)
from fl_core.data.tables import ClientData
from fl_core.federation.coordinator import (
    Defense,
    FederationSettings,
    RoundRecord,
    TrainingResult,
    run_federated,
)
from fl_core.federation.simulation import simulate
from fl_core.federation.site_client import LocalTrainingConfig, SiteClient
from fl_core.federation.transport import Transport
from fl_core.model.networks import build_model, get_flat_params
from fl_core.privacy.accountants import calibrate_noise, check_delta, local_steps
from fl_core.privacy.dp_fedavg import DPFedAvg
from fl_core.privacy.dpsgd import DPSGDConfig, check_model
from fl_core.privacy.randomness import RandomSource, make_random
from fl_core.privacy.release import EvaluationRelease
from fl_core.robust.aggregators import Aggregator, make_aggregator, make_pre_aggregation
from fl_core.robust.anomaly import Reputation
from fl_core.robust.attacks import Attack, choose_malicious


def client_spending(
    site_epsilon: Mapping[str, float], site_dp_steps: Mapping[str, int]
) -> dict[str, tuple[float, int]]:
    """client id → (ε, DP steps) as the clients reported them in their fit replies."""
    return {c: (float(site_epsilon.get(c, 0.0)), int(steps)) for c, steps in site_dp_steps.items()}


def parameter_count(cfg: PipelineConfig, num_features: int) -> int:
    """How many parameters the configured model has over ``num_features`` inputs."""
    return int(get_flat_params(build_model(cfg.model, num_features,
                                           hidden_units=cfg.hidden_units, seed=0)).numel())


def compression_for(compression: CompressionConfig, n_params: int) -> CompressionConfig:
    """``compression`` as it applies to a model of ``n_params``: dense below
    ``min_parameters``. Top-k at ratio r moves ⌈r·n⌉ coordinates a round; for a logistic
    regression of 20 coefficients that is 2, and on the utility panel's two-cohort breast
    table the default recipe lost 0.16 AUC to it (benchmarks/utility_panel.py), to save
    a few hundred bytes a round."""
    if compression.enabled and n_params < compression.min_parameters:
        return compression.model_copy(update={"enabled": False})
    return compression


def quantizer(*, compression: CompressionConfig, seed: int) -> TopKQuantizer:
    """The top-k quantizer of ``compression``, its stochastic rounding seeded by ``seed``."""
    c = compression
    return TopKQuantizer(c.ratio, c.bits, chunk_size=c.chunk_size,
                         stochastic=c.stochastic_rounding, seed=seed)


def make_compressor(*, compression: CompressionConfig, seed: int) -> UpdateCompressor:
    """A client's uplink pipeline as configured under ``compression``."""
    c = compression
    if not c.enabled:
        return UpdateCompressor(DenseCodec(), error_feedback=False)
    return UpdateCompressor(quantizer(compression=c, seed=seed), error_feedback=c.error_feedback,
                            momentum=c.momentum, warmup_rounds=c.warmup_rounds)


def describe_compression(configured: CompressionConfig, n_params: int) -> str:
    """What crosses the uplink (and downlink) for a model of ``n_params``, in words."""
    c = compression_for(configured, n_params)
    if configured.enabled and not c.enabled:
        return (f"uplink dense float32 ({n_params} parameters, under "
                f"compression.min_parameters {c.min_parameters})")
    if not c.enabled:
        return "uplink dense float32"
    parts = [f"uplink top-{c.ratio:.3g} {c.bits}-bit",
             "error feedback" if c.error_feedback else "no error feedback"]
    if c.momentum:
        parts.append(f"momentum {c.momentum}")
    if c.warmup_rounds:
        parts.append(f"warm-up {c.warmup_rounds} rounds")
    parts.append(f"downlink {c.downlink}")
    return ", ".join(parts)


def make_defense(*, cfg: PipelineConfig, n_clients: int, random: RandomSource) -> Defense:
    """The server's defense as configured under ``aggregation`` and ``anomaly``; DP-FedAvg's
    noise (``privacy.server``) is drawn from ``random``."""
    agg = cfg.aggregation
    try:
        check_aggregation(agg, n_clients)
    except ValueError as exc:  # by_site: the number of clients is only known now
        raise ConfigError(str(exc)) from None
    f = agg.num_byzantine(n_clients)
    aggregator: Aggregator = make_aggregator(agg.method, f=f)
    server = cfg.privacy.server
    if server.enabled:  # a wrapper strategy around the (fedavg) rule; config checked the rest
        # divide by the *expected* number of clients: the sensitivity stays S / (q·n)
        aggregator = DPFedAvg(clip_norm=server.clip_norm,
                              noise_multiplier=server.noise_multiplier,
                              expected_clients=cfg.client_fraction * n_clients,
                              random=random.stream("server-dp"), inner=aggregator)
    an = cfg.anomaly
    return Defense(
        aggregator=aggregator,
        pre_aggregation=make_pre_aggregation(agg.pre_aggregation, f=f,
                                             bucket_size=agg.bucket_size, seed=cfg.seed),
        detect=an.enabled,
        detect_min_clients=an.min_clients,
        z_threshold=an.z_threshold,
        reputation=Reputation(decay=an.reputation_decay, exclude_at=an.exclude_at),
        max_norm_factor=agg.max_norm_factor,
    )


def make_attack(*, cfg: PipelineConfig, client_ids: list[str]) -> Attack | None:
    """The simulated attack of ``attack.*`` on ``client_ids`` (None when there is none)."""
    a = cfg.attack
    if a.kind == "none" or a.fraction == 0:
        return None
    malicious = choose_malicious(client_ids, a.fraction, cfg.seed)
    return Attack(kind=a.kind, malicious=malicious, scale=a.scale, noise_std=a.noise_std,
                  ipm_epsilon=a.ipm_epsilon)


def poisoned(data: ClientData) -> ClientData:
    """The client's data with its training labels flipped (data poisoning)."""
    return dataclasses.replace(data, y_train=1.0 - data.y_train)


def make_dpsgd(*, cfg: PipelineConfig, data: Sequence[ClientData]) -> DPSGDConfig | None:
    """Every client's DP-SGD recipe, σ calibrated so the whole run costs ``privacy.epsilon``
    (:func:`dp_recipe` with each client's number of patients)."""
    return dp_recipe(cfg=cfg, patients={d.client_id: int(d.patient_ids().unique().numel())
                                        for d in data})


def dp_recipe(*, cfg: PipelineConfig, patients: Mapping[str, int]) -> DPSGDConfig | None:
    """The DP-SGD recipe of a run whose clients hold ``patients`` (client → count).

    All clients share the sample rate and the number of steps, hence one σ. Called once where
    a run is set up (the train stage, a site's session, the coordinator of the sites, the DP
    audit, each audit shadow) and carried from there to the clients and the ledger. Raises
    :class:`ConfigError` when ``privacy.delta`` is not below 1/patients at some client.
    """
    p = cfg.privacy
    if not p.enabled:
        return None
    largest = max(patients, key=patients.__getitem__)  # the binding bound: 1/most patients
    try:
        check_delta(p.delta, patients[largest], f"client {largest!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    steps = local_steps(cfg.rounds, cfg.local_epochs, p.sample_rate)
    try:
        sigma = calibrate_noise(p.epsilon, p.delta, p.sample_rate, steps, p.accountant)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return DPSGDConfig(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                       sample_rate=p.sample_rate,
                       learning_rate=p.learning_rate or cfg.learning_rate, delta=p.delta,
                       accountant=p.accountant, grad_sample_mode=p.grad_sample_mode,
                       reference_batch=p.reference_batch)


def build_target_model(cfg: PipelineConfig, num_features: int) -> tuple[torch.nn.Module, list[str]]:
    """The configured model, initialised from ``seed``; with DP-SGD, one Opacus accepts
    (server, clients and audit shadows share it). Returns the model and Opacus's fixes."""
    model = build_model(cfg.model, num_features, hidden_units=cfg.hidden_units, seed=cfg.seed)
    if cfg.privacy.enabled:
        return check_model(model)
    return model, []


@dataclass(frozen=True)
class FederatedRun:
    """A finished federated run and what made it: its DP recipe and the attack."""

    result: TrainingResult
    dp: DPSGDConfig | None
    attack: Attack | None
    model_fixes: list[str]  # what ModuleValidator.fix changed for Opacus (usually nothing)

    @property
    def spent(self) -> dict[str, tuple[float, int]]:
        """client id → (ε, DP steps), as the clients reported them."""
        return client_spending(self.result.site_epsilon, self.result.site_dp_steps)


def federation_settings(cfg: PipelineConfig) -> FederationSettings:
    return FederationSettings(
        rounds=cfg.rounds, local_epochs=cfg.local_epochs, min_clients=cfg.min_clients,
        round_timeout_s=cfg.federation.round_timeout_s, client_fraction=cfg.client_fraction,
        evaluate_every=cfg.privacy.evaluation_every)


def make_downlink(cfg: PipelineConfig, n_params: int) -> TopKQuantizer | None:
    comp = compression_for(cfg.compression, n_params)
    if comp.enabled and comp.downlink == "compressed":
        return quantizer(compression=comp, seed=cfg.seed)
    return None


def local_training(cfg: PipelineConfig) -> LocalTrainingConfig:
    """A client's non-private local SGD as configured."""
    return LocalTrainingConfig(local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                               learning_rate=cfg.learning_rate, seed=cfg.seed)


def make_site_client(
    *, cfg: PipelineConfig, data: ClientData, index: int, dp: DPSGDConfig | None,
    random: RandomSource,
) -> SiteClient:
    """One site's client, as simulation, sites mode and the DP audit all build it: the
    configured model (Opacus-compatible when private), local training, the uplink codec seeded
    ``seed + index`` (``index``: the site's position among the run's clients, as in
    ``federation.sites``), the run's DP-SGD recipe ``dp`` (calibrated once for the run, by
    :func:`make_dpsgd`) and the run's randomness."""
    num_features = int(data.x_train.shape[1])
    compression = compression_for(cfg.compression, parameter_count(cfg, num_features))
    return SiteClient(
        data=data, model_factory=lambda: build_target_model(cfg, num_features)[0],
        training=local_training(cfg),
        compressor=make_compressor(compression=compression, seed=cfg.seed + index),
        privacy=dp, randomness=random, evaluation=evaluation_release(cfg))


def evaluation_release(cfg: PipelineConfig) -> EvaluationRelease:
    """How every site releases its evaluation (``privacy.evaluation_bins``/``_noise``)."""
    return EvaluationRelease(bins=cfg.privacy.evaluation_bins,
                             noise=cfg.privacy.evaluation_noise)


@dataclass(frozen=True)
class SimulationSetup:
    """What a simulated run is made of, before it runs: the clients (each a
    :class:`SiteClient` over its data), the coordinator's defense, the model's initial
    parameters, the DP recipe, the attack and the randomness."""

    sites: list[SiteClient]
    initial_params: torch.Tensor
    defense: Defense
    dp: DPSGDConfig | None
    attack: Attack | None
    random: RandomSource
    model_fixes: list[str]


def simulation_setup(
    cfg: PipelineConfig, data: list[ClientData], *, dp: DPSGDConfig | None,
    random: RandomSource | None = None,
) -> SimulationSetup:
    """The configured clients, compression, defense and attack over ``data``, every client
    on the run's DP-SGD recipe ``dp`` (:func:`make_dpsgd`, calibrated once by the caller);
    ``random`` replaces the configured randomness (the DP audit's regenerable-noise drill)."""
    random = random or make_random(cfg.privacy.randomness, cfg.seed)
    defense = make_defense(cfg=cfg, n_clients=len(data), random=random)
    attack = make_attack(cfg=cfg, client_ids=[d.client_id for d in data])
    if attack is not None and attack.flips_labels:  # the patients stay, so does the recipe
        data = [poisoned(d) if d.client_id in attack.malicious else d for d in data]
    sites = [make_site_client(cfg=cfg, data=d, index=i, dp=dp, random=random)
             for i, d in enumerate(data)]
    model, model_fixes = build_target_model(cfg, int(data[0].x_train.shape[1]))
    return SimulationSetup(sites, get_flat_params(model), defense, dp, attack, random,
                           model_fixes)


def federate(
    cfg: PipelineConfig, data: list[ClientData], *, dp: DPSGDConfig | None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederatedRun:
    """The configured federated run on ``data``: clients, compression, defense, attack, and
    the DP-SGD recipe ``dp`` the caller calibrated for this run (:func:`make_dpsgd`; the
    train stage charges the ledger with the same one)."""
    setup = simulation_setup(cfg, data, dp=dp)
    result = simulate(setup.sites, initial_params=setup.initial_params,
                      settings=federation_settings(cfg),
                      downlink=make_downlink(cfg, int(setup.initial_params.numel())),
                      sinks=[on_round] if on_round else (), defense=setup.defense,
                      attack=setup.attack, seed=cfg.seed, randomness=setup.random)
    return FederatedRun(result, setup.dp, setup.attack, setup.model_fixes)


def federate_over(
    cfg: PipelineConfig, *, transport: Transport, patients: Mapping[str, int],
    num_features: int, sinks: Sequence[Callable[[RoundRecord], None]] = (),
) -> FederatedRun:
    """The configured federated run with the sites behind ``transport`` (``patients``: site →
    training patients, as the sites reported them): the same coordinator as :func:`federate`
    (model initialisation, defense, downlink), the sites elsewhere. The DP-SGD recipe is
    calibrated once, here, for the report (each site calibrated its own for its training)."""
    dp = dp_recipe(cfg=cfg, patients=patients)
    model, fixes = build_target_model(cfg, num_features)
    random = make_random(cfg.privacy.randomness, cfg.seed)
    initial = get_flat_params(model)
    result = run_federated(
        transport=transport, sites=list(patients), initial_params=initial,
        settings=federation_settings(cfg), downlink=make_downlink(cfg, int(initial.numel())),
        sinks=sinks,
        defense=make_defense(cfg=cfg, n_clients=len(patients), random=random), attack=None,
        seed=cfg.seed, randomness=random)
    return FederatedRun(result, dp, None, fixes)
