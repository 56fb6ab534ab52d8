"""Input sanitation and anomaly detection, before any aggregation.

:func:`sanitize` rejects updates that no aggregator should ever see (wrong size, NaN/Inf, a
norm absurdly larger than the round's median). :func:`detect_anomalies` flags updates whose
norm or direction is an outlier by a robust z-score, ``z = (x − median) / (1.4826·MAD)``:
a norm with ``z > t``, or a cosine similarity to the coordinate-wise median with ``z < −t``.
:class:`Reputation` remembers flags across rounds: ``r ← λ·r + flagged``; a client with
``r ≥ exclude_at`` is left out of aggregation until its score decays (with λ = 0.8 and
exclude_at = 2, after three flags in a row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fl_core.config.model import AnomalyConfig

_ANOMALY = AnomalyConfig.model_fields  # the defaults' one place: anomaly.*
MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def sanitize(
    updates: list[torch.Tensor], n_params: int, max_norm_factor: float
) -> tuple[list[int], dict[int, str]]:
    """(indices kept, {index: reason rejected}). Never raises on a bad update."""
    reasons: dict[int, str] = {}
    for i, u in enumerate(updates):
        if u.numel() != n_params:
            reasons[i] = f"update has {u.numel()} elements, model has {n_params}"
        elif not bool(torch.isfinite(u).all()):
            reasons[i] = "update has non-finite values"
    finite = [i for i in range(len(updates)) if i not in reasons]
    if len(finite) >= 3 and max_norm_factor > 0:
        norms = torch.linalg.vector_norm(torch.stack([updates[i] for i in finite]), dim=1)
        limit = max_norm_factor * float(norms.median())
        for i, norm in zip(finite, norms.tolist(), strict=True):
            if limit > 0 and norm > limit:
                reasons[i] = (f"update norm {norm:.3g} is over {max_norm_factor:g}× the round's "
                              f"median norm")
    return [i for i in range(len(updates)) if i not in reasons], reasons


def robust_z(values: torch.Tensor) -> torch.Tensor:
    median = values.median()
    mad = (values - median).abs().median()
    # a floor on the spread, so identical honest values do not make every deviation infinite
    spread = MAD_TO_SD * mad + 1e-6 * (median.abs() + 1e-12)
    return (values - median) / spread


@dataclass(frozen=True)
class AnomalyReport:
    flagged: list[int]
    norm_z: torch.Tensor
    cosine_z: torch.Tensor


def detect_anomalies(updates: torch.Tensor,
                     z_threshold: float = _ANOMALY["z_threshold"].default) -> AnomalyReport:
    """Flag rows of ``updates`` ``[n, d]`` whose norm or direction is a robust outlier."""
    n = updates.shape[0]
    if n < 3:
        return AnomalyReport([], torch.zeros(n), torch.zeros(n))
    norms = torch.linalg.vector_norm(updates, dim=1)
    centre = updates.median(dim=0).values
    cosine = (updates @ centre) / (norms * torch.linalg.vector_norm(centre)).clamp_min(1e-12)
    norm_z, cosine_z = robust_z(norms), robust_z(cosine)
    flagged = ((norm_z > z_threshold) | (cosine_z < -z_threshold)).nonzero().flatten()
    return AnomalyReport(flagged.tolist(), norm_z, cosine_z)


@dataclass(kw_only=True)
class Reputation:
    """Per-client score across rounds; excluded while ``score ≥ exclude_at``."""

    decay: float = _ANOMALY["reputation_decay"].default
    exclude_at: float = _ANOMALY["exclude_at"].default
    scores: dict[str, float] = field(default_factory=dict)

    def update(self, client_ids: list[str], flagged: set[str]) -> None:
        for cid in client_ids:
            self.scores[cid] = self.decay * self.scores.get(cid, 0.0) + (cid in flagged)

    def excluded(self, client_id: str) -> bool:
        return self.scores.get(client_id, 0.0) >= self.exclude_at
