"""Gradient canaries: patients whose clipped gradient the auditor knows, and broken-DP drills.

A canary ``c`` of a client is a patient with :data:`RECORDS_PER_CANARY` records, each with the
gradient ``s_c · A · e_{j_c}`` (a Dirac on the flat model coordinate ``j_c``, sign ``s_c``,
norm ``A = CANARY_NORM_FACTOR · C``). Whether it is in the client's training set is an
independent fair coin, known only to the auditor. :class:`CanaryInjection` is a
:class:`~fl_core.privacy.dpsgd.PerPatientHook`: it adds one member per canary to the population
the client's trainer samples, so **the production sampler draws the canaries**: at every
DP-SGD step :class:`~fl_core.privacy.dpsgd.PatientDPTrainer` makes one call to its
:class:`~fl_core.privacy.dpsgd.PoissonSampler` over ``N + m`` members (``N`` real patients,
then the ``m`` canaries) and hands the hook the canaries' part of that one draw. With the
production sampler every canary is therefore drawn with probability ``q`` per step,
independently of the other canaries, of the real patients and of the other steps, exactly as
a real patient is; the hook appends one per-patient gradient row per *included* canary that
the draw took, and zeroes the real patients' rows, before Opacus clips (to ``C``), sums and
noises. An included canary that is drawn in ``K ~ Binomial(T, q)`` of ``T`` steps moves its
coordinate by ``K`` clipped gradients; a sampler that draws it more often than ``q`` moves
it more than the accountant's amplification by subsampling allows, and the audit sees it.
The real patients stay in the batch (the expected batch size and σ are the run's) but
contribute nothing: in a model of a few dozen coordinates their gradients would
move every canary coordinate by a data-dependent drift and hide the canaries; removing them
cannot make the mechanism more private, since DP holds for every neighbouring pair. A canary
left out of the training set keeps its place in the population (its draws add nothing), so a
replay with every canary left out consumes the random source identically.

A correct implementation clips each canary to ``C`` (``A > C``), so one step moves its
coordinate by ``−η·s_c·C/B`` plus noise ``N(0, (ησC/B)²)``. A :class:`Drill` breaks one part
of the implementation without telling the accountant (the accountant still records σ and
``q``): the noise source's draws scaled, clipping lifted, records clipped one by one, noise
drawn from the configuration's seed, or the trainer's Poisson sampler replaced by a broken
one (a rate ``4·q``, or every patient in every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fl_core.privacy.dpsgd import PoissonSampler, Sampler
from fl_core.privacy.randomness import RandomSource, SeededRandom

CANARY_NORM_FACTOR = 10.0
"""Each canary record's gradient norm, in units of the clipping bound ``C``: clipping must act."""
RECORDS_PER_CANARY = 4
"""Records per canary patient: per-patient clipping bounds all four by ``C``, per-record
clipping lets each through (the multi-record drill)."""


@dataclass(frozen=True)
class CanarySet:
    """One client's canaries in one audit run: coordinate, sign and inclusion of each."""

    coordinates: torch.Tensor  # int64 [m], distinct flat coordinates
    signs: torch.Tensor  # float32 [m], ±1
    included: torch.Tensor  # bool [m]

    def left_out(self) -> CanarySet:
        """The same canaries, none included (the regeneration replay)."""
        return CanarySet(self.coordinates, self.signs, torch.zeros_like(self.included))


def draw_canaries(num_params: int, count: int, generator: torch.Generator) -> CanarySet:
    """``count`` canaries on distinct coordinates, random signs, each included w.p. ½."""
    if not 1 <= count <= num_params:
        raise ValueError(f"canaries per client must be in [1, {num_params}] (one per model "
                         f"coordinate), got {count}")
    coordinates = torch.randperm(num_params, generator=generator)[:count]
    signs = torch.randint(0, 2, (count,), generator=generator).float() * 2 - 1
    included = torch.rand(count, generator=generator) < 0.5
    return CanarySet(coordinates, signs, included)


@dataclass(frozen=True, kw_only=True)
class CanaryInjection:
    """The per-patient hook of one client (see the module docstring).

    ``shapes`` are the model's parameter shapes in flat order; ``clip_norm`` the recipe's
    ``C``; ``per_record`` feeds each canary record to clipping as its own row (the
    per-record-clipping drill). Every canary, included or not, is a member of the sampled
    population (:attr:`extra_patients`); which ones a step took is the trainer's sampler's
    decision, never the hook's.
    """

    canaries: CanarySet
    shapes: tuple[torch.Size, ...]
    clip_norm: float
    per_record: bool = False

    @property
    def extra_patients(self) -> int:
        """One sampled member per canary."""
        return int(self.canaries.coordinates.numel())

    def __call__(self, per_patient: list[torch.Tensor],
                 drawn: torch.Tensor) -> list[torch.Tensor]:
        c = self.canaries
        rows = torch.nonzero(drawn & c.included)[:, 0]
        record = CANARY_NORM_FACTOR * self.clip_norm
        repeat = RECORDS_PER_CANARY if self.per_record else 1
        value = record * (1 if self.per_record else RECORDS_PER_CANARY)
        flat = torch.zeros(rows.numel() * repeat, sum(math.prod(s) for s in self.shapes))
        which = rows.repeat_interleave(repeat)
        flat[torch.arange(which.numel()), c.coordinates[which]] = c.signs[which] * value
        parts = torch.split(flat, [math.prod(s) for s in self.shapes], dim=1)
        return [torch.cat([torch.zeros_like(g), part.reshape(-1, *shape).to(g.dtype)])
                for g, part, shape in zip(per_patient, parts, self.shapes, strict=True)]


