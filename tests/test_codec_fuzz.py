"""Property tests of the codec: exact round trips, and hostile bytes never get past CodecError.

Bounded (about 10 s in total). The long campaign is ``bench/fuzz_codec.py`` (atheris).
"""
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsd_kernels import codec

FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def blocks(draw):
    """A COO block sorted by (neuron, image): rows of random image sets, values from a small
    or a large pool, with repeated rows and repeated image sets mixed in."""
    n_images = draw(st.integers(1, 300))
    n_rows = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    neurons = np.sort(rng.choice(5000, n_rows, replace=False)).astype(np.int32)
    pool = rng.choice([1, 3, 300]) if draw(st.booleans()) else None
    rows_images, rows_values = [], []
    for r in range(n_rows):
        kind = rng.integers(0, 4)
        if r and kind == 0:  # copy of an earlier row
            j = rng.integers(0, r)
            images, values = rows_images[j], rows_values[j]
        else:
            if r and kind == 1:  # previous row's image set
                images = rows_images[-1]
            elif kind == 2:  # a run
                lo = rng.integers(0, n_images)
                images = np.arange(lo, rng.integers(lo + 1, n_images + 1))
            else:
                images = np.flatnonzero(rng.random(n_images) < rng.random())
                if images.size == 0:
                    images = np.array([rng.integers(0, n_images)])
            if pool is None:
                values = rng.standard_normal(images.size).astype(np.float32)
            else:
                values = rng.choice(rng.standard_normal(pool).astype(np.float32), images.size)
        rows_images.append(images.astype(np.int32))
        rows_values.append(values.astype(np.float32))
    counts = [im.size for im in rows_images]
    if not n_rows:
        return (np.zeros(0, np.int32),) * 2 + (np.zeros(0, np.float32), n_images)
    return (np.repeat(neurons, counts), np.concatenate(rows_images), np.concatenate(rows_values),
            n_images)


def chunks_of(block, max_bytes=None):
    neurons, images, values, n_images = block
    return codec.encode(neurons, images, values, n_images=n_images, layer=1, source=2, target=3,
                        run_id=b"fuzz", max_bytes=max_bytes)


@FAST
@given(blocks(), st.one_of(st.none(), st.integers(codec.MIN_MAX_BYTES, 3000)), st.randoms())
def test_roundtrip_any_order_any_budget(block, max_bytes, random):
    neurons, images, values, _ = block
    chunks = chunks_of(block, max_bytes)
    if max_bytes is not None:
        assert all(len(c) <= max_bytes for c in chunks)
    delivered = chunks + [random.choice(chunks)]
    random.shuffle(delivered)
    assembler = codec.Assembler()
    done = [m for m in map(assembler.add, delivered) if m is not None]
    assert len(done) == 1
    np.testing.assert_array_equal(done[0].neurons, neurons)
    np.testing.assert_array_equal(done[0].images, images)
    np.testing.assert_array_equal(done[0].values.view(np.uint32), values.view(np.uint32))


def check_decoded(m: codec.Message):
    """What any successfully decoded chunk must satisfy, whatever the bytes were."""
    n = m.neurons.size
    assert m.images.size == n and m.values.size == n
    if n:
        assert m.images.min() >= 0 and m.images.max() < m.n_images
        assert m.neurons.min() >= 0
        key = m.neurons.astype(np.int64) * (m.n_images + 1) + m.images
        assert np.all(np.diff(key) > 0)


def decode_or_reject(data: bytes):
    try:
        m = codec.decode(data)
    except codec.CodecError:
        return None
    check_decoded(m)
    return m


def reseal(data: bytes) -> bytes:
    """Fix the checksum so that the damage reaches the payload parser."""
    head = data[:codec.HEADER_SIZE - 4]
    body = data[codec.HEADER_SIZE:]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_are_rejected(data):
    assert decode_or_reject(data) is None


@FAST
@given(st.binary(min_size=1, max_size=300), st.integers(0, 12), st.integers(0, 3000),
       st.integers(0, 2000), st.sampled_from([0, codec.FLAG_ZLIB, codec.FLAG_ZSTD]))
def test_random_payload_under_a_well_formed_header(payload, n_rows, nnz, n_images, flags):
    """Random payloads with a consistent, correctly checksummed header exercise the kernels."""
    raw_len = len(payload) if flags == 0 else max(len(payload), 1)
    head = codec._HEAD.pack(codec.MAGIC, codec.VERSION, flags, 0, 0, bytes(16), 1, 0, 0, 1, 0, 1,
                            n_images, n_rows, nnz, raw_len, len(payload))
    data = reseal(head + b"\0\0\0\0" + payload)
    decode_or_reject(data)
    block = np.zeros((3, max(n_images, 1)), np.float32)
    try:
        codec.decode_into(data, block, np.arange(5000) % 3)
    except codec.CodecError:
        assert not block.any()


