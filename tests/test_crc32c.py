"""CRC-32C: published check values, fast == reference, continuation, masking, input kinds."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt2.checkpoint.crc32c import crc32c, crc32c_reference, mask, masked_crc32c, unmask

IMPLS = [crc32c, crc32c_reference]
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# RFC 3720 appendix B.4 (iSCSI), as also asserted by TensorFlow's crc32c_test.cc.
ISCSI_READ_PDU = bytes([
    0x01, 0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00,
    0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18, 0x28, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
])
KNOWN = [
    (b"123456789", 0xE3069283),  # CRC RevEng catalogue, CRC-32/ISCSI check value
    (b"", 0x00000000),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
    (ISCSI_READ_PDU[:-7], 0xDD1B19BE),  # TensorFlow's unaligned size/offset cases
    (ISCSI_READ_PDU[1:-3], 0x4930C4B1),
]


@pytest.mark.parametrize("impl", IMPLS, ids=["fast", "reference"])
@pytest.mark.parametrize("data,expected", KNOWN)
def test_published_values(impl, data, expected):
    assert impl(data) == expected


@pytest.mark.parametrize("impl", IMPLS, ids=["fast", "reference"])
def test_extend_matches_tensorflow_semantics(impl):
    assert impl(b"world", impl(b"hello ")) == impl(b"hello world")


def test_mask_of_empty_is_tensorflows_stored_value():
    # TensorFlow wrote the crc32c field of its empty tensors ('empty/f32', 'empty/i64') as tag 0x35
    # then fixed32 d8 ea 82 a2: the masked crc of no bytes.
    with open(os.path.join(FIXTURES, "dtypes", "model.ckpt.index"), "rb") as f:
        assert f.read().count(bytes.fromhex("35d8ea82a2")) == 2
    assert masked_crc32c(b"") == 0xA282EAD8


def test_mask_roundtrip():
    crc = crc32c(b"foo")
    assert mask(crc) != crc and mask(mask(crc)) != crc
    assert unmask(mask(crc)) == crc and unmask(unmask(mask(mask(crc)))) == crc
    # The documented formula, spelled out independently.
    assert mask(crc) == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) % 2**32


def test_fast_equals_reference_at_every_alignment_and_length():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=300, dtype=np.uint8).tobytes()
    for start in range(0, 17):
        for length in list(range(0, 40)) + [63, 64, 65, 127, 128, 129, 250]:
            chunk = data[start:start + length]
            assert crc32c(chunk) == crc32c_reference(chunk), (start, length)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300), st.integers(0, 2**32 - 1))
def test_fast_equals_reference_property(data, split, seed_value):
    split = min(split, len(data))
    assert crc32c(data, seed_value) == crc32c_reference(data, seed_value)
    assert crc32c(data[split:], crc32c(data[:split])) == crc32c(data)


def test_input_kinds_checksum_the_c_order_bytes():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    expected = crc32c_reference(a.tobytes())
    assert crc32c(a) == expected
    assert crc32c(a.tobytes()) == expected
    assert crc32c(bytearray(a.tobytes())) == expected
    assert crc32c(memoryview(a.tobytes())) == expected
    t = a.T  # not C-contiguous: checksum its C-order bytes
    assert crc32c(t) == crc32c_reference(t.tobytes())
    assert crc32c(np.array(3.5)) == crc32c_reference(np.array(3.5).tobytes())
    assert crc32c(np.zeros((0, 4), np.float64)) == 0
    b = np.array([True, False, True])
    assert crc32c(b) == crc32c_reference(b"\x01\x00\x01")


def test_large_buffer_matches_chunked_reference():
    """A few MB through the fast path, checked piecewise against the reference on a sample."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, size=3_000_001, dtype=np.uint8)
    whole = crc32c(data)
    crc = 0
    for piece in np.array_split(data, 7):
        crc = crc32c(piece, crc)
    assert crc == whole
    head = data[:20_000]
    assert crc32c(head) == crc32c_reference(head)