class ScaledNoise:
    """A random source whose Gaussian draws are multiplied by ``factor`` (a drill: the noise
    is not what the accountant counts). Uniform draws (sampling) are untouched."""

    def __init__(self, inner: RandomSource, factor: float) -> None:
        self.inner, self.factor = inner, factor
        self.name, self.secure = inner.name, inner.secure

    def uniform(self, n: int) -> torch.Tensor:
        return self.inner.uniform(n)

    def normal(self, shape: torch.Size | tuple[int, ...], std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.inner.normal(shape, std, dtype) * self.factor

    def stream(self, *labels: str | int) -> ScaledNoise:
        return ScaledNoise(self.inner.stream(*labels), self.factor)


class ScaledRateSampler:
    """A broken Poisson sampler (a drill): it samples at ``factor·q`` (capped at 1) while the
    optimizer and the accountant count ``q`` — e.g. a rate multiplied by the number of sites;
    ``factor = ∞`` takes every patient in every step (the sampler skipped, the data iterated
    in full)."""

    def __init__(self, inner: PoissonSampler, factor: float) -> None:
        self.inner, self.factor = inner, factor

    def draw(self, population: int, random: RandomSource) -> torch.Tensor:
        return PoissonSampler(min(1.0, self.inner.rate * self.factor)).draw(population, random)


@dataclass(frozen=True)
class Drill:
    """A deliberately broken DP implementation the audit must catch."""

    description: str
    noise_factor: float = 1.0  # the noise source's draws, scaled
    clip_factor: float = 1.0  # the clipping bound the optimizer uses, in units of C
    per_record: bool = False  # canary records clipped one by one
    seeded_noise: bool = False  # noise from a generator seeded by the configuration's seed
    sample_factor: float = 1.0  # the trainer's Poisson sampler at sample_factor·q (∞: all)

    @property
    def breaks_sampling(self) -> bool:
        """Whether the drill replaces the trainer's Poisson sampler (patient level, q < 1)."""
        return self.sample_factor != 1.0

    def random(self, configured: RandomSource, seed: int) -> RandomSource:
        """The random source the broken implementation draws from."""
        source = SeededRandom(seed) if self.seeded_noise else configured
        factor = self.noise_factor / self.clip_factor  # lifted clipping keeps the noise σ·C
        return source if factor == 1.0 else ScaledNoise(source, factor)

    def sampler(self, production: PoissonSampler) -> Sampler:
        """The sampler the broken implementation's trainer draws its batches with (the
        production one when the drill leaves sampling alone)."""
        if self.sample_factor != 1.0:
            return ScaledRateSampler(production, self.sample_factor)
        return production


SAMPLING_DRILL_RATE = 0.1
"""The ``privacy.sample_rate`` the sampling drills' tests and docs use: they need ``q < 1``
(at ``q = 1`` every patient is in every step and there is nothing to sample)."""

DRILLS: dict[str, Drill] = {
    "noise_off": Drill("no DP noise added while the accountant counts σ", noise_factor=0.0),
    "noise_down_10x": Drill("noise 10× smaller than the accountant's σ", noise_factor=0.1),
    "clipping_off": Drill("per-patient gradients not clipped (noise still σ·C)",
                          clip_factor=1e6),
    "per_record_clipping": Drill(f"each record clipped to C instead of each patient "
                                 f"({RECORDS_PER_CANARY} records per canary patient)",
                                 per_record=True),
    "regenerable_noise": Drill("noise drawn from a generator seeded by the configuration's "
                               "seed", seeded_noise=True),
    "sampling_rate_4x": Drill("the trainer's Poisson sampler draws each patient with "
                              "probability 4·q while the accountant counts q (needs q < 1)",
                              sample_factor=4.0),
    "sampling_off": Drill("the trainer's Poisson sampler skipped: every patient in every step "
                          "while the accountant counts q (needs q < 1)",
                          sample_factor=math.inf),
}
"""The broken-DP drills (``fedpriv audit-dp --drill NAME``; docs/audits.md)."""
