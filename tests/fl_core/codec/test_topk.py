"""Top-k + b-bit codec, error feedback and the downlink: properties, not examples."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_core.codec.dense import DenseCodec, dense_size
from fl_core.codec.downlink import ModelBroadcast, ModelReplica
from fl_core.codec.error_feedback import ErrorFeedback, UpdateCompressor, warmup_density
from fl_core.codec.framing import FRAME_BYTES, HEADER, PayloadError
from fl_core.codec.payload import decode_payload
from fl_core.codec.rice import pack_fixed, rice_decode, rice_encode, unpack_fixed
from fl_core.codec.topk import TOPK_HEAD, TopKQuantizer

finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                     width=32).map(lambda v: 0.0 if abs(v) < 1e-20 else v)
vectors = st.lists(finite32, min_size=1, max_size=3000).map(
    lambda v: torch.tensor(v, dtype=torch.float32))
codecs = st.builds(
    TopKQuantizer,
    ratio=st.floats(0.001, 1.0),
    bits=st.integers(2, 8),
    chunk_size=st.sampled_from([0, 1, 7, 64, 1024]),
    stochastic=st.booleans(),
    seed=st.integers(0, 2**31),
)
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def scales_of(kept: torch.Tensor, chunk: int, levels: int) -> torch.Tensor:
    """Each kept value's scale, recomputed independently of the codec."""
    size = chunk if chunk and chunk < kept.numel() else kept.numel()
    out = torch.empty_like(kept)
    for start in range(0, kept.numel(), size):
        block = kept[start : start + size]
        out[start : start + size] = block.abs().max() / levels
    return out


@SETTINGS
@given(x=vectors, codec=codecs)
def test_decode_keeps_exactly_the_top_k_support(x: torch.Tensor, codec: TopKQuantizer) -> None:
    payload = codec.encode(x)
    n, indices, values, _ = codec.decode_sparse(payload)
    k = codec.kept(x.numel())
    assert n == x.numel() and indices.size == k == values.numel()
    assert np.all(np.diff(indices) > 0)  # sorted, no duplicates
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(indices)] = True
    # every kept magnitude is at least every dropped one: the top-k, ties broken either way
    if 0 < k < n:
        assert x.abs()[mask].min() >= x.abs()[~mask].max()
    decoded = codec.decode(payload)
    assert torch.all(decoded[~mask] == 0)


@SETTINGS
@given(x=vectors, codec=codecs)
def test_kept_values_within_quantization_bound(x: torch.Tensor, codec: TopKQuantizer) -> None:
    payload = codec.encode(x)
    _, indices, values, _ = codec.decode_sparse(payload)
    kept = x[torch.from_numpy(indices)]
    scale = scales_of(kept, codec.chunk_size, codec.levels)
    error = (kept - values).abs()
    # deterministic rounding: half a step; stochastic: under one step (plus float32 rounding)
    bound = scale * (1.0 if codec.stochastic else 0.5) * (1 + 1e-5) + kept.abs() * 1e-6
    assert torch.all(error <= bound), (error - bound).max()


def topk_payload_size(n: int, k: int, bits: int, chunk: int, index_bytes: int,
                      ndim: int = 1) -> int:
    """The documented length of a top-k payload (fl_core.codec.topk's docstring), frame
    included."""
    n_scales = math.ceil(k / chunk) if chunk else int(k > 0)
    return (FRAME_BYTES + TOPK_HEAD.size + 4 * ndim + 4 * n_scales + index_bytes
            + math.ceil(k * bits / 8))


