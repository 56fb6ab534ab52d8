"""Byzantine clients, simulated: what a compromised hospital can send, to test the defenses.

Data poisoning happens at the client (``label_flip``, and ``scaling`` which also boosts);
model poisoning replaces a malicious client's update after the honest updates of the round are
known, so the omniscient attacks (ALIE, IPM) see exactly what the defense will see.

=============  ===================================================================
``sign_flip``  ``u = −s·u_own``
``gaussian``   ``u ~ N(0, σ² I)``
``scaling``    model replacement: train on flipped labels, send ``s·u_own``
``label_flip`` train on flipped labels (``y → 1 − y``), send the update as is
``alie``       "A Little Is Enough" (Baruch et al. 2019): ``u = μ − z·σ`` coordinate-wise over
               the honest updates, ``z = Φ⁻¹((n − s)/n)``, ``s = ⌊n/2 + 1⌋ − f``
``ipm``        inner-product manipulation (Xie et al. 2020): ``u = −ε·μ``
=============  ===================================================================

The kinds are registered in :data:`ATTACKS` (``attack.kind``); ``none`` sends every update
as trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fl_core.registry import lookup

Craft = Callable[["Attack", torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``craft(attack, updates, bad, generator)``: the rows the malicious clients (boolean mask
``bad`` over the ``[n, d]`` round) send instead, ``[n_bad, d]`` or one ``[d]`` row for all."""


@dataclass(frozen=True)
class AttackKind:
    """A registered attack: what it does to a malicious client's update (``craft``; ``None``
    leaves the update as trained) and whether the client trains on flipped labels."""

    craft: Craft | None = None
    flips_labels: bool = False


def _sign_flip(a: Attack, updates: torch.Tensor, bad: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    return -a.scale * updates[bad]


def _scaling(a: Attack, updates: torch.Tensor, bad: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
    return a.scale * updates[bad]


def _gaussian(a: Attack, updates: torch.Tensor, bad: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
    return a.noise_std * torch.randn(int(bad.sum()), updates.shape[1], generator=generator)


def _alie(a: Attack, updates: torch.Tensor, bad: torch.Tensor,
          generator: torch.Generator) -> torch.Tensor:
    honest = updates[~bad]
    if honest.shape[0] == 0:  # nothing to hide among: send as trained
        return updates[bad]
    return alie_update(honest, updates.shape[0], int(bad.sum()))


def _ipm(a: Attack, updates: torch.Tensor, bad: torch.Tensor,
         generator: torch.Generator) -> torch.Tensor:
    honest = updates[~bad]
    if honest.shape[0] == 0:
        return updates[bad]
    return -a.ipm_epsilon * honest.mean(0)


ATTACKS: dict[str, AttackKind] = {
    "none": AttackKind(),
    "sign_flip": AttackKind(_sign_flip),
    "gaussian": AttackKind(_gaussian),
    "scaling": AttackKind(_scaling, flips_labels=True),
    "label_flip": AttackKind(flips_labels=True),
    "alie": AttackKind(_alie),
    "ipm": AttackKind(_ipm),
}
"""``attack.kind`` → what a malicious client does (the table above)."""


@dataclass(frozen=True, kw_only=True)
class Attack:
    """A simulated attack as ``attack.*`` configures it (:func:`fl_core.federation.wiring.
    make_attack`; the defaults are the config model's): which clients are malicious and the
    crafting parameters of the kinds that use them."""

    kind: str
    malicious: frozenset[str]
    scale: float
    noise_std: float
    ipm_epsilon: float

    def __post_init__(self) -> None:
        lookup(ATTACKS, self.kind, "attack.kind")

    @property
    def flips_labels(self) -> bool:
        return ATTACKS[self.kind].flips_labels

    def craft(self, updates: torch.Tensor, malicious_rows: list[int],
              generator: torch.Generator) -> torch.Tensor:
        """``updates`` with the malicious rows replaced; honest rows are never changed."""
        craft = ATTACKS[self.kind].craft
        if craft is None or not malicious_rows:
            return updates
        bad = torch.zeros(updates.shape[0], dtype=torch.bool)
        bad[malicious_rows] = True
        out = updates.clone()
        out[bad] = craft(self, updates, bad, generator)
        return out


def alie_z(n: int, f: int) -> float:
    """The largest z for which the crafted update still looks like one of the majority."""
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p)))


def alie_update(honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
    std = honest.std(0, unbiased=False) if honest.shape[0] > 1 else torch.zeros(honest.shape[1])
    return honest.mean(0) - alie_z(n, f) * std


def choose_malicious(client_ids: list[str], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction·n)`` clients, chosen once per run by ``seed``."""
    count = round(fraction * len(client_ids))
    order = torch.randperm(len(client_ids), generator=torch.Generator().manual_seed(seed))
    return frozenset(client_ids[i] for i in order[:count].tolist())
