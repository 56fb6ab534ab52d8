"""Differential privacy with the *patient* as the privacy unit: DP-SGD through Opacus, and
client-level DP-FedAvg on the server.

**Patient-level DP-SGD (client side).** A client's training data is a tensor of patients,
``x: [patients, records, features]`` with ``mask: [patients, records]`` marking real records
(:func:`group_records`). One DP-SGD step (Abadi et al. 2016) on the patients ``B`` drawn by
Poisson sampling at rate ``q`` is

    g_i = ∇ ℓ_i(θ)                       ℓ_i = mean over patient i's records of the loss
    θ ← θ − η / (q·N) · ( Σ_{i∈B} g_i · min(1, C / ‖g_i‖) + N(0, σ²C² I) )

so each patient, whatever their number of records, moves the sum by at most ``C``
(``max_grad_norm``) and the Gaussian mechanism with noise multiplier ``σ`` covers them.
Opacus computes ``g_i`` (a ``Linear`` layer sums per-sample gradients over the records
dimension), clips, adds noise and accounts: :class:`PatientDPTrainer` wires Opacus's
``GradSampleModule``, ``DPOptimizer`` and an accountant (``prv`` or ``rdp``) to our own
Poisson sampler over the patient tensor; sampling and noise come from a
:class:`~fl_core.privacy.randomness.RandomSource` (secret OS entropy unless the run is declared
reproducible).

**The guarantee.** Unit: the patient (all their records). Neighbouring relation: add or remove
one patient's records from one site's training set. Covered: every model update a site sends
and everything computed from them (the global models, the released model). Under the
replace-one relation the same run is (ε', δ)-DP with ε' from :func:`replace_one_epsilon`.

**Budgeting.** The user sets ``(ε, δ)`` for the whole run. A client takes
``rounds × local_epochs × ⌈1/q⌉`` steps, so :func:`calibrate_noise` finds the smallest ``σ``
whose composition over all of them stays within ``ε`` (Opacus ``get_noise_multiplier``);
:func:`epsilon_spent` recomputes ``ε`` from ``(σ, q, steps)`` alone. Patients live at exactly
one client, so by parallel composition the model is ``(max over clients of ε_c, δ)``-DP with
respect to any one patient.

**Client-level DP-FedAvg (server side, McMahan et al. 2018).** Each client's update is clipped
to ``S``, the clipped updates are summed and ``N(0, σ²S²)`` is added before dividing by the
expected number of clients (:class:`~fl_core.privacy.dp_fedavg.DPFedAvg`, a wrapper around the
server's aggregation strategy); accounting composes one Gaussian mechanism per
round at the client sampling rate (:func:`epsilon_spent` again).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
from torch import nn

from fl_core.privacy.accountants import (
    PrivacyError,
    _accountant,
    epsilon_for_history,
    steps_per_epoch,
)
from fl_core.privacy.randomness import RandomSource
from fl_core.registry import lookup

GRAD_SAMPLE_MODES: dict[str, str] = {
    "hooks": "per-layer backward hooks (Opacus's GradSampleModule, the default)",
    "functorch": "torch.func per-sample gradients (any layer, more memory)",
}
"""``privacy.grad_sample_mode`` → what computes the per-patient gradients ``g_i``; the names
are Opacus's ``grad_sample_mode`` values."""


# --- the patient as the sample -----------------------------------------------------------


@dataclass(frozen=True)
class PatientTensors:
    """A client's training set grouped by patient.

    ``x``: ``[patients, records, features]``; ``y`` and ``mask``: ``[patients, records]``,
    ``mask`` 1 for a real record and 0 for padding.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor

    @property
    def num_patients(self) -> int:
        return int(self.x.shape[0])


def group_records(
    x: torch.Tensor, y: torch.Tensor, patient_ids: torch.Tensor
) -> PatientTensors:
    """Group record rows ``x: [records, features]`` by ``patient_ids`` into padded patients.

    Patients come in ascending id order; records keep their order within a patient.
    """
    if not (x.shape[0] == y.shape[0] == patient_ids.shape[0]):
        raise ValueError(f"x, y and patient_ids disagree on the number of records "
                         f"({x.shape[0]}, {y.shape[0]}, {patient_ids.shape[0]})")
    unique, row = torch.unique(patient_ids, sorted=True, return_inverse=True)
    counts = torch.bincount(row, minlength=unique.numel())
    # position of each record within its patient: its rank among that patient's records
    by_row = torch.argsort(row, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(row)
    position[by_row] = torch.arange(row.numel()) - starts[row[by_row]]
    n, r = unique.numel(), int(counts.max()) if counts.numel() else 0
    gx = torch.zeros(n, r, x.shape[1], dtype=x.dtype)
    gy = torch.zeros(n, r, dtype=y.dtype)
    mask = torch.zeros(n, r)
    gx[row, position] = x
    gy[row, position] = y
    mask[row, position] = 1.0
    return PatientTensors(gx, gy, mask)


def patient_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over patients of each patient's mean binary cross-entropy over their records.

    Padding records (``mask == 0``) contribute nothing; an empty batch gives a zero loss that
    still carries the graph, so a DP step on it adds noise only.
    """
    per_record = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    per_patient = (per_record * mask).sum(1) / mask.sum(1).clamp(min=1)
    if per_patient.numel() == 0:
        return logits.sum() * 0.0
    return per_patient.mean()


