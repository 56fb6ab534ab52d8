"""The federation endpoint under attack (issue 23's hostile list), on 127.0.0.1 with real
certificates: each hostile call is refused with a logged reason while an honest site keeps
answering the coordinator's exchanges.

An honest site here is a thread that pulls its instruction and answers with a small framed
message through its own channel (the full training round over the endpoint is in
tests/adapters/test_site_session.py)."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapters.federation_endpoint import PULL, PUSH, EndpointLimits, FederationEndpoint
from adapters.pki import EndpointTls
from adapters.site_channel import SiteChannel
from fl_core.federation.channel import (
    ChannelRefusedError,
    Envelope,
    Kind,
    Refusal,
    SiteCredentials,
)
from fl_core.federation.messages import (
    EvaluateInstruction,
    Failure,
    Shutdown,
    decode_message,
    encode_message,
)
from fl_core.federation.round_log import sign_reply
from tests.federation import LOOPBACK, ProjectPki, channel, make_pki

pytestmark = pytest.mark.slow  # real TLS servers on 127.0.0.1, each on its own port: xdist-safe
SITES = ["alpha", "beta"]
LIMITS = EndpointLimits(max_message_bytes=8 << 20, handshake_timeout_s=1.0, pull_wait_s=1.0)


class Honest:
    """A site that answers every instruction with ``Failure(site, round, "ok")``."""

    def __init__(self, made: ProjectPki, endpoint: FederationEndpoint, site: str) -> None:
        self.channel = channel(made, endpoint, site)
        self.site = site
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        after = 0
        self.channel.push(encode_message(Failure(self.site, -1, "ready")), seq=0,
                          round_number=-1, kind=Kind.READY)
        while True:
            try:
                instruction = self.channel.pull(after, wait_s=30)
            except grpc.RpcError as exc:
                self.errors.append(str(exc.code()))
                time.sleep(0.1)
                continue
            if instruction is None:
                continue
            after = instruction.seq
            message = decode_message(instruction.data)
            if isinstance(message, Shutdown):
                return
            reply = encode_message(Failure(self.site, instruction.round, "ok"))
            self.channel.push(reply, seq=instruction.seq, round_number=instruction.round)


def _open(tls: EndpointTls, run_id: str) -> FederationEndpoint:
    return FederationEndpoint(listen=LOOPBACK, run_id=run_id, sites=SITES, tls=tls, limits=LIMITS)


def _instruction(run_id: str, round_number: int, size: int = 16) -> bytes:
    return encode_message(EvaluateInstruction(run_id, round_number, b"m" * size))


@pytest.fixture
def pki(tmp_path: Path) -> ProjectPki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def endpoint(pki: ProjectPki) -> Iterator[FederationEndpoint]:
    with _open(pki.tls, "run1") as ep:
        yield ep


@pytest.fixture
def honest(pki: ProjectPki, endpoint: FederationEndpoint) -> Iterator[Honest]:
    site = Honest(pki, endpoint, "beta")
    yield site
    endpoint.shutdown(encode_message(Shutdown("run1", -1, "done")))
    site.thread.join(timeout=10)


def _round_goes_on(endpoint: FederationEndpoint, round_number: int) -> None:
    """The honest site answers this round's exchange."""
    replies = endpoint.exchange({"beta": _instruction("run1", round_number)}, deadline_s=10)
    assert isinstance(replies["beta"], bytes), replies
    assert decode_message(replies["beta"], site="beta").round == round_number


def _refused(endpoint: FederationEndpoint, reason: Refusal) -> list[str]:
    return [detail for _, why, detail in endpoint.refusals if why is reason]


