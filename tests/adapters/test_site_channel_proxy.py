"""A site's channel through the hospital's HTTP CONNECT proxy (often its only way out).

gRPC core takes the proxy from the worker's environment, lower case only (``grpc_proxy``, else
``https_proxy``, else ``http_proxy``; ``no_grpc_proxy``/``no_proxy`` exempt hosts, nothing is
exempt by default, not even 127.0.0.1), read when a channel is made, not cached per process.
Through it the proxy sees one CONNECT to the endpoint's host:port and then only TLS records:
the mutual TLS stays between the site and the endpoint. A proxy that refuses the tunnel leaves
the call UNAVAILABLE; gRPC does not fall back to a direct connection.

The proxy is written here (threads and sockets on 127.0.0.1) so that the test sees exactly
what a real one would: the CONNECT line and the bytes it relays.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from adapters.federation_endpoint import EndpointLimits, FederationEndpoint
from adapters.site_channel import SiteChannel
from fl_core.federation.channel import Kind
from fl_core.federation.messages import Failure, decode_message, encode_message
from tests.federation import LOOPBACK, ProjectPki, channel, make_pki

pytestmark = pytest.mark.slow  # a TLS endpoint and a proxy on 127.0.0.1, own ports: xdist-safe

PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy",
                   "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")
MARKER = "plaintext-marker-5d1c9e"  # in the READY report: must never cross the proxy in clear
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record header: content type handshake, version 3.x
HEAD_LIMIT = 8192


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that tunnels only to ``allowed`` (403 for any
    other target, or for all when ``allowed`` is None), recording each CONNECT target and
    every byte it relays (``upstream``: site → endpoint, ``downstream``: back)."""

    def __init__(self, allowed: str | None) -> None:
        self.allowed = allowed
        self.targets: list[str] = []
        self.upstream = bytearray()
        self.downstream = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ConnectProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _keep(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._spawn(self._serve, self._keep(client))

    def _serve(self, client: socket.socket) -> None:
        """Read the CONNECT request; refuse it, or dial the target, answer 200 and relay."""
        head, rest = _read_head(client)
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, target = request_line.partition(" ")
        target = target.rsplit(" ", 1)[0]
        with self._lock:
            self.targets.append(target)
        if method != "CONNECT" or target != self.allowed:
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        host, port = target.rsplit(":", 1)
        upstream = self._keep(socket.create_connection((host, int(port)), timeout=5))
        upstream.settimeout(None)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            self._relayed(self.upstream, rest)
            upstream.sendall(rest)
        self._spawn(self._relay, client, upstream, self.upstream)
        self._relay(upstream, client, self.downstream)

    def _relay(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                self._relayed(record, data)
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _relayed(self, record: bytearray, data: bytes) -> None:
        with self._lock:
            record.extend(data)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request's header block and whatever came after it (the start of the tunnel)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < HEAD_LIMIT:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


@pytest.fixture
def pki(tmp_path: Path) -> ProjectPki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def endpoint(pki: ProjectPki) -> Iterator[FederationEndpoint]:
    with FederationEndpoint(listen=LOOPBACK, run_id="run1", sites=["alpha"], tls=pki.tls,
                            limits=EndpointLimits(pull_wait_s=1.0)) as started:
        yield started


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever proxy the machine running the tests has must not decide where calls go."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _ready(site: str) -> bytes:
    return encode_message(Failure(site, -1, MARKER))


def test_pull_and_push_go_through_the_proxy_with_tls_end_to_end(
        pki: ProjectPki, endpoint: FederationEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    with ConnectProxy(allowed=endpoint.address) as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)  # before the channel: gRPC reads it then
        site = channel(pki, endpoint, "alpha")
        try:
            assert site.pull(0, wait_s=10) is None  # the heartbeat came back through the tunnel
            ready = _ready("alpha")
            site.push(ready, seq=0, round_number=-1, kind=Kind.READY)
        finally:
            site.close()
        report = endpoint.ready_report("alpha")
        assert report is not None
        assert decode_message(report[0], site="alpha") == Failure("alpha", -1, MARKER)
        assert proxy.targets == [endpoint.address]  # one CONNECT, to the endpoint, one tunnel
        assert MARKER.encode() in ready  # the frame carries it in clear...
        assert proxy.upstream.startswith(TLS_HANDSHAKE)  # ...but the tunnel carried TLS
        assert proxy.downstream.startswith(TLS_HANDSHAKE)
        assert MARKER.encode() not in bytes(proxy.upstream) + bytes(proxy.downstream)


def test_a_refusing_proxy_leaves_the_call_unavailable_not_direct(
        pki: ProjectPki, endpoint: FederationEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    with ConnectProxy(allowed=None) as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        site = channel(pki, endpoint, "alpha")
        try:
            with pytest.raises(grpc.RpcError) as pulled:
                site.pull(0, wait_s=10)  # a direct connection would get a heartbeat instead
            assert pulled.value.code() is grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as pushed:
                site.push(_ready("alpha"), seq=0, round_number=-1, kind=Kind.READY, timeout_s=10)
            assert pushed.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            site.close()
        assert proxy.targets and set(proxy.targets) == {endpoint.address}
        assert not proxy.upstream and not proxy.downstream
    assert endpoint.ready_report("alpha") is None


def test_the_proxy_is_read_when_the_channel_is_made(
        pki: ProjectPki, endpoint: FederationEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not cached per process: each channel follows the environment as it was when it was
    made (a worker picks up a changed proxy for its next session's channel, not mid-run)."""
    with ConnectProxy(endpoint.address) as first, ConnectProxy(endpoint.address) as second:
        direct = channel(pki, endpoint, "alpha")
        monkeypatch.setenv("https_proxy", first.url)
        via_first = channel(pki, endpoint, "alpha")
        monkeypatch.setenv("https_proxy", second.url)
        via_second = channel(pki, endpoint, "alpha")
        try:
            for site in (direct, via_first, via_second):
                assert site.pull(0, wait_s=10) is None
        finally:
            for site in (direct, via_first, via_second):
                site.close()
        assert first.targets == [endpoint.address]
        assert second.targets == [endpoint.address]


@pytest.mark.parametrize("variables", [{"HTTPS_PROXY": "{url}"},
                                       {"https_proxy": "127.0.0.1:{port}"},
                                       {"https_proxy": "https://127.0.0.1:{port}"},
                                       {"https_proxy": "{url}", "no_proxy": "127.0.0.1"}],
                         ids=["upper-case", "no-scheme", "https-scheme", "no_proxy"])
def test_what_grpc_ignores_goes_direct(
        pki: ProjectPki, endpoint: FederationEndpoint, monkeypatch: pytest.MonkeyPatch,
        variables: dict[str, str]) -> None:
    """The pitfalls the deployment guide warns about, pinned to gRPC's behaviour: an upper-case
    HTTPS_PROXY, a proxy without ``http://`` or with ``https://``, are ignored (the last two
    with only a log line) and the call goes direct, as it does for a host in no_proxy. At a
    hospital whose firewall allows only the proxy, that is a connection that never opens."""
    with ConnectProxy(endpoint.address) as proxy:
        for name, value in variables.items():
            monkeypatch.setenv(name, value.format(url=proxy.url, port=proxy.port))
        site = channel(pki, endpoint, "alpha")
        try:
            assert site.pull(0, wait_s=10) is None
        finally:
            site.close()
        assert proxy.targets == []


def _channel_with(pki: ProjectPki, endpoint: FederationEndpoint, proxy: str) -> SiteChannel:
    return SiteChannel(address=endpoint.address, site="alpha", run_id=endpoint.run_id,
                       credentials=pki.issued("alpha"), proxy=proxy)


def test_the_site_files_proxy_setting_wins_over_the_environment(
        pki: ProjectPki, endpoint: FederationEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """``proxy:`` in site.yaml: the channel goes through it with no variable set; ``direct``
    goes direct even with https_proxy set; a value gRPC would ignore is refused on load."""
    from pydantic import ValidationError

    from fl_core.config.site import SiteConfig

    with ConnectProxy(allowed=endpoint.address) as proxy:
        site = _channel_with(pki, endpoint, proxy.url)
        try:
            assert site.pull(0, wait_s=10) is None
        finally:
            site.close()
        assert proxy.targets == [endpoint.address]
        monkeypatch.setenv("https_proxy", proxy.url)
        direct = _channel_with(pki, endpoint, "direct")
        try:
            assert direct.pull(0, wait_s=10) is None
        finally:
            direct.close()
        assert proxy.targets == [endpoint.address]  # no second CONNECT
    base = {"site": "alpha", "data": "a.csv", "tls": {"key": "k", "cert": "c", "ca": "ca"}}
    for ignored in ("https://proxy:3128", "proxy:3128", "HTTP://proxy:3128"):
        with pytest.raises(ValidationError):
            SiteConfig.model_validate({**base, "proxy": ignored})
    assert SiteConfig.model_validate({**base, "proxy": "http://u:p@proxy:3128"}).proxy
