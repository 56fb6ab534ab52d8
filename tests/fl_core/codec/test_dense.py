import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.codec.dense import DenseCodec, dense_size
from fl_core.codec.framing import MAGIC, VERSION, PayloadError, read_header
from fl_core.robust.aggregators import fedavg

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@given(st.lists(finite, min_size=0, max_size=300))
def test_dense_roundtrip_exact_and_sized(values: list[float]) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    payload = DenseCodec().encode(t)
    assert len(payload) == dense_size(len(values))
    assert torch.equal(DenseCodec().decode(payload), t)


@settings(max_examples=200)
@given(st.lists(finite, min_size=1, max_size=50), st.data())
def test_any_single_corruption_is_detected(values: list[float], data: st.DataObject) -> None:
    payload = bytearray(DenseCodec().encode(torch.tensor(values)))
    pos = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    payload[pos] ^= flip
    with pytest.raises(PayloadError):
        DenseCodec().decode(bytes(payload))


@given(st.lists(finite, min_size=1, max_size=50), st.data())
def test_truncation_is_detected(values: list[float], data: st.DataObject) -> None:
    payload = DenseCodec().encode(torch.tensor(values))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(PayloadError):
        DenseCodec().decode(payload[:cut])


def test_wrong_version_is_named() -> None:
    payload = bytearray(DenseCodec().encode(torch.ones(3)))
    payload[4] = 9  # version byte
    body = bytes(payload[:-4])
    forged = body + struct.pack("<I", zlib.crc32(body))  # valid CRC, wrong version
    with pytest.raises(PayloadError, match="version 9"):
        DenseCodec().decode(forged)


def test_header_declares_what_was_encoded() -> None:
    """The header carries the magic, version, codec and element count of the payload, the
    body is the float32 values and the trailer the CRC32 of everything before it."""
    values = torch.tensor([1.5, -2.0, 3.25])
    payload = DenseCodec().encode(values)
    assert payload.startswith(MAGIC)
    codec, n, body = read_header(payload)
    assert (codec, n) == (DenseCodec.codec_id, 3)
    assert bytes(body) == struct.pack("<3f", 1.5, -2.0, 3.25)
    assert payload[-4:] == struct.pack("<I", zlib.crc32(payload[:-4]))
    # the header's own bytes are what lie between the magic and the body
    assert payload[len(MAGIC)] == VERSION


def test_a_truncated_header_is_refused_naming_why() -> None:
    payload = DenseCodec().encode(torch.ones(3))
    header_and_trailer = len(payload) - 4 * 3
    with pytest.raises(PayloadError, match=rf"payload truncated: 5 bytes, header alone needs "
                                           rf"{header_and_trailer}"):
        read_header(payload[:5])
    with pytest.raises(PayloadError, match="bad magic b'XPRV'"):
        read_header(b"X" + payload[1:])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_update_refused_at_encode(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        DenseCodec().encode(torch.tensor([1.0, bad]))


@given(st.integers(1, 8), st.integers(1, 20), st.data())
def test_fedavg_matches_reference_and_is_permutation_invariant(
    n: int, d: int, data: st.DataObject
) -> None:
    updates = torch.tensor(data.draw(st.lists(st.lists(st.floats(-100, 100), min_size=d,
                                                       max_size=d), min_size=n, max_size=n)))
    weights = torch.tensor(data.draw(st.lists(st.floats(0.1, 50), min_size=n, max_size=n)))
    ref = sum(w * u for w, u in zip(weights, updates, strict=True)) / weights.sum()
    got = fedavg(updates, weights)
    assert torch.allclose(got.aggregate, ref, atol=1e-3, rtol=1e-4)
    assert got.selected == list(range(n))
    perm = torch.randperm(n)
    assert torch.allclose(fedavg(updates[perm], weights[perm]).aggregate, got.aggregate,
                          atol=1e-3, rtol=1e-4)


def test_fedavg_uniform_and_bad_weights() -> None:
    u = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    assert torch.equal(fedavg(u).aggregate, torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="weights"):
        fedavg(u, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="n_clients"):
        fedavg(torch.zeros(3))
