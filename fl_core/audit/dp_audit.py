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
post-processes: it can lower the separation, never raise it.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fl_core.audit.bounds import empirical_epsilon_lower_bound
from fl_core.audit.canary import DRILLS, CanaryInjection, CanarySet, draw_canaries
from fl_core.audit.gdp import gdp_epsilon, separation_lower_bound
from fl_core.compression import decode_payload
from fl_core.config import ConfigError, PipelineConfig
from fl_core.data import ClientData
from fl_core.federation.build import (
    build_target_model,
    federation_settings,
    make_downlink,
    make_dpsgd,
    simulation_setup,
)
from fl_core.federation.messages import FitReply, decode_message
from fl_core.federation.simulation import simulate
from fl_core.federation.site import SiteClient
from fl_core.privacy import epsilon_spent, local_steps
from fl_core.randomness import make_random

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


def check_auditable(cfg: PipelineConfig) -> None:
    """Refuse a configuration the canary audit does not cover (exit 2 at the CLI)."""
    if not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled=false: nothing to audit (the model is not private)")
    if cfg.attack.kind != "none":
        raise ConfigError("the DP audit runs the honest recipe: set attack.kind=none")
    if cfg.privacy.server.enabled:
        raise ConfigError("the canary audit covers patient-level DP-SGD; client-level "
                          "DP-FedAvg (privacy.server) is not audited yet")


def audited_config(cfg: PipelineConfig, drill: str | None) -> PipelineConfig:
    """The recipe the audit runs: its rounds, and a drill's clipping bound."""
    rounds = cfg.audit_dp.rounds or cfg.rounds
    out = cfg.model_copy(update={"rounds": rounds})
    if drill is not None and DRILLS[drill].clip_factor != 1.0:
        privacy = cfg.privacy.model_copy(
            update={"max_grad_norm": cfg.privacy.max_grad_norm * DRILLS[drill].clip_factor})
        out = out.model_copy(update={"privacy": privacy})
    return out


def _train_observed(cfg: PipelineConfig, data: list[ClientData], canaries: dict[str, CanarySet],
                    drill: str | None, clip_norm: float) -> dict[str, torch.Tensor]:
    """One audit training run; client → the sum of its decoded updates."""
    configured = make_random(cfg.privacy.randomness, cfg.seed)
    random = DRILLS[drill].random(configured, cfg.seed) if drill else configured
    setup = simulation_setup(cfg, data, random=random)
    model, _ = build_target_model(cfg, int(data[0].x_train.shape[1]))
    shapes = tuple(p.shape for p in model.parameters())
    n = int(setup.initial_params.numel())
    per_record = bool(drill and DRILLS[drill].per_record)
    for site in setup.sites:
        trainer = site.dp_trainer
        assert trainer is not None and setup.dp is not None
        trainer.per_patient_hook = CanaryInjection(
            canaries[site.client_id], shapes, clip_norm, setup.dp.sample_rate, per_record)
    observed = [_Observed(site, n) for site in setup.sites]
    simulate(observed, initial_params=setup.initial_params, settings=federation_settings(cfg),
             downlink=make_downlink(cfg), defense=setup.defense, seed=cfg.seed,
             randomness=setup.random)
    return {o.client_id: o.total for o in observed}


def _scores(canaries: CanarySet, total: torch.Tensor, step_size: float) -> torch.Tensor:
    """``z_c`` in units of one step's clipped canary (``step_size = η·C/B`` of the client, B
    its expected batch): clients of different sizes give scores on one scale."""
    return -canaries.signs.double() * total[canaries.coordinates] / step_size


def _bounds(name: str, scores: torch.Tensor, included: torch.Tensor, delta: float,
            alpha: float) -> list[ScoreBound]:
    mu_hat, mu_lower = separation_lower_bound(scores[included], scores[~included], alpha)
    counting = empirical_epsilon_lower_bound(scores, included, delta, confidence=1 - alpha)
    return [ScoreBound(name, "gaussian", gdp_epsilon(mu_lower, delta), mu_hat, mu_lower),
            ScoreBound(name, "counting", counting)]


def audit_dp(
    cfg: PipelineConfig, data: list[ClientData], *, drill: str | None = None,
    progress: Progress | None = None,
) -> DPAuditResult:
    """Audit the DP-SGD implementation on the recipe ``cfg`` over the clients ``data``.

    ``drill`` (a :data:`~fl_core.audit.canary.DRILLS` name) breaks the implementation on
    purpose; the claimed ε stays the recipe's.
    """
    check_auditable(cfg)
    if drill is not None and drill not in DRILLS:
        raise ConfigError(f"unknown drill {drill!r}; drills: {', '.join(DRILLS)}")
    started = time.perf_counter()
    a, claimed = cfg.audit_dp, audited_config(cfg, None)
    run_cfg = audited_config(cfg, drill)
    dp = make_dpsgd(claimed, data)  # the recipe as claimed (a drill does not change it)
    assert dp is not None
    steps = local_steps(claimed.rounds, claimed.local_epochs, dp.sample_rate)
    epsilon = epsilon_spent(dp.noise_multiplier, dp.sample_rate, steps, dp.delta, dp.accountant)
    n = sum(p.numel() for p in build_target_model(cfg, int(data[0].x_train.shape[1]))[0]
            .parameters())
    per_client = a.canaries_per_client or n
    generator = torch.Generator().manual_seed(cfg.seed)
    raw, regenerated, included = [], [], []
    step_size = {d.client_id: dp.learning_rate * dp.max_grad_norm
                 / max(1, round(dp.sample_rate * int(d.patient_ids().unique().numel())))
                 for d in data}
    for run in range(a.runs):
        canaries = {d.client_id: draw_canaries(n, min(per_client, n), generator) for d in data}
        totals = _train_observed(run_cfg, data, canaries, drill, cfg.privacy.max_grad_norm)
        replay = (_train_observed(run_cfg, data, {k: c.left_out() for k, c in canaries.items()},
                                  drill, cfg.privacy.max_grad_norm) if a.regenerate else None)
        for client, c in canaries.items():
            raw.append(_scores(c, totals[client], step_size[client]))
            if replay is not None:
                regenerated.append(_scores(c, totals[client] - replay[client],
                                           step_size[client]))
            included.append(c.included)
        if progress is not None:
            progress(run + 1, a.runs)
    labels = torch.cat(included)
    sets = [("raw", torch.cat(raw))] + ([("regenerated", torch.cat(regenerated))]
                                        if regenerated else [])
    alpha = (1 - a.confidence) / (2 * len(sets))  # Bonferroni over every bound computed
    bounds = [b for name, s in sets for b in _bounds(name, s, labels, dp.delta, alpha)]
    return DPAuditResult(
        epsilon=epsilon, delta=dp.delta,
        epsilon_lower_bound=max(b.epsilon_lower_bound for b in bounds),
        confidence=a.confidence, canaries=int(labels.numel()),
        canaries_included=int(labels.sum()), runs=a.runs, rounds=claimed.rounds,
        training_runs=a.runs * len(sets), seconds=time.perf_counter() - started,
        noise_multiplier=dp.noise_multiplier, steps=steps, bounds=bounds, drill=drill,
        fingerprint=dp_fingerprint(cfg))
