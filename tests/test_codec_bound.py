"""Bounded decoding: no header field makes a receiver allocate more than a small multiple of the
chunk it received (peak allocation measured with tracemalloc on forged, CRC-valid chunks)."""
from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest

from fsd_kernels import codec

zstandard = pytest.importorskip("zstandard")


def _forge(raw_len: int, flags: int, *, noise: int = 0, n_rows: int = 1 << 24, nnz: int = 1 << 24,
           n_images: int = 1 << 30) -> bytes:
    """A chunk whose header passes every structural check, declaring ``raw_len`` raw bytes that
    its compressed body really inflates to: ``noise`` random bytes then zeros (a bomb)."""
    raw = np.random.default_rng(7).integers(0, 256, noise, dtype=np.uint8).tobytes() + bytes(raw_len - noise)
    body = (zstandard.ZstdCompressor(level=19).compress(raw) if flags == codec.FLAG_ZSTD
            else zlib.compress(raw, 9))
    fields = (b"r" * 16, 1, 0, 1, 0, 0, 1, n_images)
    return codec._pack_chunk(fields, n_rows, nnz, body, flags, raw_len)


def _at_the_bound(flags: int, noise: int, **shape) -> bytes:
    """The forged chunk inflating the most a header may declare for its payload."""
    raw_len = codec.inflation_bound(noise)
    while True:
        chunk = _forge(raw_len, flags, noise=noise, **shape)
        bound = codec.inflation_bound(len(chunk) - codec.HEADER_SIZE)
        if raw_len <= bound and raw_len + 64 > bound - 4096:
            return chunk
        raw_len = bound - 2048


def _peak(call) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            call()
        except codec.CodecError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("flags", [codec.FLAG_ZSTD, codec.FLAG_ZLIB])
def test_bomb_beyond_the_bound_is_refused_before_inflating(flags):
    raw_len = 64 << 20  # what the old raw-length bound allowed (about 419 MB) is not needed to show it
    chunk = _forge(raw_len, flags)
    assert len(chunk) < 80_000 and codec._raw_bound(1 << 24, 1 << 24) > raw_len  # passes the old checks
    with pytest.raises(codec.CodecError, match="inflation bound"):
        codec.decode_header(chunk)
    block = np.zeros((4, 8), np.float32)
    peak = _peak(lambda: codec.decode_into(chunk, block, np.zeros(1, np.int64)))
    assert peak < 4 * len(chunk) + (1 << 20), peak
    assert _peak(lambda: codec.decode(chunk)) < 4 * len(chunk) + (1 << 20)


@pytest.mark.parametrize("flags", [codec.FLAG_ZSTD, codec.FLAG_ZLIB])
def test_compressed_chunk_declaring_no_raw_bytes_is_refused_before_inflating(flags):
    # zlib reads a max_length of 0 as "no limit": a compressed chunk declaring raw_len 0 (and no
    # entries, which passes every other check) must not reach the inflater.
    raw = bytes(32 << 20)
    body = zstandard.ZstdCompressor(level=19).compress(raw) if flags == codec.FLAG_ZSTD else zlib.compress(raw, 9)
    chunk = codec._pack_chunk((b"r" * 16, 1, 0, 1, 0, 0, 1, 1), 0, 0, body, flags, 0)
    with pytest.raises(codec.CodecError, match="raw payload length 0"):
        codec.decode_header(chunk)
    assert _peak(lambda: codec.decode(chunk)) < 4 * len(chunk) + (1 << 20)
    assert _peak(lambda: codec.decode_into(chunk, np.zeros((4, 4), np.float32), np.arange(4))) \
        < 4 * len(chunk) + (1 << 20)


@pytest.mark.parametrize("flags", [codec.FLAG_ZSTD, codec.FLAG_ZLIB])
def test_largest_allowed_inflation_stays_a_small_multiple_of_the_chunk(flags):
    # COO decoding has no block to bound it: the inflation bound is what holds.
    chunk = _at_the_bound(flags, 16 << 10, n_rows=1 << 21, nnz=1 << 24, n_images=8)
    payload = len(chunk) - codec.HEADER_SIZE
    raw_len = codec.decode_header(chunk).raw_len  # structurally valid: the payload check refuses it
    assert raw_len > codec.inflation_bound(payload) - 8192
    peak = _peak(lambda: codec.decode(chunk))
    assert raw_len <= peak <= 2 * raw_len + (256 << 10), (peak, len(chunk))  # it did inflate, once or twice
    assert peak < 80 * len(chunk)
    with pytest.raises(codec.CodecError):
        codec.decode(chunk)