@FAST
@given(blocks(), st.data())
def test_truncated_and_flipped_chunks_are_rejected(block, data):
    chunk = chunks_of(block)[0]
    cut = data.draw(st.integers(0, len(chunk) - 1))
    assert decode_or_reject(chunk[:cut]) is None
    bit = data.draw(st.integers(0, 8 * len(chunk) - 1))
    flipped = bytearray(chunk)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert decode_or_reject(bytes(flipped)) is None  # crc32 catches every single-bit error


@FAST
@given(blocks(), st.data())
def test_payload_damage_behind_a_valid_checksum_never_crashes(block, data):
    """Flip bytes of an uncompressed payload and fix the checksum: a clean error or a valid block."""
    chunk = bytearray(chunks_of(block)[0])
    chunk[5] = 0  # store the payload uncompressed so the damage reaches the kernels
    neurons, images, values, n_images = block
    raw = _raw_payload(neurons, images, values)
    chunk[64:68] = struct.pack("<I", len(raw))
    chunk[60:64] = struct.pack("<I", len(raw))
    chunk = bytes(chunk[:codec.HEADER_SIZE]) + raw
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            chunk = chunk[:codec.HEADER_SIZE + at] + bytes([data.draw(st.integers(0, 255))]) \
                + chunk[codec.HEADER_SIZE + at + 1:]
    chunk = reseal(chunk)
    decode_or_reject(chunk)
    block_out = np.zeros((1, max(n_images, 1)), np.float32)
    try:
        codec.decode_into(chunk, block_out, np.zeros(5000, np.int64))
    except codec.CodecError:
        assert not block_out.any()


def _raw_payload(neurons, images, values) -> bytes:
    """The uncompressed payload the encoder builds for a block."""
    from fsd_kernels._backend import kernels

    starts = np.flatnonzero(np.diff(neurons)) + 1 if neurons.size else np.zeros(0, np.int64)
    row_ptr = np.concatenate(([0], starts, [neurons.size])).astype(np.int64) if neurons.size \
        else np.zeros(1, np.int64)
    row_neurons = np.ascontiguousarray(neurons[row_ptr[:-1]])
    out = np.empty(codec._raw_bound(row_neurons.size, images.size), np.uint8)
    kept = np.empty(images.size, np.uint32)
    counts = np.zeros(1, np.int64)
    bits = np.ascontiguousarray(values).view(np.uint32)
    pos = kernels.encode_rows(row_neurons, row_ptr, images, bits, out, kept, counts)
    pos = kernels.encode_values(kept[:counts[0]], out, pos)
    return out[:pos].tobytes()


def test_raw_payload_helper_matches_the_encoder():
    """The uncompressed path the damage test relies on decodes to the block."""
    rng = np.random.default_rng(1)
    images = np.sort(rng.choice(100, 30, replace=False)).astype(np.int32)
    neurons = np.repeat(np.int32([4, 9]), 15)
    images = np.concatenate([np.sort(images[:15]), np.sort(images[15:])])
    values = rng.standard_normal(30).astype(np.float32)
    raw = _raw_payload(neurons, images, values)
    chunk = bytearray(codec.encode(neurons, images, values, n_images=100)[0])
    chunk[5] = 0
    chunk[60:68] = struct.pack("<II", len(raw), len(raw))
    m = codec.decode(reseal(bytes(chunk[:codec.HEADER_SIZE]) + raw))
    np.testing.assert_array_equal(m.images, images)
    np.testing.assert_array_equal(m.values, values)


@pytest.mark.parametrize("field, value", [("nnz", codec.MAX_CHUNK_NNZ), ("n_rows", 2**32 - 1),
                                          ("n_images", codec.MAX_IMAGES), ("raw_len", 2**32 - 1)])
def test_header_limits_never_drive_a_huge_allocation(field, value):
    """Lying sizes with a tiny payload are refused before anything is allocated for them."""
    fields = dict(magic=codec.MAGIC, version=codec.VERSION, flags=0, rid_len=0, reserved=0,
                  rid=bytes(16), layer=0, batch=0, source=0, target=0, chunk=0, n_chunks=1,
                  n_images=10, n_rows=1, nnz=1, raw_len=4, payload_len=4)
    fields[field] = value
    payload = b"\x01\x0b\x00\x00"
    data = reseal(codec._HEAD.pack(*fields.values()) + b"\0\0\0\0" + payload)
    with pytest.raises(codec.CodecError):
        codec.decode(data)
