"""Gradient canaries: patients whose clipped gradient the auditor knows, and broken-DP drills.

A canary ``c`` of a client is a patient with :data:`RECORDS_PER_CANARY` records, each with the
gradient ``s_c · A · e_{j_c}`` (a Dirac on the flat model coordinate ``j_c``, sign ``s_c``,
norm ``A = CANARY_NORM_FACTOR · C``). Whether it is in the client's training set is an
independent fair coin, known only to the auditor. :class:`CanaryInjection` is a
:data:`~fl_core.privacy.dpsgd.PerPatientHook`: at every DP-SGD step it appends one per-patient
gradient row per included canary that the step's Poisson sampling (rate ``q``, the run's own
random source) draws, and zeroes the real patients' rows, before Opacus clips (to ``C``),
sums and noises. The real patients stay in the batch (the expected batch size and σ are the
run's) but contribute nothing: in a model of a few dozen coordinates their gradients would
move every canary coordinate by a data-dependent drift and hide the canaries; removing them
cannot make the mechanism more private, since DP holds for every neighbouring pair.

A correct implementation clips each canary to ``C`` (``A > C``), so one step moves its
coordinate by ``−η·s_c·C/B`` plus noise ``N(0, (ησC/B)²)``. A :class:`Drill` breaks one part
of the implementation without telling the accountant (the accountant still records σ):
the noise source's draws scaled, clipping lifted, records clipped one by one, or noise drawn
from the configuration's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
    per-record-clipping drill). The step draws one uniform per canary whether included or
    not, so a replay with every canary left out consumes the random source identically.
    """

    canaries: CanarySet
    shapes: tuple[torch.Size, ...]
    clip_norm: float
    sample_rate: float
    per_record: bool = False

    def __call__(self, per_patient: list[torch.Tensor],
                 random: RandomSource) -> list[torch.Tensor]:
        c = self.canaries
        drawn = random.uniform(int(c.coordinates.numel())) < self.sample_rate
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


@dataclass(frozen=True)
class Drill:
    """A deliberately broken DP implementation the audit must catch."""

    description: str
    noise_factor: float = 1.0  # the noise source's draws, scaled
    clip_factor: float = 1.0  # the clipping bound the optimizer uses, in units of C
    per_record: bool = False  # canary records clipped one by one
    seeded_noise: bool = False  # noise from a generator seeded by the configuration's seed

    def random(self, configured: RandomSource, seed: int) -> RandomSource:
        """The random source the broken implementation draws from."""
        source = SeededRandom(seed) if self.seeded_noise else configured
        factor = self.noise_factor / self.clip_factor  # lifted clipping keeps the noise σ·C
        return source if factor == 1.0 else ScaledNoise(source, factor)


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
}
"""The broken-DP drills (``fedpriv audit-dp --drill NAME``; docs/audits.md)."""
