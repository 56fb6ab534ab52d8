"""Simulation mode: every site in this process, reached through the in-process transport."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from fl_core.federation.coordinator import FederationSettings, TrainingResult, run_federated
from fl_core.federation.transport import InProcessTransport


class SiteEndpoint(Protocol):
    """What the simulation needs of a site: its id and its bytes-in, bytes-out boundary
    (a :class:`~fl_core.federation.site_client.SiteClient`, or a wrapper around one)."""

    client_id: str

    def handle(self, request: bytes) -> bytes: ...


def simulate(
    sites: Sequence[SiteEndpoint], *, initial_params: torch.Tensor,
    settings: FederationSettings, **engine_options: Any,
) -> TrainingResult:
    """Run :func:`fl_core.federation.coordinator.run_federated` over ``sites`` with an
    :class:`InProcessTransport` (requests and replies still cross as bytes); the transport's
    threads are released afterwards. ``engine_options`` go to ``run_federated``."""
    transport = InProcessTransport({site.client_id: site.handle for site in sites})
    try:
        return run_federated(transport=transport, sites=[s.client_id for s in sites],
                             initial_params=initial_params, settings=settings,
                             **engine_options)
    finally:
        transport.close()