@pytest.mark.parametrize("flags", [codec.FLAG_ZSTD, codec.FLAG_ZLIB])
def test_decode_into_is_bounded_by_the_receivers_block(flags):
    block = np.zeros((4, 8), np.float32)
    too_tall = _at_the_bound(flags, 4096, n_rows=1 << 21, nnz=1 << 24, n_images=8)
    peak = _peak(lambda: codec.decode_into(too_tall, block, np.zeros(1, np.int64)))
    assert peak < 4 * len(too_tall) + (64 << 10)
    with pytest.raises(codec.CodecError, match="rows"):
        codec.decode_into(too_tall, block, np.zeros(1, np.int64))
    # within the block's rows: the raw bound of 4096 rows x 8 images holds the allocation
    tall = np.zeros((4096, 8), np.float32)
    chunk = _at_the_bound(flags, 4096, n_rows=4096, nnz=4096 * 8, n_images=8)
    raw_len = codec.decode_header(chunk).raw_len
    assert raw_len <= codec._raw_bound(4096, 4096 * 8)
    peak = _peak(lambda: codec.decode_into(chunk, tall, np.zeros(1, np.int64)))
    assert raw_len <= peak <= 2 * raw_len + (64 << 10)
    with pytest.raises(codec.CodecError):
        codec.decode_into(chunk, tall, np.zeros(1, np.int64))


def test_receiver_budget_refuses_longer_chunks():
    chunk = codec.encode(np.array([3, 3], np.int32), np.array([0, 1], np.int32),
                         np.array([1.0, 2.0], np.float32), n_images=4)[0]
    codec.decode_header(chunk, max_bytes=len(chunk))
    with pytest.raises(codec.CodecError, match="budget"):
        codec.decode_header(chunk, max_bytes=len(chunk) - 1)


def test_encoder_keeps_to_the_bound_on_extremely_compressible_blocks():
    # 64 rows, every one of 100k images, all equal values: the raw format is already compact,
    # and whatever the compressor makes of it must stay decodable under the bound.
    rows = 64
    n_images = 100_000
    neurons = np.repeat(np.arange(rows, dtype=np.int32), n_images)
    images = np.tile(np.arange(n_images, dtype=np.int32), rows)
    values = np.ones(rows * n_images, np.float32)
    chunks = codec.encode(neurons, images, values, n_images=n_images, max_bytes=1 << 16)
    for chunk in chunks:
        h = codec.decode_header(chunk)
        assert h.raw_len <= codec.inflation_bound(len(chunk) - codec.HEADER_SIZE)
    got = [codec.decode(c) for c in chunks]
    assert sum(m.neurons.shape[0] for m in got) == rows * n_images


def test_coo_decode_takes_the_receivers_entry_bound():
    chunk = codec.encode(np.array([3, 3, 4], np.int32), np.array([0, 1, 1], np.int32),
                         np.array([1.0, 2.0, 3.0], np.float32), n_images=4)[0]
    assert codec.decode(chunk, max_nnz=3).neurons.shape[0] == 3
    with pytest.raises(codec.CodecError, match="at most 2"):
        codec.decode(chunk, max_nnz=2)


_PEAK_OF_DECODE = """
import resource, struct, sys, zlib
import numpy as np
from fsd_kernels import codec
nnz, constant = int(sys.argv[1]), sys.argv[2] == "const"
def varint(v):
    out = bytearray()
    while v >= 128:
        out.append(v & 127 | 128); v >>= 7
    return bytes(out + bytes([v]))
raw = varint(0) + varint(nnz << 3 | 3) + varint(0)  # neuron 0: a run of nnz images from image 0
if constant:
    raw += b"\\x01" + struct.pack("<f", 1.0)
else:  # a dictionary of 256 values, one code byte an entry
    raw += b"\\x02" + varint(255) + bytes(256) + np.random.default_rng(0).integers(0, 256, nnz, dtype=np.uint8).tobytes()
body = zlib.compress(raw, 1)
chunk = codec._pack_chunk((b"r", 0, 0, 0, 0, 0, 1, nnz), 1, nnz, body, codec.FLAG_ZLIB, len(raw))
codec.decode(codec.encode(np.zeros(1, np.int32), np.zeros(1, np.int32), np.ones(1, np.float32), n_images=2)[0])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
message = codec.decode(chunk)
assert message.images.shape[0] == nnz
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, len(chunk))
"""


@pytest.mark.parametrize("values", ["const", "dictionary"])
def test_decode_allocates_what_docs_codec_md_says(values):
    """decode of one row of 2**22 entries: the COO output (12 bytes an entry), one row's images
    (4 bytes an entry) and, for values that are not one constant, about 28 bytes a value more
    (docs/codec.md); a constant section costs nothing per entry beyond the output. Measured as
    the growth of a fresh process's peak RSS."""
    import subprocess
    import sys

    nnz = 1 << 22
    out = subprocess.run([sys.executable, "-c", _PEAK_OF_DECODE, str(nnz), values],
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    grown, chunk_bytes = int(out[0]), int(out[1])
    per_value = 0 if values == "const" else 28
    assert grown <= (12 + 4 + per_value) * nnz + 2 * chunk_bytes + (8 << 20), (grown, chunk_bytes)
