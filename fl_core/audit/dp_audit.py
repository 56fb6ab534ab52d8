"""The white-box DP audit: does the implementation leak more than its accountant's ε?

Each of ``audit_dp.runs`` audit runs trains the configured recipe (the simulation's clients,
patient-level DP-SGD with the configured sampling, clipping, noise source, codec and
aggregation; σ calibrated so that the audited rounds cost ``privacy.epsilon``) with fresh
gradient canaries at every client (:mod:`fl_core.audit.canary`), and records what the
coordinator sees: every client's decoded update of every round, ``U_{k,r}``. The score of
canary ``c`` of client ``k`` is

    z_c = −s_c · Σ_r U_{k,r}[j_c]

(SGD steps against the canary's gradient ``s_c·e_{j_c}``). For an implementation that is what
its accountant says, with ``q = 1`` over ``T`` steps, ``z_c`` is Gaussian with the same
variance in or out and the means ``√T/σ`` standard deviations apart: the accountant's
μ-GDP mechanism, so the audit can be tight. The codec (top-k, 8 bits, error feedback) only
post-processes: it can lower the separation, never raise it. With Poisson sampling ``q < 1``
the canaries are drawn by each client's own production sampler, like its patients: an
included canary is in ``K ~ Binomial(T, q)`` steps, ``z_c`` has mean ``qT`` in and ``0`` out
(separation about ``q√T/σ``, below what the accountant's amplification allows), and a sampler
that draws patients more often than ``q`` shows as a larger separation (the ``sampling_*``
drills).

With ``audit_dp.regenerate`` the auditor also replays every run from the configuration's seed
with every canary left out and scores ``z_c − z_c^replay``: noise that can be regenerated
cancels, secret noise doubles. The ε lower bound is the largest of the Gaussian bound
(:mod:`fl_core.audit.gdp`) and the counting bound (:mod:`fl_core.audit.bounds`) on each score
set, each at ``(1 − confidence)/b`` for ``b`` bounds (Bonferroni): the maximum holds with the
stated confidence. ``ε_lb > ε`` is a PRIVACY FAILURE.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from fl_core.audit.bounds import empirical_epsilon_lower_bound
from fl_core.audit.canary import (
    CANARY_NORM_FACTOR,
    DRILLS,
    CanaryInjection,
    CanarySet,
    draw_canaries,
)
from fl_core.audit.gdp import gdp_epsilon, separation_lower_bound
from fl_core.codec.payload import decode_payload
from fl_core.config.model import ConfigError, PipelineConfig
from fl_core.data.tables import ClientData
from fl_core.federation.messages import (
    EvaluateInstruction,
    Failure,
    FitInstruction,
    FitReply,
    decode_message,
    encode_message,
)
from fl_core.federation.simulation import simulate
from fl_core.federation.site_client import SiteClient
from fl_core.federation.wiring import (
    build_target_model,
    compression_for,
    federation_settings,
    make_compressor,
    make_downlink,
    make_dpsgd,
    simulation_setup,
)
from fl_core.privacy.accountants import epsilon_spent, local_steps
from fl_core.privacy.dpsgd import DPSGDConfig, PoissonSampler
from fl_core.privacy.randomness import RandomSource, make_random

Progress = Callable[[int, int], None]  # (audit runs done, audit runs in all)


@dataclass(frozen=True)
class ScoreBound:
    """One bound on one score set: how it was computed and what it proves."""

    scores: str  # "raw" | "regenerated"
    method: str  # "gaussian" | "counting"
    epsilon_lower_bound: float
    mu_hat: float | None = None  # the Gaussian bound's estimated separation
    mu_lower: float | None = None  # ... and its lower confidence bound


@dataclass(frozen=True)
class DPAuditResult:
    """What ``fedpriv audit-dp`` reports (``reports/audit_dp.json``)."""

    level: str  # "patient" (DP-SGD) | "client" (DP-FedAvg)
    epsilon: float  # the accountant's ε for the audited rounds
    delta: float
    epsilon_lower_bound: float
    confidence: float
    canaries: int  # canary trials in all (runs × clients × canaries per client)
    canaries_included: int
    runs: int
    rounds: int
    training_runs: int  # including the regeneration replays
    seconds: float
    noise_multiplier: float
    steps: int
    bounds: list[ScoreBound] = field(default_factory=list)
    drill: str | None = None
    fingerprint: str = ""  # dp_fingerprint of the audited configuration

    @property
    def power(self) -> float:
        """``ε_lb / ε``: how much of the claim the audit could prove (1 = tight)."""
        return self.epsilon_lower_bound / self.epsilon if self.epsilon > 0 else 0.0

    @property
    def privacy_failure(self) -> bool:
        return self.epsilon_lower_bound > self.epsilon

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(power=self.power, privacy_failure=self.privacy_failure,
                   verdict="PRIVACY FAILURE" if self.privacy_failure else "consistent")
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DPAuditResult:
        """A report written by :meth:`to_json` read back (a kept verdict); ``power``,
        ``privacy_failure`` and ``verdict`` follow from the fields again."""
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in raw.items() if k in names}
        return cls(**{**kept, "bounds": [ScoreBound(**b) for b in raw.get("bounds", [])]})


class _Observed:
    """A site whose fit replies are also decoded the way the coordinator decodes them, and
    summed per coordinate: the auditor's view of the updates."""

    def __init__(self, site: SiteClient, num_params: int) -> None:
        self.site, self.client_id = site, site.client_id
        self.total = torch.zeros(num_params, dtype=torch.float64)
        self._num_params = num_params

    def handle(self, request: bytes) -> bytes:
        reply = self.site.handle(request)
        message = decode_message(reply, site=self.client_id)
        if isinstance(message, FitReply):
            self.total += decode_payload(message.update, self._num_params).double()
        return reply


