"""The federation messages: bytes round trips, refusals that name the site, noisy histograms
only (protocol version 3: the audit releases the loss-threshold attack alone)."""

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
from fl_core.federation.messages import (
    AUDIT_ATTACKS,
    AUDIT_BINS,
    FRAME,
    HISTOGRAM_BINS,
    PROTOCOL_VERSION,
)
from fl_core.model.metrics import histogram_auc, roc_auc
from fl_core.privacy.randomness import SeededRandom
from fl_core.privacy.release import EvaluationRelease

EXACT = EvaluationRelease(bins=4096, noise=0.0)  # a non-private run's release

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
    patients = torch.randint(0, max(n, 1), (n,), generator=g)  # some with several records
    release = EvaluationRelease(bins=draw(st.sampled_from([2, 8, 256, HISTOGRAM_BINS])),
                                noise=draw(st.sampled_from([0.0, 0.5, 3.0])))
    return EvaluateReply.from_logits(draw(names), draw(rounds), logits, labels, patients,
                                     release=release, random=SeededRandom(draw(rounds)))


@st.composite
def audit_replies(draw: st.DrawFn) -> AuditReply:
    members, non_members = draw(st.integers(0, 300)), draw(st.integers(0, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scores = {a: (torch.rand(members, generator=g), torch.rand(non_members, generator=g) ** 2)
              for a in AUDIT_ATTACKS}
    return AuditReply.from_unit_scores(draw(names), draw(rounds), scores,
                                       bins=draw(st.sampled_from([1, 8, AUDIT_BINS])),
                                       noise=draw(st.sampled_from([0.0, 2.0])),
                                       random=SeededRandom(draw(rounds)))


messages = st.one_of(
    st.builds(FitInstruction, names, rounds, st.binary(max_size=300), st.integers(1, 100)),
    st.builds(FitReply, names, rounds, st.binary(max_size=300), counts,
              st.one_of(st.none(), finite), st.one_of(st.none(), finite), counts),
    st.builds(Failure, names, rounds, st.text(max_size=200)),
    st.builds(EvaluateInstruction, names, rounds, st.binary(max_size=300)),
    evaluate_replies(),
    st.builds(AuditInstruction, names, rounds, st.binary(max_size=300)),
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
    body = FRAME.pack(b"FPMS", PROTOCOL_VERSION, kind, 0, len(meta), len(blob)) + meta + blob
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(("kind", "meta", "blob", "why"), [
    (2, b'{"site":"A","round":1,"num_patients":true,"train_loss":0.1,"epsilon":null,'
        b'"dp_steps":1}', b"x", "field 'num_patients' has type bool"),
    (2, b'{"site":"A","round":1}', b"", "FitReply fields"),
    (2, b"\x80\x04\x95", b"", "not JSON"),  # a pickle where JSON belongs
    (2, b"[1, 2]", b"", "not a JSON object"),
    (4, b'{"site":"A","round":1,"reason":"x"}', b"blob", "carries no binary field"),
    (3, b'{"site":"A","round":1,"noise":1.0,"bins":1000000000}', b"\x00" * 16,
     "do not hold 2 × 1000000000"),
    (3, b'{"site":"A","round":1,"noise":1.0,"bins":2}', struct.pack("<3d", 1, 2, 3),
     "do not hold 2 × 2 float64"),
    (3, b'{"site":"A","round":1,"noise":-1.0,"bins":1}', struct.pack("<2d", 1, 2), "noise="),
    (3, b'{"site":"A","round":1,"noise":0,"bins":1}', struct.pack("<2d", -1, 2),
     "exact histogram .* negative"),
    (3, b'{"site":"A","round":1,"noise":1,"bins":1}', struct.pack("<2d", float("nan"), 2),
     "non-finite"),
    (3, b'{"site":"A","round":1,"noise":1e999,"bins":1}', struct.pack("<2d", 1, 2),
     "infinite"),
    # version 1's exact fields have no place in a version-2 reply
    (3, b'{"site":"A","round":1,"noise":1.0,"count":5,"bins":1}', struct.pack("<2d", 1, 2),
     "EvaluateReply fields"),
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
    forged = FRAME.pack(b"FPMS", PROTOCOL_VERSION, 2, 0, 10, 4_000_000_000) + b"\x00" * 8
    with pytest.raises(MessageError, match="declared sizes .* do not match the 24 bytes"):
        decode_message(forged, site="A")


def test_evaluation_reply_size_does_not_grow_with_patients_and_holds_no_scores() -> None:
    sizes = set()
    for n in (10, 1_000, 100_000):
        logits = torch.linspace(-4, 4, n)
        labels = (torch.arange(n) % 3 == 0).float()
        reply = EvaluateReply.from_logits("A", 1, logits, labels, torch.arange(n),
                                          release=EvaluationRelease(), random=SeededRandom(n))
        data = encode_message(reply)
        sizes.add(len(data))
        assert logits[:4].numpy().astype("<f4").tobytes() not in data
    assert len(sizes) == 1 and sizes.pop() < 2 * 8 * HISTOGRAM_BINS + 200


def test_an_old_version_exact_evaluation_is_refused() -> None:
    """Version 1 carried exact counts; a site still speaking it is refused, not merged."""
    old = _forge(3, b'{"site":"A","round":1,"loss_sum":1.0,"count":1,"confusion":[1,0,0,0],'
                 b'"bins":1}', struct.pack("<II", 0, 1))
    old = old[:4] + bytes([1]) + old[5:-4]
    old += struct.pack("<I", zlib.crc32(old))
    with pytest.raises(MessageError, match="protocol version 1"):
        decode_message(old, site="A")


def test_exact_histogram_auc_matches_the_exact_auc_within_0_005() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 40 + 10 * trial
        labels = (torch.rand(n, generator=g) < 0.45).float()
        logits = labels * (0.2 + trial / 10) + torch.randn(n, generator=g) * 1.5
        merged = sum(EvaluateReply.from_logits(s, 1, logits[i::4], labels[i::4],
                                               torch.arange(n)[i::4], release=EXACT,
                                               random=None).histogram
                     for i, s in enumerate("ABCD"))
        assert histogram_auc(merged) == pytest.approx(roc_auc(logits, labels), abs=0.005)
    # a coarse histogram (two bins) has little power: most pairs are ties
    two = EvaluateReply.from_logits("A", 1, logits, labels, torch.arange(n),
                                    release=EvaluationRelease(bins=2, noise=0.0), random=None)
    assert abs(histogram_auc(two.histogram) - 0.5) < abs(roc_auc(logits, labels) - 0.5)


def test_figures_of_an_exact_histogram_match_the_predictions() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    reply = EvaluateReply.from_logits("A", 1, logits, labels, torch.arange(5),
                                      release=EvaluationRelease(noise=0.0), random=None)
    figures = reply.figures()
    # at probability 0.5 (a bin edge); logit 0 → p = 0.5 falls in the upper half, as ≥ 0.5
    assert figures.confusion == (1, 2, 1, 1)
    assert figures.count == 5 and float(reply.histogram.sum()) == 5
    assert figures.loss_sum > 0


def test_a_patient_weighs_one_whatever_its_records() -> None:
    logits = torch.tensor([3.0, 3.0, 3.0, -3.0])
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])
    reply = EvaluateReply.from_logits("A", 1, logits, labels, torch.tensor([7, 7, 7, 8]),
                                      release=EvaluationRelease(noise=0.0), random=None)
    assert float(reply.histogram[1].sum()) == pytest.approx(1.0)
    assert float(reply.histogram[0].sum()) == pytest.approx(1.0)


def test_a_noisy_release_needs_its_randomness_and_draws_from_it_only() -> None:
    logits, labels, ids = torch.zeros(4), torch.tensor([0.0, 1, 0, 1]), torch.arange(4)
    with pytest.raises(ValueError, match="randomness"):
        EvaluateReply.from_logits("A", 1, logits, labels, ids, release=EvaluationRelease(),
                                  random=None)
    torch.manual_seed(0)
    one = EvaluateReply.from_logits("A", 1, logits, labels, ids, release=EvaluationRelease(),
                                    random=SeededRandom(5))
    torch.manual_seed(1)  # torch's global generator plays no part
    two = EvaluateReply.from_logits("A", 1, logits, labels, ids, release=EvaluationRelease(),
                                    random=SeededRandom(5))
    assert one == two and not torch.equal(one.histogram, one.histogram.round())


# --- the membership-audit messages (sites mode) ---------------------------------------------------

def _audit_meta(members: int = 3, non_members: int = 2, bins: int = 2, site: str = "A",
                noise: float = 0.0) -> bytes:
    return (f'{{"site":"{site}","round":1,"members":{members},"non_members":{non_members},'
            f'"noise":{noise},"bins":{bins}}}').encode()


def _audit_blob(counts: list[float]) -> bytes:
    return struct.pack(f"<{len(counts)}d", *counts)


GOOD_AUDIT = [2, 1, 0, 2]  # [loss members, loss non-members] × 2 bins
NOISY_AUDIT = [3.4, -0.7, 1.1, 0.2]


def test_a_hand_built_audit_reply_decodes() -> None:
    reply = decode_message(_forge(7, _audit_meta(), _audit_blob(GOOD_AUDIT)), site="A")
    assert isinstance(reply, AuditReply)
    assert reply.members == 3 and reply.non_members == 2
    assert reply.histograms.tolist() == [[[2, 1], [0, 2]]]
    noisy = decode_message(_forge(7, _audit_meta(noise=2.0), _audit_blob(NOISY_AUDIT)),
                           site="A")
    assert isinstance(noisy, AuditReply) and noisy.histograms.flatten().tolist() == NOISY_AUDIT


@pytest.mark.parametrize(("meta", "blob", "why"), [
    (_audit_meta(), _audit_blob([2, 0, 0, 2]), "sum to .* not members 3"),
    (_audit_meta(), _audit_blob([2, 1, 0, 1]), "non-members 2"),
    (_audit_meta(), _audit_blob([4, -1, 0, 2]), "negative count"),
    (_audit_meta(noise=1.0), _audit_blob([4, float("inf"), 0, 2]), "non-finite"),
    (_audit_meta(noise=-1.0), _audit_blob(NOISY_AUDIT), "noise="),
    (_audit_meta(), _audit_blob(GOOD_AUDIT[:-1]), "do not hold 1 × 2 × 2 float64"),
    (_audit_meta(), _audit_blob(GOOD_AUDIT) + b"\x00", "do not hold"),
    (_audit_meta(bins=3), _audit_blob(GOOD_AUDIT), "do not hold 1 × 2 × 3"),
    (_audit_meta(bins=0), b"", "do not hold 1 × 2 × 0"),
    # version 2's shape, [loss_threshold, lira] × 2 populations × 2 bins: no LiRA row now
    (_audit_meta(), _audit_blob([3, 0, 1, 1, 2, 1, 0, 2]), "do not hold 1 × 2 × 2 float64"),
    (_audit_meta(bins=2**40), _audit_blob(GOOD_AUDIT), "do not hold"),
    (_audit_meta(members=-3, noise=1.0), _audit_blob(NOISY_AUDIT), "negative"),
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
    # version 2 asked the site to train shadow models (site-local LiRA): refused by name
    (b'{"site":"A","round":1,"shadow_models":4,"seed":0}', "AuditInstruction fields"),
    (b'{"site":"A","round":1,"shadow_models":4}', "AuditInstruction fields"),
    (b'{"site":"A","round":"1"}', "field 'round' has type str"),
])
def test_forged_audit_instructions_are_refused(meta: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        decode_message(_forge(6, meta, b"payload"), site="A")


def test_an_old_version_audit_reply_with_a_lira_row_is_refused() -> None:
    """Version 2's audit reply carried a site-local LiRA row (not releasable under DP): a site
    still speaking it is refused by its version, and its [2, 2, bins] histograms do not fit
    a version-3 reply (nor build one)."""
    two_attacks = _audit_blob([3, 0, 1, 1, 2, 1, 0, 2])
    old = _forge(7, _audit_meta(), two_attacks)
    old = old[:4] + bytes([2]) + old[5:-4]
    old += struct.pack("<I", zlib.crc32(old))
    with pytest.raises(MessageError, match="site 'A': protocol version 2, this build speaks 3"):
        decode_message(old, site="A")
    assert PROTOCOL_VERSION == 3 and AUDIT_ATTACKS == ("loss_threshold",)
    with pytest.raises(MessageError, match="do not hold 1 × 2 × 2"):
        decode_message(_forge(7, _audit_meta(), two_attacks), site="A")
    with pytest.raises(MessageError, match=r"shape \(2, 2, 2\), expected \(1, 2, 'bins'\)"):
        AuditReply("A", 1, 3, 2, 0.0, torch.tensor([3.0, 0, 1, 1, 2, 1, 0, 2],
                                                   dtype=torch.float64).view(2, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        AuditReply.from_unit_scores("A", 1, {a: (torch.tensor([0.5]), torch.tensor([0.2]))
                                             for a in ("loss_threshold", "lira")},
                                    noise=1.0, random=SeededRandom(0))


def test_audit_reply_refuses_to_build_inconsistent_histograms() -> None:
    ok = torch.tensor(GOOD_AUDIT, dtype=torch.float64).view(1, 2, 2)
    assert AuditReply("A", 1, 3, 2, 0.0, ok).histograms is ok
    with pytest.raises(MessageError, match="sum to"):
        AuditReply("A", 1, 4, 2, 0.0, ok)
    assert AuditReply("A", 1, 4, 2, 1.0, ok).members == 4  # noisy: sums need not match
    with pytest.raises(MessageError, match="shape"):
        AuditReply("A", 1, 3, 2, 0.0, ok[0])
    with pytest.raises(MessageError, match="dtype"):
        AuditReply("A", 1, 3, 2, 0.0, ok.long())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        AuditReply.from_unit_scores("A", 1, {a: (torch.tensor([1.5]), torch.tensor([0.2]))
                                             for a in AUDIT_ATTACKS}, noise=0.0, random=None)
    with pytest.raises(ValueError, match="expected"):
        AuditReply.from_unit_scores("A", 1, {"lira": (ok, ok)}, noise=0.0, random=None)
    with pytest.raises(ValueError, match="randomness"):
        AuditReply.from_unit_scores("A", 1, {a: (torch.tensor([0.5]), torch.tensor([0.2]))
                                             for a in AUDIT_ATTACKS}, noise=1.0, random=None)


def test_audit_reply_size_does_not_grow_with_patients() -> None:
    sizes = set()
    for n in (10, 1_000, 100_000):
        u = torch.linspace(0, 1, n)
        reply = AuditReply.from_unit_scores("A", 1, {a: (u, u.flip(0)[: n // 3])
                                                     for a in AUDIT_ATTACKS},
                                            noise=2.0, random=SeededRandom(n))
        sizes.add(len(encode_message(reply)) - len(str(n)) - len(str(n // 3)))
    assert len(sizes) == 1 and sizes.pop() < 2 * 8 * AUDIT_BINS + 200


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([3, 7]))
def test_garbage_under_a_valid_frame_is_refused_or_decodes_cleanly(junk: bytes, kind: int
                                                                   ) -> None:
    """Random bodies under a correct frame and checksum never crash the decoder: refused with
    a MessageError, or (a valid body by chance) decoded into a consistent reply."""
    cut = len(junk) // 2
    try:
        message = decode_message(_forge(kind, junk[:cut], junk[cut:]), site="A")
    except MessageError:
        return
    assert decode_message(encode_message(message), site="A") == message


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=2,
                max_size=2), st.floats(allow_nan=True, allow_infinity=True))
def test_hand_built_evaluation_replies_decode_only_when_finite(cells: list[float],
                                                               noise: float) -> None:
    data = _forge(3, f'{{"site":"A","round":1,"noise":{noise!r},"bins":1}}'.replace(
        "inf", "Infinity").replace("nan", "NaN").encode(), struct.pack("<2d", *cells))
    ok = (all(map(lambda c: c == c and abs(c) != float("inf"), cells))
          and noise == noise and abs(noise) != float("inf") and noise >= 0
          and (noise > 0 or min(cells) >= 0))
    if ok:
        reply = decode_message(data, site="A")
        assert isinstance(reply, EvaluateReply) and reply.histogram.tolist() == [[cells[0]],
                                                                                [cells[1]]]
    else:
        with pytest.raises(MessageError):
            decode_message(data, site="A")


def test_peek_reads_the_routing_fields_only_and_decode_still_checks_everything() -> None:
    """What the endpoint reads of a 40 MB reply: its kind, round and claimed site, without the
    blob; a corrupted blob passes the peek and is refused by the decoder."""
    from fl_core.federation.messages import FitReply, peek_message

    reply = encode_message(FitReply("A", 3, b"\x01" * 1000, 10, None, 1.0, 4))
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
