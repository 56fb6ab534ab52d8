"""The federation messages: bytes round trips, refusals that name the site, aggregates only."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.federation import (
    AuditInstruction,
    AuditReply,
    EvaluateInstruction,
    EvaluateReply,
    Failure,
    FitInstruction,
    FitReply,
    MessageError,
    decode_message,
    encode_message,
)
from fl_core.federation.messages import AUDIT_ATTACKS, AUDIT_BINS, FRAME, HISTOGRAM_BINS
from fl_core.model.metrics import histogram_auc, roc_auc

names = st.text(min_size=1, max_size=20)
rounds = st.integers(0, 10_000)
counts = st.integers(0, 2**31)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def evaluate_replies(draw: st.DrawFn) -> EvaluateReply:
    n = draw(st.integers(0, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    logits = torch.randn(n, generator=g) * draw(st.floats(0.1, 20))
    labels = (torch.rand(n, generator=g) < 0.4).float()
    return EvaluateReply.from_logits(draw(names), draw(rounds), logits, labels,
                                     bins=draw(st.sampled_from([8, 256, HISTOGRAM_BINS])))


@st.composite
def audit_replies(draw: st.DrawFn) -> AuditReply:
    members, non_members = draw(st.integers(0, 300)), draw(st.integers(0, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scores = {a: (torch.rand(members, generator=g), torch.rand(non_members, generator=g) ** 2)
              for a in AUDIT_ATTACKS}
    return AuditReply.from_unit_scores(draw(names), draw(rounds), scores,
                                       bins=draw(st.sampled_from([1, 8, AUDIT_BINS])))


messages = st.one_of(
    st.builds(FitInstruction, names, rounds, st.binary(max_size=300), st.integers(1, 100)),
    st.builds(FitReply, names, rounds, st.binary(max_size=300), counts, finite,
              st.one_of(st.none(), finite), counts),
    st.builds(Failure, names, rounds, st.text(max_size=200)),
    st.builds(EvaluateInstruction, names, rounds, st.binary(max_size=300)),
    evaluate_replies(),
    st.builds(AuditInstruction, names, rounds, st.binary(max_size=300), st.integers(2, 64),
              st.integers(-(2**62), 2**62)),
    audit_replies(),
)


@settings(max_examples=150, deadline=None)
@given(messages)
def test_every_message_round_trips_through_bytes(message: object) -> None:
    data = encode_message(message)  # type: ignore[arg-type]
    assert isinstance(data, bytes) and b"\x80\x04" not in data[:2]  # not a pickle
    assert decode_message(data) == message


def _reply() -> FitReply:
    return FitReply("Hungary", 3, b"\x01\x02\x03", 208, 0.61, 0.5, 12)


def test_corrupted_truncated_and_wrong_version_are_refused_naming_the_site() -> None:
    data = encode_message(_reply())
    flipped = bytearray(data)
    flipped[-7] ^= 0xFF
    with pytest.raises(MessageError, match="site 'Hungary': checksum mismatch"):
        decode_message(bytes(flipped), site="Hungary")
    with pytest.raises(MessageError, match="site 'Hungary': (declared sizes|truncated)"):
        decode_message(data[:-3], site="Hungary")
    future = bytearray(data)
    future[4] = 9
    future[-4:] = struct.pack("<I", zlib.crc32(bytes(future[:-4])))
    with pytest.raises(MessageError, match="site 'Hungary': protocol version 9"):
        decode_message(bytes(future), site="Hungary")
    with pytest.raises(MessageError, match="site 'Hungary': a NoneType, not bytes"):
        decode_message(None, site="Hungary")  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="claims to come from site 'Hungary'"):
        decode_message(data, site="Cleveland")
    with pytest.raises(MessageError, match="unexpected FitReply"):
        decode_message(data, site="Hungary", expect=EvaluateReply)


def _forge(kind: int, meta: bytes, blob: bytes = b"") -> bytes:
    body = FRAME.pack(b"FPMS", 1, kind, 0, len(meta), len(blob)) + meta + blob
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(("kind", "meta", "blob", "why"), [
    (2, b'{"site":"A","round":1,"num_patients":true,"train_loss":0.1,"epsilon":null,'
        b'"dp_steps":1}', b"x", "field 'num_patients' has type bool"),
    (2, b'{"site":"A","round":1}', b"", "FitReply fields"),
    (2, b"\x80\x04\x95", b"", "not JSON"),  # a pickle where JSON belongs
    (2, b"[1, 2]", b"", "not a JSON object"),
    (4, b'{"site":"A","round":1,"reason":"x"}', b"blob", "carries no binary field"),
    (3, b'{"site":"A","round":1,"loss_sum":1.0,"count":5,"confusion":[1,1,1,2],'
        b'"bins":1000000000}', b"\x00" * 8, "does not hold 2 × 1000000000"),
    (3, b'{"site":"A","round":1,"loss_sum":1.0,"count":5,"confusion":[1,1,1,1],'
        b'"bins":1}', struct.pack("<II", 2, 3), "disagree"),
    (9, b"{}", b"", "unknown message kind 9"),
    (4, b"[" * 3000, b"", "nested too deep"),  # past the JSON parser's recursion limit
    (2, b'{"site":"A","round":1,"num_patients":1,"train_loss":1e999,"epsilon":null,'
        b'"dp_steps":1}', b"", "infinite"),
])
def test_forged_bodies_with_valid_checksums_are_refused(
    kind: int, meta: bytes, blob: bytes, why: str
) -> None:
    with pytest.raises(MessageError, match=why):
        decode_message(_forge(kind, meta, blob), site="A")


def test_a_tiny_header_claiming_a_huge_body_is_refused_before_allocating() -> None:
    forged = FRAME.pack(b"FPMS", 1, 2, 0, 10, 4_000_000_000) + b"\x00" * 8
    with pytest.raises(MessageError, match="declared sizes .* do not match the 24 bytes"):
        decode_message(forged, site="A")


def test_evaluation_reply_size_does_not_grow_with_patients_and_holds_no_scores() -> None:
    sizes = []
    for n in (10, 1_000, 100_000):
        logits = torch.linspace(-4, 4, n)
        labels = (torch.arange(n) % 3 == 0).float()
        data = encode_message(EvaluateReply.from_logits("A", 1, logits, labels))
        sizes.append(len(data))
        assert logits[:4].numpy().astype("<f4").tobytes() not in data
    # only the digits of the count and loss sum in the metadata change (n grew 10^4-fold)
    assert max(sizes) - min(sizes) <= 24 and max(sizes) < 2 * 4 * HISTOGRAM_BINS + 200


def test_histogram_auc_matches_the_exact_auc_within_0_005() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 40 + 10 * trial
        labels = (torch.rand(n, generator=g) < 0.45).float()
        logits = labels * (0.2 + trial / 10) + torch.randn(n, generator=g) * 1.5
        merged = sum(EvaluateReply.from_logits(s, 1, logits[i::4], labels[i::4]).histogram
                     for i, s in enumerate("ABCD"))
        assert histogram_auc(merged) == pytest.approx(roc_auc(logits, labels), abs=0.005)
    # a coarse histogram (one bin) has no power: every pair is a tie
    one_bin = EvaluateReply.from_logits("A", 1, logits, labels, bins=1).histogram
    assert histogram_auc(one_bin) == 0.5


def test_confusion_counts_match_the_predictions() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    reply = EvaluateReply.from_logits("A", 1, logits, labels)
    assert reply.confusion == (1, 1, 2, 1)  # tp, fp, tn, fn at logit > 0
    assert reply.count == 5 and int(reply.histogram.sum()) == 5
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    assert reply.loss_sum == pytest.approx(float(expected))


# --- the membership-audit messages (sites mode) ---------------------------------------------------

def _audit_meta(members: int = 3, non_members: int = 2, bins: int = 2, site: str = "A") -> bytes:
    return (f'{{"site":"{site}","round":1,"members":{members},"non_members":{non_members},'
            f'"bins":{bins}}}').encode()


def _audit_blob(counts: list[int]) -> bytes:
    return struct.pack(f"<{len(counts)}i", *counts)


GOOD_AUDIT = [3, 0, 1, 1, 2, 1, 0, 2]  # [loss members, loss non-members, lira ..] × 2 bins


def test_a_hand_built_audit_reply_decodes() -> None:
    reply = decode_message(_forge(7, _audit_meta(), _audit_blob(GOOD_AUDIT)), site="A")
    assert isinstance(reply, AuditReply)
    assert reply.members == 3 and reply.non_members == 2
    assert reply.histograms.tolist() == [[[3, 0], [1, 1]], [[2, 1], [0, 2]]]


@pytest.mark.parametrize(("meta", "blob", "why"), [
    (_audit_meta(), _audit_blob([2, 0, 1, 1, 2, 1, 0, 2]), "sum to .* not members 3"),
    (_audit_meta(), _audit_blob([3, 0, 1, 1, 2, 1, 0, 1]), "non-members 2"),
    (_audit_meta(), _audit_blob([4, -1, 1, 1, 2, 1, 0, 2]), "negative count"),
    (_audit_meta(), _audit_blob(GOOD_AUDIT[:-1]), "do not hold 2 × 2 × 2 int32"),
    (_audit_meta(), _audit_blob(GOOD_AUDIT) + b"\x00", "do not hold"),
    (_audit_meta(bins=3), _audit_blob(GOOD_AUDIT), "do not hold 2 × 2 × 3"),
    (_audit_meta(bins=0), b"", "do not hold 2 × 2 × 0"),
    (_audit_meta(bins=2**40), _audit_blob(GOOD_AUDIT), "do not hold"),
    (_audit_meta(members=-3), _audit_blob([-3, 0, 1, 1, -3, 0, 0, 2]), "negative"),
    (_audit_meta().replace(b'"members":3', b'"members":3.0'), _audit_blob(GOOD_AUDIT),
     "field 'members' has type float"),
    (_audit_meta().replace(b'"members":3', b'"members":true'), _audit_blob(GOOD_AUDIT),
     "field 'members' has type bool"),
    (_audit_meta().replace(b',"bins":2', b""), _audit_blob(GOOD_AUDIT), "AuditReply fields"),
    (_audit_meta().replace(b"}", b',"scores":[0.1]}'), _audit_blob(GOOD_AUDIT),
     "AuditReply fields"),  # a per-patient field has no place in the reply
    (_audit_meta().replace(b"}", b',"members":9}'), _audit_blob(GOOD_AUDIT),
     "sum to .* not members 9"),  # JSON's last duplicate wins; it must still add up
])
def test_forged_audit_replies_are_refused(meta: bytes, blob: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why) as refused:
        decode_message(_forge(7, meta, blob), site="A")
    assert str(refused.value).startswith("message from site 'A': ")


@pytest.mark.parametrize(("meta", "why"), [
    (b'{"site":"A","round":1,"shadow_models":1,"seed":0}', "shadow_models=1"),
    (b'{"site":"A","round":1,"shadow_models":4,"seed":0.5}', "field 'seed' has type float"),
    (b'{"site":"A","round":1,"shadow_models":4}', "AuditInstruction fields"),
    (b'{"site":"A","round":1,"shadow_models":"4","seed":0}', "'shadow_models' has type str"),
])
def test_forged_audit_instructions_are_refused(meta: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        decode_message(_forge(6, meta, b"payload"), site="A")


def test_audit_reply_refuses_to_build_or_send_inconsistent_histograms() -> None:
    ok = torch.tensor(GOOD_AUDIT).view(2, 2, 2)
    assert AuditReply("A", 1, 3, 2, ok).histograms is ok
    with pytest.raises(MessageError, match="sum to"):
        AuditReply("A", 1, 4, 2, ok)
    with pytest.raises(MessageError, match="shape"):
        AuditReply("A", 1, 3, 2, ok[:1])
    with pytest.raises(MessageError, match="dtype"):
        AuditReply("A", 1, 3, 2, ok.double())
    huge = torch.zeros(2, 2, 1, dtype=torch.int64)
    huge[:, 0] = 2**31
    with pytest.raises(MessageError, match="exceeds 2"):
        encode_message(AuditReply("A", 1, 2**31, 0, huge))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        AuditReply.from_unit_scores("A", 1, {a: (torch.tensor([1.5]), torch.tensor([0.2]))
                                             for a in AUDIT_ATTACKS})
    with pytest.raises(ValueError, match="expected"):
        AuditReply.from_unit_scores("A", 1, {"loss_threshold": (ok, ok)})


def test_audit_reply_size_does_not_grow_with_patients() -> None:
    sizes = set()
    for n in (10, 1_000, 100_000):
        u = torch.linspace(0, 1, n)
        reply = AuditReply.from_unit_scores("A", 1, {a: (u, u.flip(0)[: n // 3])
                                                     for a in AUDIT_ATTACKS})
        sizes.add(len(encode_message(reply)) - len(str(n)) - len(str(n // 3)))
    assert len(sizes) == 1 and sizes.pop() < 4 * 4 * AUDIT_BINS + 200


def test_peek_reads_the_routing_fields_only_and_decode_still_checks_everything() -> None:
    """What the endpoint reads of a 40 MB reply: its kind, round and claimed site, without the
    blob; a corrupted blob passes the peek and is refused by the decoder."""
    from fl_core.federation.messages import FitReply, peek_message

    reply = encode_message(FitReply("A", 3, b"\x01" * 1000, 10, 0.5, 1.0, 4))
    cls, meta = peek_message(reply, site="A")
    assert cls is FitReply and meta["round"] == 3 and meta["site"] == "A"
    with pytest.raises(MessageError, match="claims to come from site 'A'"):
        peek_message(reply, site="B")
    corrupted = reply[:-10] + b"\x00" + reply[-9:]
    assert peek_message(corrupted, site="A")[1]["round"] == 3
    with pytest.raises(MessageError, match="checksum"):
        decode_message(corrupted, site="A")
    with pytest.raises(MessageError, match="bad magic"):
        peek_message(b"\x80\x04" + b"\x00" * 40)