_MECHANISM_KEYS = ("rounds", "local_epochs", "model", "hidden_units", "learning_rate",
                   "client_fraction", "compression", "aggregation")
_NOT_MECHANISM = {"ledger", "lifetime_epsilon"}


def dp_fingerprint(cfg: PipelineConfig) -> str:
    """The configuration's DP mechanism, hashed: a DP audit's verdict applies to every model
    trained with the same privacy recipe, rounds, model, codec and aggregation (not to the
    data, the seed, the registry or the gate)."""
    tree = cfg.model_dump(mode="json")
    mechanism = {k: tree[k] for k in _MECHANISM_KEYS}
    mechanism["privacy"] = {k: v for k, v in tree["privacy"].items() if k not in _NOT_MECHANISM}
    mechanism["partition"] = tree["data"]["partition"]
    text = json.dumps(mechanism, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_auditable(cfg: PipelineConfig, drill: str | None = None) -> None:
    """Refuse a configuration the canary audit does not cover (exit 2 at the CLI)."""
    level = cfg.audit_dp.level
    if level == "patient" and not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled=false: nothing to audit at audit_dp.level=patient "
                          "(the model is not private)")
    if level == "client" and not cfg.privacy.server.enabled:
        raise ConfigError("audit_dp.level=client audits DP-FedAvg: set "
                          "privacy.server.enabled=true")
    if cfg.attack.kind != "none":
        raise ConfigError("the DP audit runs the honest recipe: set attack.kind=none")
    if drill is not None and drill not in DRILLS:
        raise ConfigError(f"unknown drill {drill!r}; drills: {', '.join(DRILLS)}")
    if drill is not None and level == "client" and DRILLS[drill].per_record:
        raise ConfigError(f"drill {drill} breaks patient-level clipping: use "
                          f"audit_dp.level=patient")
    if drill is not None and DRILLS[drill].breaks_sampling:
        if level == "client":
            raise ConfigError(f"drill {drill} breaks DP-SGD's Poisson sampling of patients: "
                              f"use audit_dp.level=patient")
        if cfg.privacy.sample_rate >= 1:
            raise ConfigError(f"drill {drill} breaks Poisson sampling: set "
                              f"privacy.sample_rate below 1 (at 1 every patient is in every "
                              f"step, there is nothing to sample)")


