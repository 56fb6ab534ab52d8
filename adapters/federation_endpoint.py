"""The federation endpoint: a gRPC server over mutually authenticated TLS that the sites dial
out to (a hospital accepts no inbound connection), and the coordinator's
:class:`~fl_core.federation.transport.Transport` in ``federation.mode=sites``.

One endpoint serves one training run (the coordinator starts it with the run and stops it at
the end: the run id, the sites and their mailboxes are the run's, so nothing outlives it).
Two calls, no generated code, fedpriv's framed messages as the payload:

- ``Pull`` (unary → stream): "my next instruction after sequence number n". Answered with an
  :class:`~fl_core.federation.channel.Envelope` and the message in chunks, or an IDLE envelope
  after ``pull_wait_s`` (the heartbeat: the site pulls again).
- ``Push`` (stream → unary): an envelope, then the message in chunks: the site's start-up
  report (READY) or its answer to one instruction (REPLY).

Every call, before anything else: the peer's certificate (TLS 1.3, verified against the
project CA during the handshake by gRPC) is checked again by
:func:`~fl_core.federation.identity.identify_peer` with the CA and revocation list as they
are on disk *now* (re-read when the files change), so ``fedpriv pki revoke`` counts on the
site's next call without a restart; the site id is the certificate's subject and the
envelope, and the message inside, must name it. A site reaches only its own mailbox. A reply
must answer the instruction the site owes (sequence number and round), before the round's
deadline on the coordinator's clock, within the size cap declared up front, and carry the
site's signature over ``(run, round, site, sha256)``, which is kept for the round log.
Refusals are logged with their reason (``on_refusal``) and counted; the call gets a gRPC
status and the reason, the run goes on.

The server's own certificate and the CA bundle are re-read per new connection
(``grpc.dynamic_ssl_server_credentials``): a renewed server certificate needs no restart.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass

import grpc

from adapters.pki import EndpointTls, load_trust
from fl_core.config.model import site_slug
from fl_core.federation.channel import (
    CHUNK_BYTES,
    READY_SEQ,
    ChannelRefusedError,
    ChunkAssembler,
    Envelope,
    Kind,
    Owed,
    Refusal,
    check_envelope,
    check_reply,
    chunks,
    decode_envelope,
)
from fl_core.federation.identity import PeerRefusedError, identify_peer, load_certificate
from fl_core.federation.messages import MessageError, peek_message
from fl_core.federation.round_log import SignedReply, reply_message, sha256_hex, signature_valid
from fl_core.federation.transport import TransportFailure

SERVICE = "fedpriv.Federation"
PULL = f"/{SERVICE}/Pull"
PUSH = f"/{SERVICE}/Push"
WIRE_SLACK = 64 * 1024  # an envelope or chunk plus gRPC framing

RefusalSink = Callable[[str, Refusal, str], None]  # (peer, reason, detail)


@dataclass(frozen=True)
class EndpointLimits:
    """Everything a hostile or broken site could otherwise exhaust."""

    max_message_bytes: int = 256 << 20  # a dense 10^7-parameter update is 40 MB
    calls_per_site: int = 4  # a session needs two at most (a pull and a push)
    handshake_timeout_s: float = 5.0  # a connection that opens and sends nothing is closed
    idle_timeout_s: float = 120.0  # a connection with no call for that long is closed
    pull_wait_s: float = 10.0  # the longest a pull is held before an IDLE heartbeat
    max_concurrent_rpcs: int = 64
    streams_per_connection: int = 8


@dataclass
class _Mailbox:
    """One site's state at the endpoint (guarded by the endpoint's lock)."""

    # (seq, round, message, its sha256) the site is to fetch
    outbox: tuple[int, int, bytes, str] | None = None
    owed: Owed | None = None
    answered: int = 0  # highest seq answered or let expire
    reply: tuple[int, bytes] | None = None  # (seq, message) accepted for ``owed``
    ready: tuple[bytes, float] | None = None  # the latest start-up report and when it came
    calls: int = 0
    busy_with: int = 0  # a seq whose deadline passed before the site answered it


class _Trust:
    """The CA and revocation list, re-read when either file changes."""

    def __init__(self, tls: EndpointTls) -> None:
        self._tls = tls
        self._stamp: tuple[float, float] | None = None
        self._lock = threading.Lock()
        self._trust = load_trust(tls.ca_cert, tls.crl)

    def identify(self, pem: bytes) -> str:
        with self._lock:
            stamp = (self._tls.ca_cert.stat().st_mtime,
                     self._tls.crl.stat().st_mtime if self._tls.crl else 0.0)
            if stamp != self._stamp:
                self._trust, self._stamp = load_trust(self._tls.ca_cert, self._tls.crl), stamp
            ca_cert, crl = self._trust
        return identify_peer(pem, ca_cert=ca_cert, crl=crl,
                             now=datetime.datetime.now(datetime.UTC))


def _server_credentials(tls: EndpointTls) -> grpc.ServerCredentials:
    """TLS with a required, CA-verified client certificate; the key pair and CA re-read for a
    new connection whenever their files changed."""
    def read() -> tuple[grpc.ServerCertificateConfiguration, tuple[float, ...]]:
        paths = (tls.server_key, tls.server_cert, tls.ca_cert)
        stamp = tuple(p.stat().st_mtime for p in paths)
        key, cert, ca = (p.read_bytes() for p in paths)
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca), stamp

    initial, stamp = read()
    state = {"stamp": stamp}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with contextlib.suppress(OSError):
            config, new = read()
            if new != state["stamp"]:
                state["stamp"] = new
                return config
        return None  # unchanged (or unreadable mid-rotation): keep the current one

    return grpc.dynamic_ssl_server_credentials(initial, fetch,
                                               require_client_authentication=True)


def print_refusal(peer: str, reason: Refusal, detail: str) -> None:
    print(f"endpoint: refused {peer}: {reason.value} ({detail})", flush=True)


class FederationEndpoint:
    """The coordinator's endpoint for one run (see the module docstring).

    ``exchange`` makes it a :class:`~fl_core.federation.transport.Transport`; ``ready_report``,
    ``shutdown``, ``straggling`` and ``receipts`` serve the sessions' bookkeeping and the
    round log."""

    def __init__(self, *, run_id: str, sites: list[str], tls: EndpointTls, listen: str,
                 limits: EndpointLimits = EndpointLimits(),
                 on_refusal: RefusalSink = print_refusal) -> None:
        self.run_id, self.sites, self.tls, self.limits = run_id, list(sites), tls, limits
        self._listen = listen  # host:port to bind (port 0: any free one)
        self._on_refusal = on_refusal
        self._trust = _Trust(tls)
        self._lock = threading.Condition()
        self._boxes = {site: _Mailbox() for site in self.sites}
        # a certificate names a site by its slug (lower case, '-'): "VA Long Beach" → va-long-beach
        self._by_slug = {site_slug(site): site for site in self.sites}
        self._seq = 0
        self._digests: dict[int, tuple[str, bytes]] = {}
        self._receipts: dict[int, list[SignedReply]] = {}
        self.refusals: list[tuple[str, Refusal, str]] = []
        self._server: grpc.Server | None = None
        self.port = 0
        self.alive: Callable[[str], str | None] | None = None

    # ---- life cycle -------------------------------------------------------------------
    def start(self) -> FederationEndpoint:
        limits = self.limits
        wire = CHUNK_BYTES + WIRE_SLACK
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=limits.max_concurrent_rpcs,
                                       thread_name_prefix="fedpriv-endpoint"),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, {
                "Pull": grpc.unary_stream_rpc_method_handler(self._pull),
                "Push": grpc.stream_unary_rpc_method_handler(self._push)})],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", wire),
                     ("grpc.max_send_message_length", wire),
                     ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout_s * 1000)),
                     ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
                     ("grpc.max_concurrent_streams", limits.streams_per_connection),
                     ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.so_reuseport", 0)])
        self.port = server.add_secure_port(self._listen, _server_credentials(self.tls))
        if not self.port:
            raise OSError(f"the federation endpoint cannot listen on {self._listen}")
        server.start()
        self._server = server
        return self

    @property
    def address(self) -> str:
        """``host:port`` as bound (the port resolved when ``listen`` asked for 0)."""
        return f"{self._listen.rsplit(':', 1)[0]}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        with self._lock:
            self._lock.notify_all()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
            self._server = None

    def __enter__(self) -> FederationEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the coordinator's side ---------------------------------------------------------
    def exchange(self, requests: Mapping[str, bytes],
                 deadline_s: float) -> dict[str, object | TransportFailure]:
        """Send each site its request; what each answered by the deadline (the coordinator's
        clock), else why not. A site still busy with an expired request is not sent another
        (it answers only the newest it fetches) and fails at once."""
        out: dict[str, object | TransportFailure] = {}
        with self._lock:
            self._seq += 1
            seq = self._seq
            for site, request in requests.items():
                problem = self._post(site, seq, request)
                if problem:
                    out[site] = TransportFailure(problem)
            self._lock.notify_all()
        self._wait_replies(requests, seq, deadline_s, out)
        return {site: out[site] for site in requests}

    def _post(self, site: str, seq: int, request: bytes) -> str | None:
        box = self._boxes.get(site)
        if box is None:
            return "no such site on this transport"
        if box.busy_with:
            return f"still busy with request {box.busy_with}, which missed its deadline"
        round_number = _round_of(request)
        box.outbox = (seq, round_number, request, self._digest(request))
        box.owed, box.reply = Owed(seq, round_number), None
        return None

    def _digest(self, request: bytes) -> str:
        """The request's SHA-256, once per exchange (every site is sent the same model)."""
        key = id(request)
        if self._digests.get(key, ("", b""))[1] is not request:
            self._digests = {key: (sha256_hex(request), request)}
        return self._digests[key][0]

    def _wait_replies(self, requests: Mapping[str, bytes], seq: int, deadline_s: float,
                      out: dict[str, object | TransportFailure]) -> None:
        end, next_check = time.monotonic() + deadline_s, time.monotonic() + 0.5
        waiting = [s for s in requests if s not in out]
        while waiting:
            with self._lock:
                self._collect(waiting, seq, out)
                left = end - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            if self.alive is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5  # asks Prefect: never under the lock
                gone = {site: why for site in waiting if (why := self.alive(site))}
                with self._lock:
                    for site, why in gone.items():
                        out[site] = TransportFailure(why)
                        waiting.remove(site)
                        self._expire(site, seq)
        with self._lock:
            self._collect(waiting, seq, out)
            for site in waiting:
                out[site] = TransportFailure(f"missed the round deadline of {deadline_s:g} s")
                self._expire(site, seq)

    def _collect(self, waiting: list[str], seq: int,
                 out: dict[str, object | TransportFailure]) -> None:
        for site in list(waiting):
            reply = self._boxes[site].reply
            if reply is not None and reply[0] == seq:
                out[site] = reply[1]  # raw bytes: the engine decodes and checks them
                waiting.remove(site)

    def _expire(self, site: str, seq: int) -> None:
        box = self._boxes[site]
        if box.owed is not None and box.owed.seq == seq:
            box.owed = Owed(box.owed.seq, box.owed.round, expired=True)
            box.busy_with = seq
            box.answered = max(box.answered, seq)

    def straggling(self, site: str) -> bool:
        """Whether the site still owes the answer to a request that missed its deadline."""
        with self._lock:
            return bool(self._boxes[site].busy_with) if site in self._boxes else False

    def ready_report(self, site: str) -> tuple[bytes, float] | None:
        """The site's latest start-up report (a framed SiteReady or Failure) and when it came
        (``time.time()``); None before its session has reported."""
        with self._lock:
            return self._boxes[site].ready if site in self._boxes else None

    def shutdown(self, message: bytes) -> None:
        """Post ``message`` (a framed Shutdown) as every site's next instruction."""
        with self._lock:
            self._seq += 1
            digest = sha256_hex(message)
            for box in self._boxes.values():
                box.outbox = (self._seq, -1, message, digest)
            self._lock.notify_all()

    def receipts(self, round_number: int) -> list[SignedReply]:
        """The signed hashes of every reply accepted for ``round_number`` (training and
        evaluation), in the order they came: what the round log records."""
        with self._lock:
            return list(self._receipts.get(round_number, []))

    # ---- the sites' side (gRPC handlers) -------------------------------------------------
    def _refuse(self, context: grpc.ServicerContext, peer: str, error: ChannelRefusedError,
                code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> None:
        with self._lock:
            self.refusals.append((peer, error.reason, error.detail))
            del self.refusals[:-1000]
        self._on_refusal(peer, error.reason, error.detail)
        context.abort(code, str(error))

    def _identify(self, context: grpc.ServicerContext) -> str:
        auth = context.auth_context()
        check_tls_version(auth)
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            raise ChannelRefusedError(Refusal.IDENTITY, "no client certificate")
        try:
            site = self._trust.identify(pems[0])
        except PeerRefusedError as exc:
            raise ChannelRefusedError(Refusal.IDENTITY, f"{exc.reason.value}: {exc}") from None
        if site not in self._by_slug:
            raise ChannelRefusedError(Refusal.UNKNOWN_SITE, f"{site!r}")
        return self._by_slug[site]

    @contextlib.contextmanager
    def _call(self, context: grpc.ServicerContext) -> Iterator[tuple[str, bytes]]:
        """Identify the peer and hold one of its call slots for the call's duration."""
        peer = context.peer()
        try:
            site = self._identify(context)
        except ChannelRefusedError as exc:
            self._refuse(context, peer, exc, grpc.StatusCode.UNAUTHENTICATED)  # raises
        with self._lock:
            box = self._boxes[site]
            if box.calls >= self.limits.calls_per_site:
                busy = True
            else:
                busy, box.calls = False, box.calls + 1
        if busy:
            self._refuse(context, site, ChannelRefusedError(
                Refusal.BUSY, f"{self.limits.calls_per_site} already"),
                grpc.StatusCode.RESOURCE_EXHAUSTED)
        try:
            yield site, context.auth_context()["x509_pem_cert"][0]
        finally:
            with self._lock:
                box.calls -= 1

    def _pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._call(context) as (site, _):
            try:
                envelope = decode_envelope(request)
                check_envelope(envelope, peer_site=site, run_id=self.run_id,
                               max_bytes=self.limits.max_message_bytes)
                if envelope.kind is not Kind.PULL:
                    raise ChannelRefusedError(Refusal.MALFORMED, "a pull must say PULL")
            except ChannelRefusedError as exc:
                self._refuse(context, site, exc)  # raises
            message = self._next_for(site, envelope.seq, context)
            if message is None:
                yield Envelope(Kind.IDLE, self.run_id, site).encode()
                return
            seq, round_number, data, digest = message
            yield Envelope(Kind.INSTRUCTION, self.run_id, site, seq, round_number, len(data),
                           digest).encode()
            yield from chunks(data)

    def _next_for(self, site: str, after: int,
                  context: grpc.ServicerContext) -> tuple[int, int, bytes, str] | None:
        end = time.monotonic() + self.limits.pull_wait_s
        with self._lock:
            while context.is_active() and self._server is not None:
                outbox = self._boxes[site].outbox
                if outbox is not None and outbox[0] > after:
                    return outbox
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(min(left, 1.0))
        return None

    def _push(self, stream: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        with self._call(context) as (site, pem):
            try:
                envelope, data = self._receive(stream, site, pem)
                self._accept(site, envelope, data)
            except ChannelRefusedError as exc:
                self._refuse(context, site, exc)
        return Envelope(Kind.IDLE, self.run_id, site, envelope.seq, envelope.round).encode()

    def _receive(self, stream: Iterator[bytes], site: str, pem: bytes) -> tuple[Envelope, bytes]:
        """The envelope, checked, then the message, rebuilt within its declared size and
        checked against the envelope's hash, the site's signature and its own site field."""
        envelope = decode_envelope(next(stream, b""))
        check_envelope(envelope, peer_site=site, run_id=self.run_id,
                       max_bytes=self.limits.max_message_bytes)
        if envelope.kind not in (Kind.READY, Kind.REPLY):
            raise ChannelRefusedError(Refusal.MALFORMED, f"cannot push a {envelope.kind.value}")
        if envelope.kind is Kind.REPLY:  # a replay or a late reply: refused before its bytes
            self._check_owed(site, envelope)
        assembler = ChunkAssembler(envelope)
        for chunk in stream:
            assembler.add(chunk)
        data = assembler.finish()
        key = load_certificate(pem).public_key()
        signed = reply_message(self.run_id, envelope.round, site, envelope.sha256)
        if not signature_valid(key, bytes.fromhex(envelope.signature), signed):  # type: ignore[arg-type]
            raise ChannelRefusedError(Refusal.BAD_SIGNATURE, f"reply {envelope.seq}")
        try:  # the frame and its scalar fields (the site it claims); the engine decodes the rest
            peek_message(data, site=site)
        except MessageError as exc:
            reason = Refusal.WRONG_SITE if "claims to come from" in exc.reason \
                else Refusal.MALFORMED
            raise ChannelRefusedError(reason, exc.reason) from None
        return envelope, data

    def _check_owed(self, site: str, envelope: Envelope) -> None:
        """:func:`check_reply` against the site's mailbox; a straggler's late answer frees it
        to be asked again."""
        with self._lock:
            box = self._boxes[site]
            try:
                check_reply(envelope, box.owed, answered=box.answered)
            except ChannelRefusedError as exc:
                if exc.reason is Refusal.LATE and box.busy_with == envelope.seq:
                    box.busy_with = 0
                raise

    def _accept(self, site: str, envelope: Envelope, data: bytes) -> None:
        with self._lock:
            box = self._boxes[site]
            if envelope.kind is Kind.READY:
                box.ready, box.busy_with = (data, time.time()), 0  # a new session: not busy
                self._lock.notify_all()
                return
            self._check_owed(site, envelope)
            box.reply, box.answered = (envelope.seq, data), envelope.seq
            box.owed = None
            receipt = SignedReply(site, envelope.sha256, bytes.fromhex(envelope.signature))
            self._receipts.setdefault(envelope.round, []).append(receipt)
            self._lock.notify_all()


def check_tls_version(auth: Mapping[str, list[bytes]]) -> None:
    """Refuse a call whose connection negotiated less than TLS 1.3 (gRPC's Python API sets no
    minimum version: a client offering only TLS 1.2 completes the handshake, and is refused
    here, on its first call)."""
    version = b"".join(auth.get("ssl_tls_version") or [b"none"]).decode(errors="replace")
    if version != "TLSv1.3":
        raise ChannelRefusedError(Refusal.OLD_TLS, version)


def _round_of(request: bytes) -> int:
    """The round an instruction is for (-1 when it carries none), from its metadata only."""
    try:
        return int(peek_message(request)[1].get("round", -1))
    except MessageError:
        return -1


__all__ = ["PULL", "PUSH", "READY_SEQ", "EndpointLimits", "EndpointTls", "FederationEndpoint"]
