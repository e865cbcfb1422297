"""Coverage-guided fuzzing of the codec's decoders with atheris (libFuzzer).

    python bench/fuzz_codec.py -runs=300000          # or -max_total_time=120

Each input is turned into a chunk one of three ways: taken as it is; a
header built from fuzzed fields over a fuzzed payload (checksum made
valid, so the bytes reach the payload kernels); or a valid chunk (from a
pool covering every row and value encoding) with fuzzed bytes overwritten
and the checksum made valid again. ``decode``, ``decode_into`` and
``from_text`` must either succeed with a well-formed result or raise ``CodecError``;
anything else (another exception, a crash) stops the fuzzer. The numba
kernels are not coverage-instrumented (only :mod:`fsd_kernels.codec` is),
so inside them this is a mutation fuzzer. libFuzzer's last line ("Done N
runs") says how many inputs were tried.
"""
import inspect
import struct
import sys
import zlib

import atheris
import numpy as np

from fsd_kernels import (
    codec,  # the numba kernels must be compiled from uninstrumented code
)

for _f in list(vars(codec).values()) + [m for c in (codec.Assembler, codec.ChunkTracker)
                                          for m in vars(c).values()]:
    if inspect.isfunction(_f) and _f.__module__ == codec.__name__:
        atheris.instrument_func(_f)

N_IMAGES = 200
SLOTS = np.arange(4096) % 8


def _pool():
    """Valid uncompressed and compressed chunks covering every row kind and value mode."""
    rng = np.random.default_rng(0)
    chunks = []
    for density, pool in [(0.02, None), (0.5, 3), (1.0, 1), (0.3, 300), (0.9, None)]:
        mask = rng.random((12, N_IMAGES)) < density
        mask[:, 0] = True
        mask[3] = mask[2]  # repeated image set
        values = rng.standard_normal((12, N_IMAGES)).astype(np.float32)
        if pool:
            values = rng.choice(values.ravel()[:pool], values.shape)
        values[5] = values[4]
        mask[5] = mask[4]  # a copy
        mask[7] = False
        mask[7, 10:90] = True  # a run
        rows, cols = np.nonzero(mask)
        chunks += codec.encode(rows * 5 + 1, cols, values[rows, cols], n_images=N_IMAGES)
        raw = bytearray(chunks[-1])
        raw[5] = 0  # also as an uncompressed chunk
        chunks.append(bytes(raw))
    return chunks


POOL = _pool()


def _reseal(head: bytes, payload: bytes) -> bytes:
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def _chunk(fdp: atheris.FuzzedDataProvider) -> bytes:
    how = fdp.ConsumeIntInRange(0, 2)
    if how == 0:
        return fdp.ConsumeBytes(fdp.remaining_bytes())
    if how == 1:
        fields = [fdp.ConsumeIntInRange(0, 3)] + [fdp.ConsumeIntInRange(0, 3000) for _ in range(4)]
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
        flags, n_images, n_rows, nnz, raw_len = fields
        raw_len = len(payload) if flags == 0 else raw_len
        head = codec._HEAD.pack(codec.MAGIC, codec.VERSION, flags, 0, 0, bytes(16), 1, 0, 0, 1, 0, 1,
                                n_images, n_rows, nnz, raw_len, len(payload))
        return _reseal(head, payload)
    chunk = bytearray(POOL[fdp.ConsumeIntInRange(0, len(POOL) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        at = fdp.ConsumeIntInRange(0, len(chunk) - 1)
        chunk[at] = fdp.ConsumeIntInRange(0, 255)
    head = bytes(chunk[:codec.HEADER_SIZE - 4])
    return _reseal(head, bytes(chunk[codec.HEADER_SIZE:]))


def _check(m: codec.Message) -> None:
    n = m.neurons.size
    if m.images.size != n or m.values.size != n:
        raise AssertionError("decoded arrays differ in length")
    if n:
        if m.images.min() < 0 or m.images.max() >= m.n_images or m.neurons.min() < 0:
            raise AssertionError("decoded index out of range")
        key = m.neurons.astype(np.int64) * (m.n_images + 1) + m.images
        if np.any(np.diff(key) <= 0):
            raise AssertionError("decoded entries not sorted")


def test_one_input(data: bytes) -> None:
    chunk = _chunk(atheris.FuzzedDataProvider(data))
    try:
        _check(codec.decode(chunk))
    except codec.CodecError:
        pass
    try:
        codec.from_text(chunk.decode("latin-1"))
    except codec.CodecError:
        pass
    block = np.zeros((8, 3001), np.float32)
    try:
        codec.decode_into(chunk, block, SLOTS)
    except codec.CodecError:
        if block.any():
            raise AssertionError("decode_into wrote before it failed")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