def audited_config(cfg: PipelineConfig, drill: str | None) -> PipelineConfig:
    """The recipe the audit runs: its rounds, and a drill's clipping bound (the patient's
    ``C`` or, at ``audit_dp.level=client``, DP-FedAvg's ``S``)."""
    rounds = cfg.audit_dp.rounds or cfg.rounds
    out = cfg.model_copy(update={"rounds": rounds})
    if drill is None or DRILLS[drill].clip_factor == 1.0:
        return out
    p, factor = cfg.privacy, DRILLS[drill].clip_factor
    if cfg.audit_dp.level == "client":
        server = p.server.model_copy(update={"clip_norm": p.server.clip_norm * factor})
        privacy = p.model_copy(update={"server": server})
    else:
        privacy = p.model_copy(update={"max_grad_norm": p.max_grad_norm * factor})
    return out.model_copy(update={"privacy": privacy})


def _run_random(cfg: PipelineConfig, drill: str | None) -> RandomSource:
    """The random source of the implementation under audit (a drill's, if one is set)."""
    configured = make_random(cfg.privacy.randomness, cfg.seed)
    return DRILLS[drill].random(configured, cfg.seed) if drill else configured


def _train_observed(cfg: PipelineConfig, data: list[ClientData], dp: DPSGDConfig | None,
                    canaries: dict[str, CanarySet], drill: str | None,
                    clip_norm: float) -> dict[str, torch.Tensor]:
    """One patient-level audit run; client → the sum of its decoded updates.

    The clients are built as a released model's are, by
    :func:`~fl_core.federation.wiring.make_site_client` (through :func:`simulation_setup`):
    the one constructor sites mode's session uses too (``adapters/site_session.py``), so the
    audited trainer, optimizer, sampler, codec and randomness are the object graph a hospital
    runs. The canaries are members of the population each trainer's own Poisson sampler draws
    from (:class:`~fl_core.audit.canary.CanaryInjection`); a sampling drill replaces that
    sampler, nothing else."""
    setup = simulation_setup(cfg, data, dp=dp, random=_run_random(cfg, drill))
    model, _ = build_target_model(cfg, int(data[0].x_train.shape[1]))
    shapes = tuple(p.shape for p in model.parameters())
    n = int(setup.initial_params.numel())
    broken = DRILLS[drill] if drill else None
    for site in setup.sites:
        trainer = site.dp_trainer
        assert trainer is not None and setup.dp is not None
        trainer.per_patient_hook = CanaryInjection(
            canaries=canaries[site.client_id], shapes=shapes, clip_norm=clip_norm,
            per_record=bool(broken and broken.per_record))
        if broken is not None:
            assert isinstance(trainer.sampler, PoissonSampler)
            trainer.sampler = broken.sampler(trainer.sampler)
    observed = [_Observed(site, n) for site in setup.sites]
    simulate(observed, initial_params=setup.initial_params, settings=federation_settings(cfg),
             downlink=make_downlink(cfg, int(setup.initial_params.numel())),
             defense=setup.defense, seed=cfg.seed, randomness=setup.random)
    return {o.client_id: o.total for o in observed}


class _FixedUpdateClient:
    """A client of the client-level audit: it answers every fit with the same update, through
    its own codec (a canary client: a Dirac of norm ``CANARY_NORM_FACTOR·S``; a real client,
    silenced: zeros). It holds no test patients."""

    def __init__(self, client_id: str, update: torch.Tensor, cfg: PipelineConfig,
                 index: int) -> None:
        self.client_id, self._update = client_id, update
        compression = compression_for(cfg.compression, int(update.numel()))
        self._compressor = make_compressor(compression=compression, seed=cfg.seed + index)

    def handle(self, request: bytes) -> bytes:
        message = decode_message(request, expect=(FitInstruction, EvaluateInstruction))
        if isinstance(message, EvaluateInstruction):
            return encode_message(Failure(self.client_id, message.round,
                                          "an audit client holds no test patients"))
        return encode_message(FitReply(
            site=self.client_id, round=message.round,
            update=self._compressor.compress(self._update, message.round), num_patients=1,
            train_loss=0.0, epsilon=None, dp_steps=0))