@SETTINGS
@given(x=vectors, codec=codecs)
def test_payload_length_is_as_documented(x: torch.Tensor, codec: TopKQuantizer) -> None:
    payload = codec.encode(x)
    n, k = x.numel(), codec.kept(x.numel())
    bits, coding, r, ndim, k_header, chunk = TOPK_HEAD.unpack_from(payload, HEADER.size)
    assert (bits, ndim, k_header) == (codec.bits, 1, k)
    assert chunk == (codec.chunk_size if codec.chunk_size and codec.chunk_size < k else 0)
    _, indices, _, _ = codec.decode_sparse(payload)
    gaps = np.diff(indices, prepend=-1) - 1
    rice = math.ceil((int((gaps >> r).sum()) + k) / 8) + math.ceil(k * r / 8)
    bitmap = math.ceil(n / 8)
    index_bytes = bitmap if coding == 0 else rice
    assert index_bytes <= bitmap  # the cheaper coding was chosen
    assert len(payload) == topk_payload_size(n, k, bits, chunk, index_bytes)
    assert len(payload) == (FRAME_BYTES + 12 + 4 + 4 * (math.ceil(k / chunk) if chunk else 1)
                            + index_bytes + math.ceil(k * bits / 8))


@st.composite
def update_sequences(draw) -> list[torch.Tensor]:
    n = draw(st.integers(2, 500))
    steps = draw(st.lists(st.lists(finite32, min_size=n, max_size=n), min_size=1, max_size=4))
    return [torch.tensor(s, dtype=torch.float32) for s in steps]


@pytest.mark.slow
@SETTINGS
@given(steps=update_sequences(), codec=codecs, momentum=st.sampled_from([0.0, 0.9]))
def test_residual_plus_reconstruction_is_the_input(
    steps: list[torch.Tensor], codec: TopKQuantizer, momentum: float
) -> None:
    ef = ErrorFeedback(codec, momentum=momentum)
    velocity = torch.zeros_like(steps[0])
    residual = torch.zeros_like(steps[0])
    for x in steps:
        velocity = momentum * velocity + x
        accumulated = residual + velocity
        reconstruction = codec.decode(ef.compress(x))
        assert ef.residual is not None
        if codec.stochastic:
            assert torch.allclose(ef.residual + reconstruction, accumulated, rtol=1e-5, atol=1e-3)
        else:
            # exact: a reconstructed value is 0 or within a factor 2 of the input (Sterbenz)
            assert torch.equal(ef.residual + reconstruction, accumulated)
        residual = ef.residual
        velocity = torch.where(reconstruction != 0, 0.0, velocity)


@SETTINGS
@given(x=vectors, codec=codecs, data=st.data())
def test_random_corruptions_are_detected(x: torch.Tensor, codec: TopKQuantizer, data) -> None:
    payload = codec.encode(x)
    position = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    corrupted = bytearray(payload)
    corrupted[position] ^= flip
    with pytest.raises(PayloadError):
        codec.decode(bytes(corrupted))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(PayloadError):
        codec.decode(payload[:cut])
    with pytest.raises(PayloadError):
        codec.decode(payload + data.draw(st.binary(min_size=1, max_size=8)))


def test_wrong_version_and_wrong_codec_are_named() -> None:
    payload = bytearray(TopKQuantizer(0.5).encode(torch.arange(10.0)))
    payload[4] = 2
    payload[-4:] = struct.pack("<I", zlib.crc32(bytes(payload[:-4])))
    with pytest.raises(PayloadError, match="version 2"):
        decode_payload(bytes(payload))
    with pytest.raises(PayloadError, match="codec 1"):
        DenseCodec().decode(TopKQuantizer(0.5).encode(torch.arange(10.0)))


def test_crc_valid_but_inconsistent_body_is_refused() -> None:
    # a forged payload with a correct checksum must still not decode to garbage
    good = TopKQuantizer(0.3).encode(torch.arange(100.0))
    body = bytearray(good[HEADER.size:-4])
    body[4:8] = struct.pack("<I", 200)  # k larger than n
    forged = good[:HEADER.size] + bytes(body)
    forged += struct.pack("<I", zlib.crc32(forged))
    with pytest.raises(PayloadError, match="keeps 200 of 100"):
        decode_payload(forged)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_update_is_refused_before_sending(bad: float) -> None:
    x = torch.tensor([1.0, bad, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        TopKQuantizer(0.5).encode(x)
    with pytest.raises(ValueError, match="non-finite"):
        ErrorFeedback(TopKQuantizer(0.5)).compress(x)


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.integers(0, 10**6), min_size=1, max_size=500), r=st.integers(0, 20))
def test_rice_streams_round_trip(gaps: list[int], r: int) -> None:
    g = np.array(gaps, dtype=np.int64)
    unary, remainders = rice_encode(g, r)
    assert np.array_equal(rice_decode(unary, remainders, len(gaps), r), g)


