"""The channel's rules without a network: envelopes round-trip and anything else is refused
as MALFORMED (never another exception); a reply is accepted only for the instruction the site
owes; chunks rebuild exactly the declared bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.federation.channel import (
    MAX_ENVELOPE_BYTES,
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

envelopes = st.builds(
    Envelope, kind=st.sampled_from(list(Kind)),
    run_id=st.text("abcXYZ019", min_size=1, max_size=64),
    site=st.text(min_size=1, max_size=64), seq=st.integers(0, 2**40),
    round=st.integers(-1, 10**6), size=st.integers(0, 2**40),
    sha256=st.one_of(st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64)),
    signature=st.text("0123456789abcdef", max_size=200))


@given(envelopes)
def test_every_valid_envelope_round_trips(envelope: Envelope) -> None:
    assert decode_envelope(envelope.encode()) == envelope


@given(st.binary(max_size=MAX_ENVELOPE_BYTES + 10))
@settings(max_examples=300)
def test_arbitrary_bytes_are_refused_as_malformed_and_nothing_else(data: bytes) -> None:
    try:
        decode_envelope(data)
    except ChannelRefusedError as exc:
        assert exc.reason is Refusal.MALFORMED


@pytest.mark.parametrize("change", [
    {"seq": -1}, {"size": "12"}, {"round": True}, {"kind": "shell"}, {"run_id": "a/../b"},
    {"sha256": "xyz"}, {"signature": "not hex"}, {"extra": 1}, {"site": ""}])
def test_wrong_types_unknown_fields_and_bad_values_are_refused(change: dict) -> None:
    raw = json.loads(Envelope(Kind.REPLY, "run1", "alpha", 1, 1, 10, "0" * 64).encode())
    raw.update(change)
    with pytest.raises(ChannelRefusedError) as caught:
        decode_envelope(json.dumps(raw).encode())
    assert caught.value.reason is Refusal.MALFORMED


def test_an_envelope_larger_than_its_cap_is_refused_unparsed() -> None:
    with pytest.raises(ChannelRefusedError, match="envelope of"):
        decode_envelope(b" " * (MAX_ENVELOPE_BYTES + 1))


def test_deeply_nested_json_is_refused_not_a_crash() -> None:
    with pytest.raises(ChannelRefusedError, match="not JSON"):
        decode_envelope(b"[" * 3000)


def _reply(seq: int, round_number: int, **change: object) -> Envelope:
    fields = {"kind": Kind.REPLY, "run_id": "run1", "site": "alpha", "seq": seq,
              "round": round_number, "size": 10, "sha256": "0" * 64, **change}
    return Envelope(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("envelope", "owed", "answered", "reason"), [
    (_reply(3, 2), Owed(3, 2), 2, None),
    (_reply(2, 1), Owed(3, 2), 2, Refusal.REPLAY),  # an earlier round's answer
    (_reply(3, 1), Owed(3, 2), 2, Refusal.REPLAY),  # renumbered, but its round gives it away
    (_reply(3, 2), None, 3, Refusal.REPLAY),  # already answered
    (_reply(4, 2), Owed(3, 2), 2, Refusal.UNEXPECTED),  # a future instruction
    (_reply(3, 2), Owed(3, 2, expired=True), 3, Refusal.LATE),
    (_reply(3, 2, kind=Kind.READY), Owed(3, 2), 2, Refusal.MALFORMED),
])
def test_a_reply_must_answer_the_instruction_owed(envelope: Envelope, owed: Owed | None,
                                                  answered: int,
                                                  reason: Refusal | None) -> None:
    if reason is None:
        check_reply(envelope, owed, answered=answered)
        return
    with pytest.raises(ChannelRefusedError) as caught:
        check_reply(envelope, owed, answered=answered)
    assert caught.value.reason is reason


@pytest.mark.parametrize(("change", "reason"), [
    ({"site": "beta"}, Refusal.WRONG_SITE), ({"run_id": "run0"}, Refusal.OTHER_RUN),
    ({"size": 4 * 10**9}, Refusal.TOO_LARGE)])
def test_every_envelope_names_its_certificate_site_this_run_and_a_size_under_the_cap(
        change: dict, reason: Refusal) -> None:
    with pytest.raises(ChannelRefusedError) as caught:
        check_envelope(_reply(1, 1, **change), peer_site="alpha", run_id="run1",
                       max_bytes=1 << 20)
    assert caught.value.reason is reason


@given(st.binary(max_size=5000), st.integers(1, 700))
def test_any_chunking_rebuilds_exactly_the_declared_bytes(data: bytes, size: int) -> None:
    envelope = _reply(1, 1, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assembler = ChunkAssembler(envelope)
    for piece in chunks(data, size):
        assert len(piece) <= size
        assembler.add(piece)
    assert assembler.finish() == data


@given(st.binary(min_size=1, max_size=2000))
def test_more_fewer_or_other_bytes_than_declared_are_refused(data: bytes) -> None:
    envelope = _reply(1, 1, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    more = ChunkAssembler(envelope)
    more.add(data)
    with pytest.raises(ChannelRefusedError) as caught:
        more.add(b"x")
    assert caught.value.reason is Refusal.TOO_LARGE
    fewer = ChunkAssembler(envelope)
    fewer.add(data[:-1])
    with pytest.raises(ChannelRefusedError) as caught:
        fewer.finish()
    assert caught.value.reason is Refusal.TRUNCATED
    other = ChunkAssembler(envelope)
    other.add(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(ChannelRefusedError) as caught:
        other.finish()
    assert caught.value.reason is Refusal.BAD_HASH