def _raw_push(made: ProjectPki, endpoint: FederationEndpoint, site: str,
              envelope: Envelope, parts: list[bytes],
              credentials: SiteCredentials | None = None) -> grpc.RpcError | None:
    """Push exactly these bytes (a hostile site's own client)."""
    creds = credentials or made.issued(site)
    tls = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
    with grpc.secure_channel(endpoint.address, tls) as raw:
        try:
            raw.stream_unary(PUSH)(iter([envelope.encode(), *parts]), timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def _signed(made: ProjectPki, site: str, data: bytes, *, seq: int, round_number: int,
            run_id: str = "run1", claim: str | None = None) -> Envelope:
    from fl_core.federation.identity import load_private_key

    key = load_private_key((made.site_folder(site) / f"{site}.key").read_bytes())
    digest, signature = sign_reply(key, run_id=run_id, round_number=round_number,
                                   site=claim or site, reply=data)
    return Envelope(Kind.REPLY, run_id, claim or site, seq, round_number, len(data), digest,
                    signature.hex())


def _unauthenticated(credentials: SiteCredentials | None, endpoint: FederationEndpoint,
                     ca_pem: bytes) -> grpc.RpcError:
    tls = grpc.ssl_channel_credentials(ca_pem, *((credentials.key_pem, credentials.cert_pem)
                                                 if credentials else ()))
    with grpc.secure_channel(endpoint.address, tls) as raw:
        request = Envelope(Kind.PULL, "run1", "alpha").encode()
        with pytest.raises(grpc.RpcError) as caught:
            list(raw.unary_stream(PULL)(request, timeout=5))
    return caught.value


# ---- identity --------------------------------------------------------------------------

def test_no_certificate_another_ca_and_an_expired_one_are_refused_at_the_handshake(
        pki: ProjectPki, endpoint: FederationEndpoint, honest: Honest,
        capfd: pytest.CaptureFixture[str]) -> None:
    ca_pem = (pki.ca_dir / "ca.crt").read_bytes()
    other = pki.credentials("alpha", ca=pki.other_ca(), new_key=True)
    expired = pki.expired_credentials("alpha")
    for credentials in (None, other, expired):
        error = _unauthenticated(credentials, endpoint, ca_pem)
        assert error.code() is grpc.StatusCode.UNAVAILABLE  # no TLS session, no call
    _round_goes_on(endpoint, 1)
    logged = capfd.readouterr().err  # gRPC's TLS layer logs each refused handshake
    assert logged.count("Handshake failed") >= 3, logged[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in logged


def test_a_connection_below_tls_1_3_is_refused_on_its_first_call() -> None:
    """gRPC negotiates TLS 1.3 between fedpriv parties (the test above: a real handshake says
    so); its Python API has no minimum version, so the endpoint checks what was negotiated."""
    from adapters.federation_endpoint import check_tls_version

    check_tls_version({"ssl_tls_version": [b"TLSv1.3"]})
    for older in ([b"TLSv1.2"], [], [b"TLSv1"]):
        with pytest.raises(ChannelRefusedError) as caught:
            check_tls_version({"ssl_tls_version": older} if older else {})
        assert caught.value.reason is Refusal.OLD_TLS


def test_a_certificate_revoked_mid_run_is_refused_on_its_next_call(
        pki: ProjectPki, endpoint: FederationEndpoint, honest: Honest) -> None:
    alpha = channel(pki, endpoint, "alpha")
    assert alpha.pull(0, wait_s=5) is None  # a heartbeat: alpha is in
    assert pki.revoke("alpha")
    with pytest.raises(grpc.RpcError) as caught:
        alpha.pull(0, wait_s=5)  # the same connection: no restart of anything
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in caught.value.details()
    assert any("revoked" in d for d in _refused(endpoint, Refusal.IDENTITY))
    _round_goes_on(endpoint, 1)


def test_a_certificate_revoked_between_runs_is_refused_and_a_renewed_one_accepted(
        pki: ProjectPki) -> None:
    with _open(pki.tls, "run1") as first:
        assert channel(pki, first, "alpha").pull(0, wait_s=3) is None
    pki.revoke("alpha")
    with _open(pki.tls, "run2") as second:
        with pytest.raises(grpc.RpcError) as caught:
            channel(pki, second, "alpha").pull(0, wait_s=3)  # the revoked certificate
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # renewal: a new key and certificate from the same CA, no restart of the endpoint
        renewed = pki.credentials("alpha", new_key=True)
        assert channel(pki, second, "alpha", credentials=renewed).pull(0, wait_s=3) is None


def test_site_a_cannot_speak_for_site_b(pki: ProjectPki, endpoint: FederationEndpoint,
                                        honest: Honest) -> None:
    pki.issued("alpha")
    posted = threading.Thread(target=endpoint.exchange,
                              args=({"beta": _instruction("run1", 1)}, 3))
    # the envelope claims beta (signed by alpha's key): refused before any byte is read
    data = encode_message(Failure("beta", 1, "forged"))
    error = _raw_push(pki, endpoint, "alpha", _signed(pki, "alpha", data, seq=1,
                                                      round_number=1, claim="beta"), [data])
    assert error is not None and error.code() is grpc.StatusCode.PERMISSION_DENIED
    # the envelope says alpha, the message inside says beta
    error = _raw_push(pki, endpoint, "alpha", _signed(pki, "alpha", data, seq=1,
                                                      round_number=1), [data])
    assert error is not None
    posted.start()
    posted.join()
    assert len(_refused(endpoint, Refusal.WRONG_SITE)) == 1
    # alpha's channel reaches only alpha's mailbox: beta's instruction is not in it
    assert channel(pki, endpoint, "alpha").pull(0, wait_s=3) is None
    _round_goes_on(endpoint, 2)


# ---- replay, deadline, sequence ----------------------------------------------------------

def test_replies_replayed_from_an_earlier_round_or_run_are_refused(
        pki: ProjectPki, endpoint: FederationEndpoint, honest: Honest) -> None:
    pki.issued("alpha")
    recorded: list[tuple[Envelope, bytes]] = []
    alpha = channel(pki, endpoint, "alpha")

    def answer_once() -> None:
        instruction = None
        while instruction is None:
            instruction = alpha.pull(0, wait_s=5)
        data = encode_message(Failure("alpha", instruction.round, "ok"))
        envelope = _signed(pki, "alpha", data, seq=instruction.seq, round_number=instruction.round)
        recorded.append((envelope, data))
        assert _raw_push(pki, endpoint, "alpha", envelope, [data]) is None

    threading.Thread(target=answer_once).start()
    replies = endpoint.exchange({"alpha": _instruction("run1", 1), "beta": _instruction("run1", 1)},
                                deadline_s=10)
    assert all(isinstance(r, bytes) for r in replies.values())
    (envelope, data), = recorded
    # round 2 is posted; alpha replays its round-1 answer: as it was, and renumbered
    waiter = threading.Thread(target=endpoint.exchange,
                              args=({"alpha": _instruction("run1", 2)}, 3))
    waiter.start()
    time.sleep(0.3)
    assert _raw_push(pki, endpoint, "alpha", envelope, [data]) is not None
    renumbered = Envelope(**{**envelope.__dict__, "seq": envelope.seq + 1})
    assert _raw_push(pki, endpoint, "alpha", renumbered, [data]) is not None
    waiter.join()
    assert len(_refused(endpoint, Refusal.REPLAY)) == 2
    # and in another run
    with _open(pki.tls, "run2") as later:
        assert _raw_push(pki, later, "alpha", envelope, [data]) is not None
        assert _refused(later, Refusal.OTHER_RUN)


def test_a_reply_after_the_deadline_is_refused_and_the_site_rejoins_the_next_round(
        pki: ProjectPki, endpoint: FederationEndpoint) -> None:
    alpha = channel(pki, endpoint, "alpha")
    got: list = []
    puller = threading.Thread(target=lambda: got.append(alpha.pull(0, wait_s=5)))
    puller.start()
    replies = endpoint.exchange({"alpha": _instruction("run1", 1)}, deadline_s=0.5)
    assert "missed the round deadline of 0.5 s" in str(replies["alpha"])
    puller.join()
    late = got[0]
    assert endpoint.straggling("alpha")
    busy = endpoint.exchange({"alpha": _instruction("run1", 2)}, deadline_s=5)
    assert "still busy with request" in str(busy["alpha"])  # not waited for twice
    with pytest.raises(grpc.RpcError) as caught:
        alpha.push(encode_message(Failure("alpha", 1, "late")), seq=late.seq, round_number=1)
    assert "after the round deadline" in caught.value.details()
    assert not endpoint.straggling("alpha")  # its late answer came: ask it again

    def answer() -> None:
        instruction = None
        while instruction is None:
            instruction = alpha.pull(late.seq, wait_s=5)
        alpha.push(encode_message(Failure("alpha", instruction.round, "ok")),
                   seq=instruction.seq, round_number=instruction.round)

    threading.Thread(target=answer).start()
    assert isinstance(endpoint.exchange({"alpha": _instruction("run1", 3)}, 10)["alpha"], bytes)


def test_a_site_that_drops_mid_message_and_reconnects_answers_the_next_round(
        pki: ProjectPki, endpoint: FederationEndpoint) -> None:
    pki.issued("alpha")
    alpha = channel(pki, endpoint, "alpha")
    cut = threading.Event()

    def drop_mid_message() -> None:
        instruction = None
        while instruction is None:
            instruction = alpha.pull(0, wait_s=5)
        data = _dense_reply(b"x" * 3_000_000)
        envelope = _signed(pki, "alpha", data, seq=instruction.seq,
                           round_number=instruction.round)

        def parts() -> Iterator[bytes]:
            yield envelope.encode()
            yield data[:1 << 20]
            cut.set()
            raise ConnectionResetError("the site's link went down")  # the call is cancelled

        creds = pki.issued("alpha")
        tls = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem)
        with grpc.secure_channel(endpoint.address, tls) as raw, \
                contextlib.suppress(grpc.RpcError):
            raw.stream_unary(PUSH)(parts(), timeout=10)

    threading.Thread(target=drop_mid_message).start()
    first = endpoint.exchange({"alpha": _instruction("run1", 1)}, deadline_s=3)
    assert cut.is_set()
    assert "missed the round deadline" in str(first["alpha"])
    fresh = channel(pki, endpoint, "alpha")  # a new connection, a new session's report
    fresh.push(encode_message(Failure("alpha", -1, "back")), seq=0, round_number=-1,
               kind=Kind.READY)

    def answer() -> None:
        instruction = None
        while instruction is None or instruction.round != 2:
            instruction = fresh.pull(instruction.seq if instruction else 0, wait_s=5)
        fresh.push(encode_message(Failure("alpha", 2, "ok")), seq=instruction.seq,
                   round_number=2)

    threading.Thread(target=answer).start()
    assert isinstance(endpoint.exchange({"alpha": _instruction("run1", 2)}, 10)["alpha"], bytes)


# ---- sizes, garbage, floods -----------------------------------------------------------------

def test_oversized_and_lying_messages_are_refused_before_allocation(
        pki: ProjectPki, endpoint: FederationEndpoint, honest: Honest) -> None:
    pki.issued("alpha")
    threading.Thread(target=endpoint.exchange,
                     args=({"alpha": _instruction("run1", 1)}, 3)).start()
    time.sleep(0.2)
    claims = Envelope(Kind.REPLY, "run1", "alpha", 1, 1, 4 * 10**9, "0" * 64, "")
    assert _raw_push(pki, endpoint, "alpha", claims, []) is not None  # 4·10^9 claimed
    data = encode_message(Failure("alpha", 1, "ok"))
    short = Envelope(**{**_signed(pki, "alpha", data, seq=1, round_number=1).__dict__,
                        "size": 10})
    assert _raw_push(pki, endpoint, "alpha", short, [data]) is not None  # more than declared
    truncated = _signed(pki, "alpha", data, seq=1, round_number=1)
    assert _raw_push(pki, endpoint, "alpha", truncated, [data[:5]]) is not None
    assert _refused(endpoint, Refusal.TOO_LARGE) and _refused(endpoint, Refusal.TRUNCATED)
    _round_goes_on(endpoint, 2)


def test_a_pickle_garbage_or_a_bad_signature_is_never_accepted(
        pki: ProjectPki, endpoint: FederationEndpoint, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204 - unpickling this would create the marker
            return (marker.touch, ())

    pki.issued("alpha")
    other_key = pki.issued("beta")  # beta's key signs a reply sent on alpha's channel
    sent: list[grpc.RpcError | None] = []

    def attack() -> None:
        time.sleep(0.3)
        for payload in (pickle.dumps(Exploit()), b"\x00" * 100):
            sent.append(_raw_push(pki, endpoint, "alpha",
                                  _signed(pki, "alpha", payload, seq=1, round_number=1),
                                  [payload]))
        data = encode_message(Failure("alpha", 1, "ok"))
        forged = _signed(pki, "beta", data, seq=1, round_number=1, claim="alpha")
        sent.append(_raw_push(pki, endpoint, "alpha", forged, [data]))

    thread = threading.Thread(target=attack)
    thread.start()
    replies = endpoint.exchange({"alpha": _instruction("run1", 1)}, deadline_s=3)
    thread.join()
    assert "missed the round deadline" in str(replies["alpha"])
    assert all(error is not None for error in sent) and not marker.exists()
    assert len(_refused(endpoint, Refusal.MALFORMED)) == 2
    assert _refused(endpoint, Refusal.BAD_SIGNATURE) and other_key


def test_a_silent_connection_is_closed_and_a_flood_does_not_stop_the_round(
        pki: ProjectPki, endpoint: FederationEndpoint, honest: Honest) -> None:
    host, port = endpoint.address.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    silent.settimeout(10)
    started = time.monotonic()
    assert silent.recv(1) == b""  # closed by the endpoint: the handshake never came
    assert time.monotonic() - started < 5
    flood = [socket.create_connection((host, int(port))) for _ in range(200)]
    alpha = pki.issued("alpha")
    tls = grpc.ssl_channel_credentials(alpha.ca_pem, alpha.key_pem, alpha.cert_pem)
    request = Envelope(Kind.PULL, "run1", "alpha").encode()
    with grpc.secure_channel(endpoint.address, tls) as raw:  # many calls from one site
        calls = [raw.unary_stream(PULL)(request, timeout=5) for _ in range(20)]
        _round_goes_on(endpoint, 1)
        codes = [_code(call) for call in calls]
    # at most calls_per_site pulls held at once per site (RESOURCE_EXHAUSTED), at most
    # streams_per_connection streams per connection (HTTP/2 REFUSED_STREAM: UNAVAILABLE): the
    # rest are refused at once, not queued
    refused = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
    assert set(codes) <= {grpc.StatusCode.OK} | refused
    assert sum(code in refused for code in codes) >= endpoint.limits.calls_per_site
    assert _refused(endpoint, Refusal.BUSY)
    for sock in flood:
        sock.close()


def _code(call: grpc.Call) -> grpc.StatusCode:
    try:
        list(call)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_dense_ten_million_parameter_update_crosses_both_ways(
        pki: ProjectPki) -> None:
    """40 MB down and 40 MB up, in 1 MiB chunks, under a 64 MiB cap."""
    with FederationEndpoint(listen=LOOPBACK, run_id="run1", sites=["alpha"], tls=pki.tls,
                            limits=EndpointLimits(max_message_bytes=64 << 20)) as endpoint:
        alpha = channel(pki, endpoint, "alpha")
        payload = bytes(range(256)) * (40_000_000 // 256)

        def echo() -> None:
            instruction = None
            while instruction is None:
                instruction = alpha.pull(0, wait_s=30)
            model = decode_message(instruction.data).model  # type: ignore[union-attr]
            alpha.push(_dense_reply(model), seq=instruction.seq, round_number=1)

        threading.Thread(target=echo).start()
        reply = endpoint.exchange({"alpha": encode_message(
            EvaluateInstruction("run1", 1, payload))}, deadline_s=60)["alpha"]
        assert isinstance(reply, bytes)
        update = decode_message(reply, site="alpha").update  # type: ignore[union-attr]
        assert hashlib.sha256(update).digest() == hashlib.sha256(payload).digest()


def _dense_reply(update: bytes) -> bytes:
    from fl_core.federation.messages import FitReply

    return encode_message(FitReply("alpha", 1, update, 10, 0.5, None, 0))


def test_the_channel_refuses_an_endpoint_signed_by_another_ca(pki: ProjectPki,
                                                               tmp_path: Path) -> None:
    """The site trusts only the project CA: an endpoint with another CA's certificate (a
    man in the middle) gets no call."""
    from adapters import pki as pki_files

    other = pki.other_ca()
    pki_files.issue_server_certificate(other, host="127.0.0.1", days=5,
                                       out_dir=tmp_path / "mitm")

    mitm_tls = EndpointTls(tmp_path / "mitm" / "server.key", tmp_path / "mitm" / "server.crt",
                           pki.tls.ca_cert, pki.tls.crl)
    with _open(mitm_tls, "run1") as mitm:
        site: SiteChannel = channel(pki, mitm, "alpha")
        with pytest.raises(grpc.RpcError) as caught:
            site.pull(0, wait_s=3)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