def check_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A model Opacus accepts: ``ModuleValidator.fix`` where it can (e.g. BatchNorm →
    GroupNorm); returns the model and what was changed, raises :class:`PrivacyError` if the
    model cannot be made private."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model, []
    fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise PrivacyError(
            f"model {type(model).__name__} cannot be trained with DP-SGD: "
            + "; ".join(str(e) for e in remaining)
        )
    return fixed, [str(e) for e in errors]


# --- client-side DP-SGD ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """One client's DP-SGD recipe; ``noise_multiplier`` comes from :func:`calibrate_noise`,
    the rest from ``privacy.*`` (:func:`fl_core.federation.wiring.dp_recipe`; the config
    model holds the defaults, this record none)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    learning_rate: float
    delta: float
    accountant: str
    grad_sample_mode: str
    reference_batch: int | None = None  # None: every site steps learning_rate

    def step_size(self, patients: int) -> float:
        """The step size of a site with ``patients``: ``learning_rate × max(1, B / B_ref)``,
        ``B = sample_rate × patients``, ``B_ref`` = ``reference_batch``.

        DP-SGD adds noise of std σC/B to the batch's mean clipped gradient, so a large site's
        steps are precise and a small site's are not: one step size is either too timid for
        the first (a 5,000-patient site of a weak-signal table barely moved at 0.5) or too
        bold for the second (a 200-patient site at 2). Scaling the step with the batch above a
        reference (the linear scaling rule) keeps each site's step noise at what a reference
        batch has. Post-processing of the noisy gradients: no effect on ε."""
        batch = self.sample_rate * patients
        if self.reference_batch is None or batch <= self.reference_batch:
            return self.learning_rate
        return self.learning_rate * batch / self.reference_batch


class Sampler(Protocol):
    """Draws one DP-SGD step's batch: a boolean mask over a population."""

    def draw(self, population: int, random: RandomSource) -> torch.Tensor: ...


@dataclass(frozen=True)
class PoissonSampler:
    """Poisson sampling at rate ``q``, the sampling the accountant's amplification assumes.

    Each step draws one uniform ``u_i`` per member of the population from the run's random
    source and takes member ``i`` iff ``u_i < q``: every member is in the step's batch with
    probability ``q``, independently of every other member and of every other step (the
    uniforms are independent), so the batch size is ``Binomial(N, q)`` and its expectation
    ``q·N`` is what the optimizer divides by. It is the only sampler a
    :class:`PatientDPTrainer` is built with; the white-box DP audit's canaries are members of
    the population it samples (:class:`PerPatientHook`), so a bug here is a bug the audit
    sees.
    """

    rate: float

    def draw(self, population: int, random: RandomSource) -> torch.Tensor:
        """One step's batch: ``population`` booleans, each true with probability ``rate``."""
        return random.uniform(population) < self.rate


class PerPatientHook(Protocol):
    """Adds ``extra_patients`` members to the population the trainer's sampler draws from and
    rewrites one step's per-patient gradients (one ``[patients, *p.shape]`` tensor per
    parameter) before they are clipped, noised and summed, given which of its own members the
    step's draw took (``drawn``: ``extra_patients`` booleans). Only the white-box DP audit sets
    one (:mod:`fl_core.audit.canary`: gradient canaries); a released model's run never has
    one."""

    @property
    def extra_patients(self) -> int: ...

    def __call__(self, per_patient: list[torch.Tensor],
                 drawn: torch.Tensor) -> list[torch.Tensor]: ...


