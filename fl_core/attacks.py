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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ATTACKS = ("none", "sign_flip", "gaussian", "scaling", "label_flip", "alie", "ipm")
DATA_POISONING = ("label_flip", "scaling")


@dataclass(frozen=True)
class Attack:
    kind: str = "none"
    malicious: frozenset[str] = frozenset()
    scale: float = 4.0
    noise_std: float = 1.0
    ipm_epsilon: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; accepted: {', '.join(ATTACKS)}")

    @property
    def flips_labels(self) -> bool:
        return self.kind in DATA_POISONING

    def craft(self, updates: torch.Tensor, malicious_rows: list[int],
              generator: torch.Generator) -> torch.Tensor:
        """``updates`` with the malicious rows replaced; honest rows are never changed."""
        if self.kind in ("none", "label_flip") or not malicious_rows:
            return updates
        n, d = updates.shape
        bad = torch.zeros(n, dtype=torch.bool)
        bad[malicious_rows] = True
        honest = updates[~bad]
        out = updates.clone()
        if self.kind == "sign_flip":
            out[bad] = -self.scale * updates[bad]
        elif self.kind == "scaling":
            out[bad] = self.scale * updates[bad]
        elif self.kind == "gaussian":
            out[bad] = self.noise_std * torch.randn(int(bad.sum()), d, generator=generator)
        elif honest.shape[0] == 0:
            return out
        elif self.kind == "alie":
            out[bad] = alie_update(honest, n, len(malicious_rows))
        elif self.kind == "ipm":
            out[bad] = -self.ipm_epsilon * honest.mean(0)
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