@settings(max_examples=100, deadline=None)
@given(width=st.integers(1, 8), data=st.data())
def test_fixed_width_packing_round_trips(width: int, data) -> None:
    values = np.array(data.draw(st.lists(st.integers(0, 2**width - 1), max_size=300)),
                      dtype=np.int64)
    packed = pack_fixed(values, width)
    assert len(packed) == math.ceil(values.size * width / 8)
    assert np.array_equal(unpack_fixed(packed, values.size, width), values)


@pytest.mark.parametrize(("density", "bound"), [(0.1, 25.2), (0.01, 199.0)])
def test_ratio_reaches_ninety_percent_of_the_entropy_bound(density: float, bound: float) -> None:
    # 32 / (p·b + H(p)) is the best any coding of a random support can do
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    payload = TopKQuantizer(density, 8).encode(x)
    ratio = dense_size(x.numel()) / len(payload)
    assert ratio >= 0.9 * bound, ratio


def test_dense_payload_at_full_density_falls_back_to_a_bitmap() -> None:
    x = torch.randn(1000)
    codec = TopKQuantizer(1.0, 8)
    payload = codec.encode(x)
    assert TOPK_HEAD.unpack_from(payload, HEADER.size)[1] == 0  # bitmap
    assert torch.allclose(codec.decode(payload), x, atol=float(x.abs().max()) / 127 / 2 + 1e-6)


def test_all_zero_update_round_trips() -> None:
    codec = TopKQuantizer(0.1, 4)
    assert torch.equal(codec.decode(codec.encode(torch.zeros(50))), torch.zeros(50))


def test_error_feedback_eventually_sends_everything() -> None:
    # a constant update at 10 % density: without feedback 90 % of it is never sent
    x = torch.linspace(1.0, 2.0, 100)
    ef = ErrorFeedback(TopKQuantizer(0.1, 8))
    plain = TopKQuantizer(0.1, 8)
    sent_ef = sum(TopKQuantizer().decode(ef.compress(x)) for _ in range(50))
    sent_plain = sum(plain.decode(plain.encode(x)) for _ in range(50))
    assert torch.allclose(sent_ef / 50, x, rtol=0.25)
    assert int((sent_plain == 0).sum()) == 90


def test_warmup_density_schedule() -> None:
    assert [round(warmup_density(0.01, t, 3), 4) for t in (1, 2, 3, 4, 9)] == \
        [0.3162, 0.1, 0.0316, 0.01, 0.01]
    assert warmup_density(0.1, 1, 0) == 0.1


def test_update_compressor_uses_warmup_density() -> None:
    comp = UpdateCompressor(TopKQuantizer(0.01, 8), warmup_rounds=1)
    x = torch.randn(10_000)
    first = comp.compress(x, 1)
    later = comp.compress(x, 2)
    assert TOPK_HEAD.unpack_from(first, HEADER.size)[4] == 1000  # 0.01^(1/2) = 10 %
    assert TOPK_HEAD.unpack_from(later, HEADER.size)[4] == 100


def test_broadcast_sends_full_model_then_deltas_that_replicas_follow() -> None:
    server = ModelBroadcast(TopKQuantizer(0.2, 8))
    clients = [ModelReplica(), ModelReplica()]
    params = torch.randn(500)
    sizes = []
    for _ in range(30):
        payload = server.payload(params)
        sizes.append(len(payload))
        held = [c.apply(payload) for c in clients]
        assert torch.equal(held[0], held[1]) and torch.equal(held[0], server.replica)
        params = params + 0.01 * torch.randn(500)
    assert sizes[0] == dense_size(500) and max(sizes[1:]) < dense_size(500) / 4
    # the difference the downlink has not yet delivered stays bounded
    assert float((params - server.replica).abs().max()) < 0.2


def test_replica_refuses_a_delta_before_the_model() -> None:
    delta = TopKQuantizer(0.5).encode(torch.ones(4))
    with pytest.raises(PayloadError, match="before the full model"):
        ModelReplica().apply(delta)
