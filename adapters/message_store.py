"""The message store of ``federation.mode=sites``: a folder both the coordinator and the sites
reach, holding fedpriv's framed messages (:mod:`fl_core.federation.messages`) as files.

    <store>/<session>/<site>/down/<seq>.msg   coordinator → site (instructions, shutdown)
    <store>/<session>/<site>/up/<seq>.msg     site → coordinator (replies)
    <store>/<session>/<site>/up/ready.msg     site → coordinator, once (:class:`SiteReady`)

Every file is written to a temp name and renamed, so a reader never sees half a message.
Readers take raw bytes (at most :data:`MAX_MESSAGE_BYTES`, checked before reading) and decode
them with fedpriv's own format only: nothing either side writes is unpickled or executed.
:class:`StoreTransport` is the coordinator's :class:`~fl_core.federation.transport.Transport`
over it: one request file per site per exchange, replies polled until the round deadline;
a reply that arrives late (its sequence number is past) is ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from adapters.artifacts import write_text_atomic
from fl_core.config.model import site_slug
from fl_core.federation.transport import TransportFailure

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # far above any model of this project; refuses floods
POLL_S = 0.01
READY = "ready"


class FolderStore:
    """One run's exchange folder: ``<root>/<session>/``."""

    def __init__(self, root: Path, session: str) -> None:
        if not session.isalnum():
            raise ValueError(f"session id {session!r} must be alphanumeric")
        self.path = Path(root) / session
        self.session = session

    def folder(self, site: str, direction: str) -> Path:
        """``down`` (to the site) or ``up`` (from it)."""
        return self.path / (site_slug(site) or "site") / direction

    def _file(self, site: str, direction: str, name: str) -> Path:
        return self.folder(site, direction) / f"{name}.msg"

    def newest(self, site: str, direction: str) -> int:
        """The highest sequence number written in that direction (0: none)."""
        return max((int(p.stem) for p in self.folder(site, direction).glob("*.msg")
                    if p.stem.isdigit()), default=0)

    def put(self, site: str, direction: str, name: str, data: bytes) -> None:
        """Write one message atomically (temp file + rename)."""
        target = self._file(site, direction, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(data)
        tmp.replace(target)

    def get(self, site: str, direction: str, name: str) -> bytes | None:
        """The message's raw bytes, None while it is absent; an oversized file is refused
        (its size is checked before a byte is read)."""
        target = self._file(site, direction, name)
        try:
            size = target.stat().st_size
        except FileNotFoundError:
            return None
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"message {target.name} from {site!r} is {size} bytes, more than "
                             f"{MAX_MESSAGE_BYTES}: refused unread")
        return target.read_bytes()

    def note(self, text: str) -> None:
        """A line for people reading the store (what session this is)."""
        write_text_atomic(self.path / "README.txt", text + "\n")


class StoreTransport:
    """The coordinator's side of the store: each exchange writes ``down/<seq>.msg`` for every
    site asked and waits for ``up/<seq>.msg`` until the deadline. ``alive(site)`` (optional,
    polled about twice a second) lets a site whose session is known to be gone fail at once
    instead of at the deadline."""

    def __init__(self, store: FolderStore, sites: list[str],
                 alive: Callable[[str], str | None] | None = None) -> None:
        self.store = store
        self.sites = list(sites)
        self._seq = 0
        self._alive = alive
        self._missed: dict[str, int] = {}  # site → the request it has not answered in time

    def exchange(
        self, requests: Mapping[str, bytes], deadline_s: float
    ) -> dict[str, object | TransportFailure]:
        self._seq += 1
        name = f"{self._seq:06d}"
        out = self._send(requests, name)
        waiting = [s for s in requests if s not in out]
        end, next_check = time.monotonic() + deadline_s, 0.0
        while waiting and time.monotonic() < end:
            self._collect(waiting, name, out)
            if waiting and self._alive is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                self._drop_gone(waiting, out)
            time.sleep(POLL_S)
        for site in waiting:
            out[site] = TransportFailure(f"missed the round deadline of {deadline_s:g} s")
            self._missed[site] = self._seq
        for site in requests:
            if isinstance(out[site], bytes):
                self._missed.pop(site, None)
        return {site: out[site] for site in requests}

    def _send(self, requests: Mapping[str, bytes],
              name: str) -> dict[str, object | TransportFailure]:
        """Write each request; the failures known before any wait (unknown site, straggler)."""
        out: dict[str, object | TransportFailure] = {}
        for site, request in requests.items():
            if site not in self.sites:
                out[site] = TransportFailure("no such site on this transport")
                continue
            self.store.put(site, "down", name, request)  # a rejoining session answers it
            if self.straggling(site):  # like a busy SiteClient: no second wait
                out[site] = TransportFailure(f"still busy with request {self._missed[site]}, "
                                             f"which missed its deadline")
        return out

    def _collect(self, waiting: list[str], name: str,
                 out: dict[str, object | TransportFailure]) -> None:
        """One pass over the sites still waited for: a reply (or an unreadable one) settles
        the site, which leaves ``waiting``."""
        for site in list(waiting):
            try:
                reply = self.store.get(site, "up", name)
            except (OSError, ValueError) as exc:
                out[site] = TransportFailure(str(exc))
                waiting.remove(site)
                continue
            if reply is not None:
                out[site] = reply  # raw bytes: the engine decodes and checks them
                waiting.remove(site)

    def _drop_gone(self, waiting: list[str], out: dict[str, object | TransportFailure]) -> None:
        """Fail at once the waited-for sites whose session ``alive`` reports gone."""
        assert self._alive is not None
        for site in list(waiting):
            gone = self._alive(site)
            if gone:
                out[site] = TransportFailure(gone)
                waiting.remove(site)

    def straggling(self, site: str) -> bool:
        """Whether the site still owes the answer to a request that missed its deadline."""
        missed = self._missed.get(site, 0)
        return bool(missed) and self.store.newest(site, "up") < missed

    @property
    def seq(self) -> int:
        return self._seq
