"""Torch models for binary classification on tabular features. They output one logit.

Models are chosen by name (config key ``model``) from :data:`MODELS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fl_core.registry import lookup


class LogisticRegression(nn.Module):
    """``logit = w·x + b``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """One hidden ReLU layer: ``logit = w2·relu(W1 x + b1) + b2``. No BatchNorm (DP-SGD safe)."""

    def __init__(self, num_features: int, hidden_units: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "logreg": lambda num_features, hidden_units: LogisticRegression(num_features),
    "mlp": MLP,
}
"""``model`` → ``factory(num_features, hidden_units)`` (``logreg`` has no hidden layer)."""


def build_model(kind: str, num_features: int, *, hidden_units: int, seed: int = 0) -> nn.Module:
    """A freshly initialised model; the same ``seed`` gives the same weights. ``hidden_units``
    (the configuration's, whose default is the config model's) only shapes ``mlp``."""
    factory = lookup(MODELS, kind, "model")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory(num_features, hidden_units)
    finally:
        torch.random.set_rng_state(generator_state)


def get_flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached float32 vector, in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float32)


def set_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a vector produced by :func:`get_flat_params` back into ``model``."""
    expected = sum(p.numel() for p in model.parameters())
    if flat.numel() != expected:
        raise ValueError(f"parameter vector has {flat.numel()} elements, model needs {expected}")
    # copy, never alias: vector_to_parameters would make the parameters views of ``flat``,
    # so training would silently modify the caller's vector too
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