def _train_client_level(cfg: PipelineConfig, data: list[ClientData], dp: DPSGDConfig | None,
                        canaries: CanarySet, drill: str | None,
                        clip_norm: float) -> torch.Tensor:
    """One client-level audit run: the real clients silenced, an included canary client per
    included canary; returns the released model's total change (Σ of the noisy aggregates)."""
    setup = simulation_setup(cfg, data, dp=dp, random=_run_random(cfg, drill))
    n = int(setup.initial_params.numel())
    size = CANARY_NORM_FACTOR * clip_norm
    clients = [_FixedUpdateClient(d.client_id, torch.zeros(n), cfg, i)
               for i, d in enumerate(data)]
    for i in torch.nonzero(canaries.included)[:, 0].tolist():
        update = torch.zeros(n)
        update[canaries.coordinates[i]] = canaries.signs[i] * size
        clients.append(_FixedUpdateClient(f"canary-{i}", update, cfg, len(clients)))
    result = simulate(clients, initial_params=setup.initial_params,
                      settings=federation_settings(cfg), downlink=make_downlink(cfg, n),
                      defense=setup.defense, seed=cfg.seed, randomness=setup.random)
    return (result.params - setup.initial_params).double()


def _scores(canaries: CanarySet, total: torch.Tensor, unit: float) -> torch.Tensor:
    """``z_c = s_c · Σ U[j_c] / unit``: in units of one step's clipped canary, signed as the
    update moves (``unit = −η·C/B`` for DP-SGD, which steps against the gradient, B the
    client's expected batch; ``S/E`` for DP-FedAvg), so that clients of different sizes
    give scores on one scale and an included canary's mean is positive."""
    return canaries.signs.double() * total[canaries.coordinates] / unit


def _bounds(name: str, scores: torch.Tensor, included: torch.Tensor, delta: float,
            alpha: float) -> list[ScoreBound]:
    mu_hat, mu_lower = separation_lower_bound(scores[included], scores[~included], alpha)
    counting = empirical_epsilon_lower_bound(scores, included, delta, confidence=1 - alpha)
    return [ScoreBound(name, "gaussian", gdp_epsilon(mu_lower, delta), mu_hat, mu_lower),
            ScoreBound(name, "counting", counting)]


@dataclass(frozen=True)
class _Claim:
    """What the accountant claims for the audited rounds."""

    epsilon: float
    delta: float
    noise_multiplier: float
    steps: int  # DP-SGD steps per client, or DP-FedAvg rounds


def _claim(cfg: PipelineConfig, dp: DPSGDConfig | None) -> _Claim:
    """What the accountant claims for the audited rounds of ``cfg`` (at the patient level: of
    the run's recipe ``dp``, whose σ, q and δ a drill leaves as they are)."""
    p = cfg.privacy
    if cfg.audit_dp.level == "client":
        s = p.server
        return _Claim(epsilon_spent(s.noise_multiplier, cfg.client_fraction, cfg.rounds,
                                    p.delta, p.accountant), p.delta, s.noise_multiplier,
                      cfg.rounds)
    assert dp is not None
    steps = local_steps(cfg.rounds, cfg.local_epochs, dp.sample_rate)
    return _Claim(epsilon_spent(dp.noise_multiplier, dp.sample_rate, steps, dp.delta,
                                dp.accountant), dp.delta, dp.noise_multiplier, steps)


def _units(cfg: PipelineConfig, data: list[ClientData]) -> dict[str, float]:
    """Each observed vector's :func:`_scores` unit."""
    p = cfg.privacy
    if cfg.audit_dp.level == "client":
        return {SERVER: p.server.clip_norm / (cfg.client_fraction * len(data))}
    rate = p.learning_rate or cfg.learning_rate
    return {d.client_id: -rate * p.max_grad_norm
            / max(1, round(p.sample_rate * int(d.patient_ids().unique().numel())))
            for d in data}