class PatientDPTrainer:
    """DP-SGD over one client's patients with Opacus; keeps that client's privacy accountant.

    Built once per client and reused every round (wrapping a model is the expensive part).
    ``model`` is trained in place: Opacus hooks it, the parameters stay the caller's.
    ``per_patient_hook`` (None outside a DP audit run) sees each step's per-patient
    gradients before clipping (:class:`PerPatientHook`). ``sampler`` draws every step's batch
    (:class:`PoissonSampler` at ``cfg.sample_rate``; only a DP audit drill swaps it for a
    broken one, to show that the audit catches a broken sampler).
    """

    per_patient_hook: PerPatientHook | None = None

    def __init__(self, *, model: nn.Module, data: PatientTensors, cfg: DPSGDConfig) -> None:
        from opacus.grad_sample.utils import prepare_module
        from opacus.optimizers import get_optimizer_class

        try:
            lookup(GRAD_SAMPLE_MODES, cfg.grad_sample_mode, "privacy.grad_sample_mode")
        except ValueError as exc:
            raise PrivacyError(str(exc)) from None
        self.cfg = cfg
        self.data = data
        self.sampler: Sampler = PoissonSampler(cfg.sample_rate)
        self._module = prepare_module(model, cfg.grad_sample_mode, batch_first=True,
                                      loss_reduction="mean")
        optimizer_class = _noise_from_source(
            get_optimizer_class("flat", False, cfg.grad_sample_mode))
        self._optimizer = optimizer_class(
            torch.optim.SGD(model.parameters(), lr=cfg.step_size(data.num_patients)),
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=max(1, round(cfg.sample_rate * data.num_patients)),
            loss_reduction="mean",
        )
        self._accountant = _accountant(cfg.accountant)
        self._optimizer.attach_step_hook(
            self._accountant.get_optimizer_hook_fn(sample_rate=cfg.sample_rate))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self._accountant.history)

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's ``(σ, q, steps)`` history: what a resumed site must restore."""
        return [tuple(h) for h in self._accountant.history]  # type: ignore[misc]

    def load_history(self, history: list[tuple[float, float, int]]) -> None:
        self._accountant.history = [tuple(h) for h in history]

    def epsilon(self) -> float:
        """ε spent by this client so far, from its own accountant's history (∞ once a
        noiseless step was taken: σ = 0 is no privacy at all)."""
        if self.cfg.noise_multiplier == 0 and self.steps:
            return math.inf
        return epsilon_for_history(tuple(self._accountant.history), self.cfg.delta,
                                   self.cfg.accountant)

    def train(self, epochs: int, random: RandomSource) -> float:
        """``epochs × ⌈1/q⌉`` DP-SGD steps; returns the mean patient loss over the steps.

        ``random`` draws both the Poisson sampling and the noise: a
        :class:`~fl_core.privacy.randomness.SecureRandom` for a model that may be released, a
        :class:`~fl_core.privacy.randomness.SeededRandom` for reproducible simulation.
        """
        self._optimizer.noise_source = random
        d, hook = self.data, self.per_patient_hook
        # the hook's members (the audit's canaries) are sampled with the patients, by one draw
        population = d.num_patients + (0 if hook is None else hook.extra_patients)
        self._module.train()
        total, count = 0.0, 0
        with warnings.catch_warnings():
            # Opacus hooks the layers; with inputs that need no gradient torch warns every step
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs * steps_per_epoch(self.cfg.sample_rate)):
                drawn = self.sampler.draw(population, random)
                batch = torch.nonzero(drawn[:d.num_patients])[:, 0]
                self._optimizer.zero_grad(set_to_none=True)
                loss = patient_loss(self._module(d.x[batch]), d.y[batch], d.mask[batch])
                loss.backward()
                if hook is not None:
                    self._rewrite_per_patient(hook, drawn[d.num_patients:])
                self._optimizer.step()
                total += float(loss.detach()) * batch.numel()
                count += batch.numel()
        return total / max(count, 1)

    def _rewrite_per_patient(self, hook: PerPatientHook, drawn: torch.Tensor) -> None:
        params = self._optimizer.params
        rows = hook([p.grad_sample for p in params], drawn)
        for p, r in zip(params, rows, strict=True):
            p.grad_sample = r


# --- the noise source inside Opacus ----------------------------------------------------------


@lru_cache(maxsize=8)
def _noise_from_source(optimizer_class: type) -> type:
    """``optimizer_class`` (an Opacus ``DPOptimizer``) drawing its Gaussian noise from
    ``self.noise_source`` (a :class:`~fl_core.privacy.randomness.RandomSource`) instead of a
    ``torch.Generator``: the same ``p.grad = Σ clipped + N(0, σ²C²)``, with the noise secret
    when the source is."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class SourcedNoise(optimizer_class):  # type: ignore[misc, valid-type]
        noise_source: RandomSource | None = None

        def add_noise(self) -> None:
            if self.noise_source is None:
                raise RuntimeError("DP-SGD step without a noise source")
            std = self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = self.noise_source.normal(p.summed_grad.shape, std, p.summed_grad.dtype)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    SourcedNoise.__name__ = f"SourcedNoise{optimizer_class.__name__}"
    return SourcedNoise
