"""Forged payloads: a correct CRC (recomputed with ``frame``) around an inconsistent body.

The checksum only proves the bytes arrived as they were sent; a malicious or buggy client can
send a well-framed body that lies. Every branch of the decoders that refuses such a body gets
one payload here, built by hand so that exactly one inconsistency remains, and the error must
name it. A valid payload built the same way decodes, so each forgery differs from a good one
only in the field under test.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_core.codec.dense import DenseCodec
from fl_core.codec.framing import CODEC_DENSE, CODEC_TOPK, HEADER, VERSION, PayloadError, frame
from fl_core.codec.payload import decode_payload
from fl_core.codec.rice import pack_fixed, rice_decode, rice_encode
from fl_core.codec.topk import INDEX_BITMAP, INDEX_RICE, TOPK_HEAD, TopKQuantizer
from fl_core.federation import AuditReply, MessageError, decode_message
from fl_core.federation.messages import FRAME, PROTOCOL_VERSION

N = 20
INDICES = np.array([2, 5, 17], dtype=np.int64)


def topk_body(
    *, bits: int = 8, coding: int = INDEX_RICE, r: int = 0, k: int | None = None,
    chunk: int = 0, dims: tuple[int, ...] = (N,), ndim: int | None = None,
    scales: list[float] | None = None, index_block: bytes | None = None,
    codes: list[int] | None = None, value_block: bytes | None = None,
) -> bytes:
    """A top-k body laid out as the module docstring documents; every field overridable."""
    k = INDICES.size if k is None else k
    ndim = len(dims) if ndim is None else ndim
    scales = [0.5] if scales is None else scales
    if index_block is None:
        if coding == INDEX_BITMAP:
            mask = np.zeros(N, dtype=np.uint8)
            mask[INDICES] = 1
            index_block = np.packbits(mask).tobytes()
        else:
            unary, remainders = rice_encode(np.diff(INDICES, prepend=-1) - 1, r)
            index_block = unary + remainders
    if value_block is None:
        levels = 2 ** (bits - 1) - 1
        codes = [levels + 1, levels - 2, 2 * levels] if codes is None else codes
        value_block = pack_fixed(np.array(codes, dtype=np.int64), bits)
    return b"".join((
        TOPK_HEAD.pack(bits, coding, r, ndim, k, chunk),
        struct.pack(f"<{len(dims)}I", *dims),
        struct.pack(f"<{len(scales)}f", *scales),
        index_block,
        value_block,
    ))


def forged(body: bytes, n: int = N, codec: int = CODEC_TOPK) -> bytes:
    return frame(codec, n, body)


def refused(payload: bytes, match: str, expected_elements: int | None = None) -> None:
    """Both the top-k decoder and the generic one refuse, naming the inconsistency."""
    with pytest.raises(PayloadError, match=match):
        TopKQuantizer().decode_sparse(payload, expected_elements)
    with pytest.raises(PayloadError, match=match):
        decode_payload(payload, expected_elements)


@pytest.mark.parametrize(("coding", "r"), [(INDEX_BITMAP, 0), (INDEX_RICE, 0), (INDEX_RICE, 2)])
def test_the_hand_built_layout_decodes(coding: int, r: int) -> None:
    """The builder is right: unforged, its payloads decode to the values they encode."""
    n, indices, values, shape = TopKQuantizer().decode_sparse(
        forged(topk_body(coding=coding, r=r)))
    assert (n, shape) == (N, (N,))
    assert indices.tolist() == INDICES.tolist()
    assert values.tolist() == [0.5, -1.0, 63.5]  # (code − 127) · 0.5


# --- the frame --------------------------------------------------------------------------------


def test_frame_shorter_than_header_and_trailer() -> None:
    with pytest.raises(PayloadError, match="truncated: 15 bytes"):
        decode_payload(forged(b"")[:15])


def test_bad_magic_with_valid_checksum() -> None:
    data = HEADER.pack(b"XPRV", VERSION, CODEC_TOPK, 0, N) + topk_body()
    with pytest.raises(PayloadError, match="bad magic"):
        decode_payload(data + struct.pack("<I", zlib.crc32(data)))


def test_checksum_mismatch() -> None:
    payload = bytearray(forged(topk_body()))
    payload[-1] ^= 1
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode_payload(bytes(payload))


def test_unknown_codec_and_non_bytes() -> None:
    with pytest.raises(PayloadError, match="unknown codec 7"):
        decode_payload(forged(topk_body(), codec=7))
    with pytest.raises(PayloadError, match="not bytes"):
        decode_payload("FPRV")  # type: ignore[arg-type]


def test_declared_size_other_than_the_model() -> None:
    refused(forged(topk_body()), f"declares {N} elements, the model has {N + 1}", N + 1)
    with pytest.raises(PayloadError, match="declares 3 elements, the model has 4"):
        DenseCodec().decode(forged(b"\0" * 12, 3, CODEC_DENSE), 4)


def test_dense_body_not_matching_its_size() -> None:
    with pytest.raises(PayloadError, match="dense body has 8 bytes, header says 3"):
        DenseCodec().decode(forged(b"\0" * 8, 3, CODEC_DENSE))
    with pytest.raises(PayloadError, match="dense body has 16 bytes, header says 3"):
        decode_payload(forged(b"\0" * 16, 3, CODEC_DENSE))


# --- the top-k header -------------------------------------------------------------------------


def test_body_shorter_than_its_header() -> None:
    refused(forged(topk_body()[: TOPK_HEAD.size - 1]), "shorter than its header")


@pytest.mark.parametrize(("field", "value"), [("bits", 1), ("bits", 9), ("coding", 2),
                                              ("r", 32)])
def test_unknown_layout(field: str, value: int) -> None:
    refused(forged(topk_body(**{field: value})), "unknown top-k layout")


def test_more_kept_than_elements() -> None:
    refused(forged(topk_body(k=N + 1)), f"keeps {N + 1} of {N}")


@pytest.mark.parametrize("dims", [(4, 4), (N + 1,), (2, 0, 10)])
def test_shape_not_holding_n(dims: tuple[int, ...]) -> None:
    refused(forged(topk_body(dims=dims)), "does not hold 20 elements")


def test_shape_longer_than_the_body() -> None:
    # ndim = 200 declares 800 bytes of dims in a 40-byte body
    refused(forged(topk_body(ndim=200)), r"shape \(\) does not hold")


def test_body_too_short_for_scales_and_values() -> None:
    body = topk_body(index_block=b"", value_block=b"")
    refused(forged(body[:-1]), "too short for its scales and values")
    # a chunk of 1 declares three scales where the body has one
    refused(forged(topk_body(chunk=1, index_block=b"")), "too short for its scales")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -0.5])
def test_scale_negative_or_not_finite(scale: float) -> None:
    refused(forged(topk_body(scales=[scale])), "scales are negative or not finite")


# --- the index block --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [-1, 1])
def test_bitmap_of_the_wrong_length(extra: int) -> None:
    mask = np.zeros(N, dtype=np.uint8)
    mask[INDICES] = 1
    block = np.packbits(mask).tobytes()
    block = block[:extra] if extra < 0 else block + b"\0" * extra
    refused(forged(topk_body(coding=INDEX_BITMAP, index_block=block)),
            f"bitmap has {3 + extra} bytes, 20 elements need 3")


@pytest.mark.parametrize("marked", [[2, 5], [2, 5, 17, 18]])
def test_bitmap_count_not_k(marked: list[int]) -> None:
    mask = np.zeros(N, dtype=np.uint8)
    mask[marked] = 1
    refused(forged(topk_body(coding=INDEX_BITMAP, index_block=np.packbits(mask).tobytes())),
            f"bitmap marks {len(marked)} elements, header says 3")


def test_rice_block_shorter_than_its_remainders() -> None:
    # r = 8: three remainders need 3 bytes; a 2-byte index block cannot hold them
    refused(forged(topk_body(r=8, index_block=b"\x80\x00")),
            "shorter than its remainder stream")


@pytest.mark.parametrize("gaps", [[2, 2], [2, 2, 11, 0]])
def test_rice_stream_count_not_k(gaps: list[int]) -> None:
    unary, remainders = rice_encode(np.array(gaps, dtype=np.int64), 0)
    refused(forged(topk_body(index_block=unary + remainders)),
            f"index stream holds {len(gaps)} entries, header says 3")


@pytest.mark.parametrize("r", [0, 3])
def test_rice_index_out_of_range(r: int) -> None:
    # gaps 2, 2, 14 → indices 2, 5, 20: one past the last element
    unary, remainders = rice_encode(np.array([2, 2, 14], dtype=np.int64), r)
    refused(forged(topk_body(r=r, index_block=unary + remainders)),
            "index 20 out of range for 20 elements")


def test_rice_stream_with_padding_bytes() -> None:
    """A unary stream is exactly the bytes up to its last 1-bit: extra bytes are refused, else
    a byte appended to the body would shift every value by one and still decode."""
    unary, remainders = rice_encode(np.diff(INDICES, prepend=-1) - 1, 0)
    refused(forged(topk_body(index_block=unary + b"\0" + remainders)),
            "index stream has 4 bytes, its 3 entries need 3")
    # the attack this stops: one byte appended, the first value code 0 read as unary padding
    body = topk_body(codes=[0, 130, 254]) + b"\x80"
    refused(forged(body), "index stream has 4 bytes, its 3 entries need 3")


def test_rice_decode_refuses_padding_directly() -> None:
    unary, remainders = rice_encode(np.array([4, 0, 9], dtype=np.int64), 2)
    assert rice_decode(unary, remainders, 3, 2).tolist() == [4, 0, 9]
    with pytest.raises(PayloadError, match="index stream has"):
        rice_decode(unary + b"\0", remainders, 3, 2)


# --- the value block --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_code_out_of_range(bits: int) -> None:
    levels = 2 ** (bits - 1) - 1
    refused(forged(topk_body(bits=bits, codes=[levels, 2 * levels + 1, 0])),
            f"quantized value out of range for {bits} bits")


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), bad=st.integers(0, 2), coding=st.sampled_from([0, 1]))
def test_any_out_of_range_code_is_refused(bits: int, bad: int, coding: int) -> None:
    levels = 2 ** (bits - 1) - 1
    codes = [levels] * 3
    good = forged(topk_body(bits=bits, coding=coding, codes=codes))
    assert TopKQuantizer().decode_sparse(good)[1].tolist() == INDICES.tolist()
    codes[bad] = 2 * levels + 1  # the one code b bits can hold that the quantizer never writes
    refused(forged(topk_body(bits=bits, coding=coding, codes=codes)), "out of range")


def test_trailing_bytes_after_a_bitmap_body() -> None:
    refused(forged(topk_body(coding=INDEX_BITMAP) + b"\0"), "bitmap has 4 bytes")


def test_values_bytes_follow_k_and_bits() -> None:
    """ceil(k·b/8) value bytes: 3 codes of 4 bits take 2 bytes, the third sits in the high
    nibble of the second byte."""
    payload = forged(topk_body(bits=4, codes=[7, 14, 0]))
    # header, one dim, one scale, 3 bytes of unary stream (18 bits), ceil(3·4/8) value bytes
    assert len(topk_body(bits=4, codes=[7, 14, 0])) == TOPK_HEAD.size + 4 + 4 + 3 + math.ceil(
        3 * 4 / 8)
    values = TopKQuantizer().decode(payload)
    expected = torch.zeros(N)
    expected[torch.from_numpy(INDICES)] = torch.tensor([0.0, 3.5, -3.5])
    assert torch.equal(values, expected)


# --- audit replies (sites mode): a valid frame around counts that lie ---------------------------


def _audit_frame(counts: torch.Tensor, members: int, non_members: int) -> bytes:
    """An exact (noise 0) AuditReply frame built by hand (the layout of
    fl_core.federation.messages, version 3: float64 cells, one attack)."""
    meta = (f'{{"site":"A","round":1,"members":{members},"non_members":{non_members},'
            f'"noise":0.0,"bins":{counts.shape[-1]}}}').encode()
    blob = counts.to(torch.float64).numpy().astype("<f8").tobytes()
    body = FRAME.pack(b"FPMS", PROTOCOL_VERSION, 7, 0, len(meta), len(blob)) + meta + blob
    return body + struct.pack("<I", zlib.crc32(body))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), cell=st.integers(0, 2 * 16 - 1),
       change=st.integers(-5, 5).filter(bool))
def test_any_changed_exact_audit_count_is_refused(seed: int, cell: int, change: int) -> None:
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(1, 2, 16, dtype=torch.float64)  # the loss-threshold attack only
    counts[0, 0] = torch.bincount(torch.randint(0, 16, (30,), generator=g), minlength=16)
    counts[0, 1] = torch.bincount(torch.randint(0, 16, (12,), generator=g), minlength=16)
    good = decode_message(_audit_frame(counts, 30, 12), site="A")
    assert isinstance(good, AuditReply) and torch.equal(good.histograms, counts)
    forged_counts = counts.clone()
    forged_counts.view(-1)[cell] += change  # one count changed: negative or not adding up
    with pytest.raises(MessageError, match="negative count|sum to"):
        decode_message(_audit_frame(forged_counts, 30, 12), site="A")