SERVER = "server"
"""The one observed vector of a client-level audit: the released model's total change."""


def _observe(run_cfg: PipelineConfig, claimed: PipelineConfig, data: list[ClientData],
             dp: DPSGDConfig | None, canaries: dict[str, CanarySet],
             drill: str | None) -> dict[str, torch.Tensor]:
    """One audit run of ``run_cfg`` (the implementation, a drill's if set) on its DP-SGD
    recipe ``dp``; the canaries are sized by the *claimed* clipping bound, so a lifted bound
    lets them through at 10·C."""
    p = claimed.privacy
    if claimed.audit_dp.level == "client":
        return {SERVER: _train_client_level(run_cfg, data, dp, canaries[SERVER], drill,
                                            p.server.clip_norm)}
    return _train_observed(run_cfg, data, dp, canaries, drill, p.max_grad_norm)


def audit_dp(
    cfg: PipelineConfig, data: list[ClientData], *, drill: str | None = None,
    progress: Progress | None = None,
) -> DPAuditResult:
    """Audit the DP implementation of the recipe ``cfg`` over the clients ``data``:
    patient-level DP-SGD (``audit_dp.level=patient``: canary patients at every client) or
    client-level DP-FedAvg (``client``: one canary client per model coordinate, the real
    clients silenced).

    ``drill`` (a :data:`~fl_core.audit.canary.DRILLS` name) breaks the implementation on
    purpose; the claimed ε stays the recipe's.
    """
    check_auditable(cfg, drill)
    started = time.perf_counter()
    a, claimed = cfg.audit_dp, audited_config(cfg, None)
    run_cfg = audited_config(cfg, drill)
    # σ calibrated once for every audit run (a drill changes the clipping bound, never σ)
    dp = make_dpsgd(cfg=run_cfg, data=data)
    claim = _claim(claimed, dp)
    n = sum(p.numel() for p in build_target_model(cfg, int(data[0].x_train.shape[1]))[0]
            .parameters())
    count = min(a.canaries_per_client or n, n)
    units = _units(claimed, data)
    generator = torch.Generator().manual_seed(cfg.seed)
    raw, regenerated, included = [], [], []
    for run in range(a.runs):
        canaries = {key: draw_canaries(n, count, generator) for key in units}
        totals = _observe(run_cfg, claimed, data, dp, canaries, drill)
        replay = (_observe(run_cfg, claimed, data, dp,
                           {k: c.left_out() for k, c in canaries.items()}, drill)
                  if a.regenerate else None)
        for key, c in canaries.items():
            raw.append(_scores(c, totals[key], units[key]))
            if replay is not None:
                regenerated.append(_scores(c, totals[key] - replay[key], units[key]))
            included.append(c.included)
        if progress is not None:
            progress(run + 1, a.runs)
    labels = torch.cat(included)
    sets = [("raw", torch.cat(raw))] + ([("regenerated", torch.cat(regenerated))]
                                        if regenerated else [])
    alpha = (1 - a.confidence) / (2 * len(sets))  # Bonferroni over every bound computed
    bounds = [b for name, s in sets for b in _bounds(name, s, labels, claim.delta, alpha)]
    return DPAuditResult(
        level=a.level, epsilon=claim.epsilon, delta=claim.delta,
        epsilon_lower_bound=max(b.epsilon_lower_bound for b in bounds),
        confidence=a.confidence, canaries=int(labels.numel()),
        canaries_included=int(labels.sum()), runs=a.runs, rounds=claimed.rounds,
        training_runs=a.runs * len(sets), seconds=time.perf_counter() - started,
        noise_multiplier=claim.noise_multiplier, steps=claim.steps, bounds=bounds,
        drill=drill, fingerprint=dp_fingerprint(cfg))
