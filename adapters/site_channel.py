"""A site's one outbound channel to the federation endpoint (gRPC over mutually authenticated
TLS 1.3): pull the next instruction, push the answer, signed with the site's own key.

The site presents its certificate (signed by the project CA; its key made at the site and
never sent anywhere) and trusts only the project CA for the endpoint's certificate. gRPC keeps
one HTTP/2 connection and re-establishes it when it drops; :class:`Backoff` spaces the
session's retries of a failed call. An HTTP CONNECT proxy (the usual hospital egress) is used
when the site's file names one (``proxy: http://host:port``) or, without it, when the
worker's environment does (lower-case ``https_proxy`` / ``grpc_proxy``: gRPC's own support;
``no_proxy`` still applies); nothing else is needed at the site's firewall than this one
outbound connection.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from adapters.federation_endpoint import PULL, PUSH, WIRE_SLACK
from fl_core.federation.channel import (
    CHUNK_BYTES,
    ChannelRefusedError,
    ChunkAssembler,
    Envelope,
    Kind,
    Refusal,
    SiteCredentials,
    check_envelope,
    chunks,
    decode_envelope,
)
from fl_core.federation.identity import load_private_key
from fl_core.federation.round_log import sign_reply

PERMANENT = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
             grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INVALID_ARGUMENT)
"""Call outcomes that another try will not change (a revoked certificate, a refused reply)."""


@dataclass(frozen=True)
class Instruction:
    seq: int
    round: int
    data: bytes  # a framed fedpriv message


class Backoff:
    """Exponential waits between retries (0.2 s doubling to ``cap_s``), reset on success."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self._next = first_s

    def wait(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap_s)
        time.sleep(delay)
        return delay

    def reset(self) -> None:
        self._next = self.first_s


class SiteChannel:
    """The site's calls to one endpoint for one run."""

    def __init__(self, *, address: str, site: str, run_id: str, credentials: SiteCredentials,
                 server_name: str | None = None, proxy: str | None = None,
                 max_message_bytes: int = 256 << 20) -> None:
        self.address, self.site, self.run_id = address, site, run_id
        self.max_message_bytes = max_message_bytes
        self._key = load_private_key(credentials.key_pem)
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", CHUNK_BYTES + WIRE_SLACK),
            ("grpc.max_send_message_length", CHUNK_BYTES + WIRE_SLACK),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if proxy == "direct":
            options.append(("grpc.enable_http_proxy", 0))
        elif proxy:
            options.append(("grpc.http_proxy", proxy))
        tls = grpc.ssl_channel_credentials(root_certificates=credentials.ca_pem,
                                           private_key=credentials.key_pem,
                                           certificate_chain=credentials.cert_pem)
        self._channel = grpc.secure_channel(address, tls, options=options)
        self._pull = self._channel.unary_stream(PULL)
        self._push = self._channel.stream_unary(PUSH)

    def close(self) -> None:
        self._channel.close()

    def pull(self, after: int, *, wait_s: float = 30.0) -> Instruction | None:
        """The next instruction after sequence number ``after``; None on a heartbeat (nothing
        new yet). gRPC errors propagate (the caller decides whether to retry)."""
        request = Envelope(Kind.PULL, self.run_id, self.site, seq=after).encode()
        stream = self._pull(request, timeout=wait_s)
        envelope = decode_envelope(next(stream))
        check_envelope(envelope, peer_site=self.site, run_id=self.run_id,
                       max_bytes=self.max_message_bytes)
        if envelope.kind is Kind.IDLE:
            return None
        if envelope.kind is not Kind.INSTRUCTION or envelope.seq <= after:
            raise ChannelRefusedError(Refusal.REPLAY, f"instruction {envelope.seq} after {after}")
        assembler = ChunkAssembler(envelope)
        for chunk in stream:
            assembler.add(chunk)
        return Instruction(envelope.seq, envelope.round, assembler.finish())

    def push(self, data: bytes, *, seq: int, round_number: int, kind: Kind = Kind.REPLY,
             timeout_s: float = 600.0) -> None:
        """Send one message (a reply to instruction ``seq``, or the READY report), signed over
        (run, round, site, sha256) with the site's key."""
        digest, signature = sign_reply(self._key, run_id=self.run_id, round_number=round_number,
                                       site=self.site, reply=data)
        envelope = Envelope(kind, self.run_id, self.site, seq, round_number, len(data), digest,
                            signature.hex())
        self._push(_stream(envelope, data), timeout=timeout_s)


def _stream(envelope: Envelope, data: bytes) -> Iterator[bytes]:
    yield envelope.encode()
    yield from chunks(data)


def permanent(error: grpc.RpcError) -> bool:
    """Whether a failed call was refused (do not retry) rather than cut (retry)."""
    code = error.code() if isinstance(error, grpc.Call) else None
    return code in PERMANENT
