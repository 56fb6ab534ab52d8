"""Where the randomness of a DP mechanism comes from: secret (OS entropy) or reproducible.

A DP guarantee assumes the noise and the sampling are unknown to the adversary. Anything
derived from ``seed`` is known to whoever holds ``params.yaml``: they can regenerate the
noise and subtract it. Two sources, chosen by name from :data:`RANDOMNESS` (config key
``privacy.randomness``):

* ``secure`` (:class:`SecureRandom`, the default, promotable): every draw reads fresh bytes
  from the operating system's CSPRNG (``os.urandom`` → ``getrandom(2)``). Nothing to seed,
  nothing to replay; two runs with the same configuration give different models.
* ``reproducible`` (:class:`SeededRandom`): a Mersenne Twister (``torch.Generator``) seeded
  from ``seed`` and a label per use (client, round, purpose). Same seed, same model. For
  simulation, tests and benchmarks only: a model trained this way is tagged and the promotion
  gate refuses it.

Gaussian noise from :class:`SecureRandom` is Box–Muller over 53-bit uniforms in float64, and,
like Opacus's ``secure_mode`` (Holohan & Braghin 2021, §5.1), each noise value is the sum of
four draws scaled by ½, so that the low-order bits of one floating-point sample do not reveal
the value it was added to. Opacus's own ``secure_mode`` needs ``torchcsprng``, which has no
build for torch 2.x; this module replaces it (``benchmarks/randomness.py`` measures the cost).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from typing import Protocol

import torch

from fl_core.registry import lookup

_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / float(1 << 53)


class RandomSource(Protocol):
    """The randomness a DP mechanism draws: uniforms for sampling, Gaussians for noise."""

    name: str
    secure: bool

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 values uniform on [0, 1)."""
        ...

    def normal(self, shape: torch.Size | tuple[int, ...], std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of independent ``N(0, std²)`` values."""
        ...

    def stream(self, *labels: str | int) -> RandomSource:
        """An independent source for one use (e.g. client, round): reproducible sources
        derive it from their seed and the labels; a secure source has nothing to derive."""
        ...


class SecureRandom:
    """Draws from the OS CSPRNG on every call; keeps no state an adversary could recover."""

    name = "secure"
    secure = True

    def uniform(self, n: int) -> torch.Tensor:
        if n <= 0:
            return torch.zeros(0, dtype=torch.float64)
        words = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
        # the top 53 bits of each 64-bit word: exactly representable in float64, in [0, 1)
        return (words >> 11).bitwise_and((1 << 53) - 1).to(torch.float64) * _INV_2_53

    def _standard_normal(self, n: int) -> torch.Tensor:
        """Box–Muller, both outputs of each pair: ``r·cos(2πu₂)`` and ``r·sin(2πu₂)`` with
        ``r = sqrt(−2 ln(1 − u₁))`` (``1 − u₁ ∈ (0, 1]``: no log 0)."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs).view(2, pairs)
        radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))
        angle = _TWO_PI * u[1]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]

    def normal(self, shape: torch.Size | tuple[int, ...], std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        # four draws, halved: N(0, 1) again, and robust to floating-point attacks (see module)
        z = self._standard_normal(4 * n).view(4, n).sum(0) * 0.5
        return (z * std).to(dtype).view(shape)

    def stream(self, *labels: str | int) -> SecureRandom:
        return self


class SeededRandom:
    """A Mersenne Twister seeded from ``seed`` and labels: the same labels, the same draws."""

    name = "reproducible"
    secure = False

    def __init__(self, seed: int, labels: tuple[str | int, ...] = ()) -> None:
        self.seed = seed
        self.labels = labels
        self._generator = torch.Generator().manual_seed(_derive_seed(seed, labels))

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(max(n, 0), generator=self._generator, dtype=torch.float64)

    def normal(self, shape: torch.Size | tuple[int, ...], std: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=self._generator, dtype=dtype)

    def stream(self, *labels: str | int) -> SeededRandom:
        return SeededRandom(self.seed, (*self.labels, *labels))


def _derive_seed(seed: int, labels: tuple[str | int, ...]) -> int:
    # stable across processes (unlike hash()); distinct labels give unrelated seeds
    text = "\x1f".join([str(seed), *map(str, labels)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


RANDOMNESS: dict[str, Callable[[int], RandomSource]] = {
    "secure": lambda seed: SecureRandom(),
    "reproducible": SeededRandom,
}


def make_random(kind: str, seed: int) -> RandomSource:
    """The source registered as ``kind`` (``seed`` is ignored by ``secure``)."""
    return lookup(RANDOMNESS, kind, "privacy.randomness")(seed)
