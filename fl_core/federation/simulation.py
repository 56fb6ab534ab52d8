"""Simulation mode: every site in this process, reached through the in-process transport."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fl_core.engine import FederationSettings, TrainingResult, run_federated
from fl_core.federation.site import SiteClient
from fl_core.federation.transport import InProcessTransport


def simulate(
    sites: Sequence[SiteClient], *, initial_params: torch.Tensor,
    settings: FederationSettings, **engine_options: Any,
) -> TrainingResult:
    """Run :func:`fl_core.engine.run_federated` over ``sites`` with an
    :class:`InProcessTransport` (requests and replies still cross as bytes); the transport's
    threads are released afterwards. ``engine_options`` go to ``run_federated``."""
    transport = InProcessTransport({site.client_id: site.handle for site in sites})
    try:
        return run_federated(transport=transport, sites=[s.client_id for s in sites],
                             initial_params=initial_params, settings=settings,
                             **engine_options)
    finally:
        transport.close()
