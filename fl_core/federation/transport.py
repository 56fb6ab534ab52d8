"""How the coordinator reaches the sites: one round's requests out, replies back by a deadline.

The round engine talks to sites only through a :class:`Transport` and never imports an
implementation: it hands over one encoded request per site and gets, per site, whatever came
back (bytes it then decodes and checks itself, with :func:`~fl_core.federation.decode_message`)
or a :class:`TransportFailure` saying why nothing usable came (missed the deadline, raised,
unknown site). :class:`InProcessTransport` serves simulation, tests and benchmarks: every site
runs concurrently in a thread pool of the coordinator's process, and its requests and replies
still cross as bytes, so the simulation exercises the same encoding a remote site uses.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

SiteHandler = Callable[[bytes], object]  # a site's boundary: request bytes → reply (bytes)


@dataclass(frozen=True)
class TransportFailure:
    """No usable reply from a site this round, and why."""

    reason: str


class Transport(Protocol):
    def exchange(
        self, requests: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, object | TransportFailure]:
        """Send each site its request, concurrently; return what each answered by
        ``deadline_s`` seconds, or a :class:`TransportFailure`."""
        ...


class InProcessTransport:
    """Sites as handlers in this process, each request on its own worker thread.

    A site that misses the deadline is failed for the round; its thread cannot be stopped,
    and the site (:class:`~fl_core.federation.site_client.SiteClient`) refuses further requests
    ("busy") until it has finished.
    """

    def __init__(self, handlers: Mapping[str, SiteHandler]) -> None:
        self._handlers = dict(handlers)
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, len(self._handlers)),
                                           thread_name_prefix="fedpriv-site")

    @property
    def sites(self) -> list[str]:
        return list(self._handlers)

    def exchange(
        self, requests: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, object | TransportFailure]:
        futures: dict[str, cf.Future[object]] = {}
        out: dict[str, object | TransportFailure] = {}
        for site, request in requests.items():
            handler = self._handlers.get(site)
            if handler is None:
                out[site] = TransportFailure("no such site on this transport")
                continue
            futures[site] = self._pool.submit(handler, request)
        cf.wait(futures.values(), timeout=deadline_s)
        for site, future in futures.items():
            if not future.done():
                out[site] = TransportFailure(
                    f"missed the round deadline of {deadline_s:g} s")
            elif (error := future.exception()) is not None:
                out[site] = TransportFailure(f"{type(error).__name__}: {error}")
            else:  # an in-process thread's return value: nothing is deserialised here
                out[site] = future.result()
        return {site: out[site] for site in requests}  # in request order

    def close(self) -> None:
        """Stop accepting work; stragglers finish in the background."""
        self._pool.shutdown(wait=False, cancel_futures=True)
