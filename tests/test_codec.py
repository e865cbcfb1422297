"""The activation-message codec: exact round trips, chunking, reassembly, validation, envelope."""
import struct
import zlib

import numpy as np
import pytest

from fsd_kernels import codec
from fsd_kernels._backend import kernels

FIELDS = dict(layer=7, source=3, target=5, batch=2, run_id=b"run-42")


def random_block(rng, n_neurons=40, n_images=300, density=None, values=None):
    """A random block in COO (sorted by neuron, image) and as a dense [row, image] array."""
    density = rng.random() if density is None else density
    ids = np.sort(rng.choice(100_000, n_neurons, replace=False)).astype(np.int32)
    mask = rng.random((n_neurons, n_images)) < density
    if values is None:
        values = rng.standard_normal((n_neurons, n_images)).astype(np.float32)
    dense = np.where(mask, values, np.float32(0)).astype(np.float32)
    rows, cols = np.nonzero(mask)
    return ids, dense, ids[rows], cols.astype(np.int32), values[rows, cols].astype(np.float32)


def naive_scatter(neurons, images, values, slot_of_neuron, shape, offset=0):
    """Reference for decode_into: one entry at a time."""
    block = np.zeros(shape, np.float32)
    for n, i, v in zip(neurons, images, values):
        block[slot_of_neuron[n], offset + i] = v
    return block


def assert_same_bits(a, b):
    np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32),
                                  np.asarray(b, np.float32).view(np.uint32))


def roundtrip(chunks):
    assembler = codec.Assembler()
    done = [m for m in map(assembler.add, chunks) if m is not None]
    assert len(done) == 1
    return done[0]


@pytest.mark.parametrize("values_kind", ["normal", "constant", "few", "signed_zero"])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.97, 1.0])
def test_roundtrip_is_bit_exact(values_kind, density):
    rng = np.random.default_rng(hash((values_kind, density)) % 2**32)
    shape = (40, 300)
    values = {
        "normal": rng.standard_normal(shape).astype(np.float32),
        "constant": np.full(shape, 32.0, np.float32),
        "few": rng.choice(np.float32([0.5, 1.25, 32.0, 7.0]), shape),
        "signed_zero": rng.choice(np.float32([-0.0, 1.0, np.nan, -np.inf]), shape),
    }[values_kind]
    _, _, neurons, images, vals = random_block(rng, density=density, values=values)
    chunks = codec.encode(neurons, images, vals, n_images=300, **FIELDS)
    assert len(chunks) == 1
    m = codec.decode(chunks[0])
    np.testing.assert_array_equal(m.neurons, neurons)
    np.testing.assert_array_equal(m.images, images)
    assert_same_bits(m.values, vals)
    assert (m.n_images, m.layer, m.source, m.target, m.batch, m.chunk, m.n_chunks, m.run_id) == (
        300, 7, 3, 5, 2, 0, 1, b"run-42")


def test_far_apart_images_take_the_sorting_path():
    """Images spread over a huge range (value order then comes from a merge sort)."""
    n_images = 2**31 - 1
    neurons = np.int32([1, 1, 1, 2, 2, 7])
    images = np.int32([0, 5, n_images - 1, 3, n_images - 2, 5])
    values = np.float32([1.5, -2.0, 3.0, 4.0, 5.5, 6.0])
    m = codec.decode(codec.encode(neurons, images, values, n_images=n_images)[0])
    np.testing.assert_array_equal(m.images, images)
    assert_same_bits(m.values, values)


def test_empty_block_is_one_chunk():
    chunks = codec.encode([], [], [], n_images=10, **FIELDS)
    assert len(chunks) == 1 and len(chunks[0]) == codec.HEADER_SIZE
    m = codec.decode(chunks[0])
    assert m.neurons.size == m.images.size == m.values.size == 0
    assert m.n_chunks == 1 and m.target == 5


def encode_dense_rows(block):
    """COO of a dense block (neuron ids 3*row+1) and its single chunk."""
    rows, cols = np.nonzero(block)
    neurons = (rows * 3 + 1).astype(np.int32)
    values = block[rows, cols]
    return rows, neurons, cols, values, codec.encode(neurons, cols, values, n_images=block.shape[1])[0]


def test_repeated_rows_cost_almost_nothing_and_decode_exactly():
    rng = np.random.default_rng(3)
    _, dense, _, _, _ = random_block(rng, n_neurons=30, n_images=500, density=0.3)
    doubled = np.repeat(dense, 2, axis=0)  # every row twice: copies
    same_images = np.repeat(dense, 2, axis=0)
    same_images[1::2] = np.where(dense != 0, np.float32(7.5), np.float32(0))  # repeated image sets
    base_len = codec.decode_header(encode_dense_rows(dense)[-1]).raw_len
    # a copy costs its neuron and a tag byte; a repeated image set one byte plus its values
    for block, extra in [(doubled, 2 * 30), (same_images, 2 * 30 + 4 * np.count_nonzero(dense))]:
        rows, neurons, cols, values, chunk = encode_dense_rows(block)
        m = codec.decode(chunk)
        np.testing.assert_array_equal(m.neurons, neurons)
        np.testing.assert_array_equal(m.images, cols)
        assert_same_bits(m.values, values)
        slot_of_neuron = np.full(neurons.max() + 1, -1)
        slot_of_neuron[neurons] = rows
        out = np.zeros(block.shape, np.float32)
        codec.decode_into(chunk, out, slot_of_neuron)
        assert_same_bits(out, block)
        assert codec.decode_header(chunk).raw_len <= base_len + extra


@pytest.mark.parametrize("max_bytes", [codec.MIN_MAX_BYTES, 300, 1000, 5000])
def test_chunks_respect_budget_and_reassemble_in_any_order(max_bytes):
    rng = np.random.default_rng(max_bytes)
    _, _, neurons, images, vals = random_block(rng, n_neurons=30, n_images=400, density=0.4)
    chunks = codec.encode(neurons, images, vals, n_images=400, max_bytes=max_bytes, **FIELDS)
    assert len(chunks) > 1
    assert all(len(c) <= max_bytes for c in chunks)
    headers = [codec.decode_header(c) for c in chunks]
    assert [h.chunk for h in headers] == list(range(len(chunks)))
    assert {h.n_chunks for h in headers} == {len(chunks)}
    order = rng.permutation(len(chunks))
    with_duplicates = [chunks[i] for i in order] + [chunks[order[0]]]
    assembler = codec.Assembler()
    results = [assembler.add(c) for c in with_duplicates]
    done = [m for m in results if m is not None]
    assert len(done) == 1
    np.testing.assert_array_equal(done[0].neurons, neurons)
    np.testing.assert_array_equal(done[0].images, images)
    assert_same_bits(done[0].values, vals)


def _renumbered(chunk: bytes, index: int, n_chunks: int) -> bytes:
    """``chunk`` re-sealed as chunk ``index`` of ``n_chunks`` (what a forger can do)."""
    fields = codec.decode_header(chunk)
    return codec._pack_chunk((fields.run_id, fields.layer, fields.batch, fields.source,
                              fields.target, index, n_chunks, fields.n_images),
                             fields.n_rows, fields.nnz, chunk[codec.HEADER_SIZE:], fields.flags, fields.raw_len)


@pytest.mark.parametrize("second", [([5, 6], [0, 1]), ([6], [0]), ([4], [3])])
def test_assembler_refuses_chunks_that_overlap_or_run_backwards(second):
    """Chunks of a message each hold distinct, ordered entries; two whose entries overlap or run
    backwards would assemble into repeated or unsorted COO, so the message is refused."""
    first = codec.encode(np.array([5, 6], np.int32), np.array([0, 1], np.int32),
                         np.array([1.0, 2.0], np.float32), n_images=4)[0]
    later = codec.encode(np.array(second[0], np.int32), np.array(second[1], np.int32),
                         np.ones(len(second[0]), np.float32), n_images=4)[0]
    assembler = codec.Assembler()
    assert assembler.add(_renumbered(first, 0, 2)) is None
    with pytest.raises(codec.CodecError, match="overlap or are out of order"):
        assembler.add(_renumbered(later, 1, 2))
    fine = codec.encode(np.array([6, 7], np.int32), np.array([2, 0], np.int32),
                        np.ones(2, np.float32), n_images=4)[0]
    assembler = codec.Assembler()
    assembler.add(_renumbered(first, 0, 2))
    whole = assembler.add(_renumbered(fine, 1, 2))
    np.testing.assert_array_equal(whole.neurons, [5, 6, 6, 7])
    np.testing.assert_array_equal(whole.images, [0, 1, 2, 0])


def test_chunking_is_not_wasteful():
    """Cutting a block for a budget costs few chunks beyond its size over the budget."""
    rng = np.random.default_rng(8)
    _, _, neurons, images, vals = random_block(rng, n_neurons=60, n_images=1000, density=0.5)
    whole = len(codec.encode(neurons, images, vals, n_images=1000)[0]) - codec.HEADER_SIZE
    for max_bytes in (2_000, 10_000, 50_000):
        chunks = codec.encode(neurons, images, vals, n_images=1000, max_bytes=max_bytes)
        assert all(len(c) <= max_bytes for c in chunks)
        needed = -(-whole // (max_bytes - codec.HEADER_SIZE))
        assert needed <= len(chunks) <= 1.25 * needed + 1


def test_a_row_longer_than_the_budget_is_split():
    images = np.arange(0, 20_000, 2, dtype=np.int32)
    vals = np.random.default_rng(0).standard_normal(images.size).astype(np.float32)
    neurons = np.full(images.size, 9, np.int32)
    chunks = codec.encode(neurons, images, vals, n_images=20_000, max_bytes=4096)
    assert len(chunks) >= 10 and all(len(c) <= 4096 for c in chunks)
    m = roundtrip(chunks)
    np.testing.assert_array_equal(m.images, images)
    assert_same_bits(m.values, vals)


def test_decode_into_matches_naive_scatter():
    rng = np.random.default_rng(5)
    ids, _, neurons, images, vals = random_block(rng, n_neurons=25, n_images=200, density=0.3)
    slot_of_neuron = np.full(100_000, -1, np.int64)
    slot_of_neuron[ids] = rng.permutation(25) + 3
    block = np.zeros((30, 210), np.float32)
    for chunk in codec.encode(neurons, images, vals, n_images=200, max_bytes=700):
        h = codec.decode_into(chunk, block, slot_of_neuron, column_offset=10)
        assert h.n_images == 200
    assert_same_bits(block, naive_scatter(neurons, images, vals, slot_of_neuron, (30, 210), 10))


def test_decode_into_refuses_unexpected_neuron_without_writing():
    chunk = codec.encode([1, 2, 5], [0, 1, 2], [1.0, 2.0, 3.0], n_images=3)[0]
    slot_of_neuron = np.array([-1, 0, 1, -1, -1, -1])  # neuron 5 has no slot
    block = np.zeros((2, 3), np.float32)
    with pytest.raises(codec.CodecError, match="not expected"):
        codec.decode_into(chunk, block, slot_of_neuron)
    assert not block.any()
    with pytest.raises(codec.CodecError, match="columns"):
        codec.decode_into(chunk, np.zeros((2, 2), np.float32), np.arange(6) % 2)


def test_encode_dense_and_encode_rows_equal_encode():
    rng = np.random.default_rng(11)
    ids, dense, neurons, images, vals = random_block(rng, n_neurons=20, n_images=150, density=0.5)
    block = np.zeros((25, 160), np.float32)
    rows = rng.permutation(25)[:20]
    block[rows] = np.pad(dense, ((0, 0), (0, 10)))
    want = codec.encode(neurons, images, vals, n_images=150, **FIELDS)
    assert codec.encode_dense(block, rows, ids, n_images=150, **FIELDS) == want
    row_ptr = np.concatenate(([0], np.cumsum((dense != 0).sum(axis=1))))
    assert codec.encode_rows(ids, row_ptr, images, vals, n_images=150, **FIELDS) == want
    # over a budget (cut into chunks), and a block far larger than any before (the reused
    # payload buffer grows)
    split = codec.encode(neurons, images, vals, n_images=150, max_bytes=600, **FIELDS)
    assert len(split) > 1 and codec.encode_dense(block, rows, ids, n_images=150, max_bytes=600, **FIELDS) == split
    big = rng.random((300, 2000), dtype=np.float32)
    big[big < 0.5] = 0
    r, c = np.nonzero(big)
    assert codec.encode_dense(big, np.arange(300), np.arange(300) * 2, n_images=2000, **FIELDS) == \
        codec.encode(r * 2, c, big[r, c], n_images=2000, **FIELDS)


def test_dense_rows_subsets_equal_encode_dense():
    """Rows extracted once, encoded for several targets: byte for byte what encode_dense gives,
    in one chunk and cut under a budget."""
    rng = np.random.default_rng(12)
    block = rng.random((40, 700), dtype=np.float32)
    block[block < 0.6] = 0
    block[7] = 0  # an empty row
    block[[9, 11, 13]] = block[3]  # copies, which a subset may hold without their first
    block[[20, 21]] = block[5] * (block[5] > 0.9)  # another group
    rows = np.concatenate([[3, 9, 11, 13, 5, 20, 21], rng.permutation([r for r in range(40) if r not in
                                                                       (3, 9, 11, 13, 5, 20, 21)])[:23]])
    extracted = codec.DenseRows(block, rows, 650)
    for max_bytes in (None, 900):
        for trial in range(12):
            positions = rng.choice(30, size=rng.integers(0, 31), replace=False)
            if trial % 3:
                positions = np.sort(positions)
            neurons = np.sort(rng.choice(5000, size=positions.shape[0], replace=False))
            want = codec.encode_dense(block, rows[positions], neurons, n_images=650, layer=4, target=2,
                                      max_bytes=max_bytes)
            got = extracted.encode(positions, neurons, layer=4, target=2, max_bytes=max_bytes)
            assert got == want
            subset = codec.Subset(positions, neurons)
            assert extracted.encode_subset(subset, layer=4, target=2, max_bytes=max_bytes) == want
    for positions, neurons, match in [([30], [1], "positions must lie"), ([1, 2], [5], "differ in length"),
                                      ([1, 2], [5, 5], "strictly increase"), ([-1], [1], "positions must lie")]:
        with pytest.raises(ValueError, match=match):
            extracted.encode(positions, neurons)


def test_csr_row_groups_equal_the_naive_twin():
    """Each row's group is the first row with the same images and values (itself if none)."""
    rng = np.random.default_rng(13)
    rows = [np.sort(rng.choice(30, rng.integers(0, 6), replace=False)) for _ in range(60)]
    rows = [r if rng.random() < 0.5 else rows[rng.integers(0, i + 1)] for i, r in enumerate(rows)]
    values = [rng.choice(np.float32([1, 2, 32]), r.shape[0]) for r in rows]
    for i in range(1, 60, 7):  # same images, other values: not a copy
        rows[i], values[i] = rows[i - 1], values[i - 1] + np.float32(1)
    row_ptr = np.concatenate(([0], np.cumsum([r.shape[0] for r in rows]))).astype(np.int64)
    images = np.concatenate(rows).astype(np.int32)
    bits = np.concatenate(values).astype(np.float32).view(np.uint32)
    groups = np.empty(60, np.int64)
    kernels.csr_row_groups(row_ptr, images, bits, groups)
    content = [(tuple(r), tuple(v.astype(np.float32).view(np.uint32))) for r, v in zip(rows, values)]
    assert groups.tolist() == [content.index(c) for c in content]
    assert len(set(groups.tolist())) < 60  # the case has copies


@pytest.mark.parametrize("bad, match", [
    (dict(neurons=[2, 1], images=[0, 0], values=[1, 1]), "sorted"),
    (dict(neurons=[1, 1], images=[1, 1], values=[1, 1]), "sorted"),
    (dict(neurons=[1, 1], images=[0, 9], values=[1, 1]), "images must lie"),
    (dict(neurons=[-1], images=[0], values=[1]), "neurons must lie"),
    (dict(neurons=[1], images=[0], values=[0.1]), "float32"),
    (dict(neurons=[1], images=[0], values=["x"]), "float32"),
    (dict(neurons=[1, 2], images=[0], values=[1]), "length"),
])
def test_encode_rejects_bad_blocks(bad, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(**bad, n_images=5)


@pytest.mark.parametrize("kwargs", [dict(layer=-1), dict(batch=2**32), dict(run_id=b"x" * 17),
                                    dict(run_id="text"), dict(max_bytes=10), dict(n_images=-3)])
def test_encode_rejects_bad_fields(kwargs):
    args = dict(n_images=5) | kwargs
    with pytest.raises(ValueError):
        codec.encode([1], [0], [1.0], **args)


def valid_chunk():
    rng = np.random.default_rng(2)
    pool = rng.choice(np.float32([0.5, 1.5, 3.0]), (10, 64))
    _, _, neurons, images, vals = random_block(rng, n_neurons=10, n_images=64, density=0.5, values=pool)
    return codec.encode(neurons, images, vals, n_images=64, **FIELDS)[0]


def reseal(head_fields: dict, payload: bytes) -> bytes:
    """A chunk with chosen header fields and a correct checksum (a well-formed lie)."""
    head = codec._HEAD.pack(*head_fields.values())
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def fields_of(chunk: bytes) -> dict:
    names = ["magic", "version", "flags", "rid_len", "reserved", "rid", "layer", "batch", "source",
             "target", "chunk", "n_chunks", "n_images", "n_rows", "nnz", "raw_len", "payload_len"]
    return dict(zip(names, codec._HEAD.unpack_from(chunk)))


def uncompressed_chunk():
    chunk = codec.encode([1, 1, 4], [0, 2, 1], [1.5, 2.5, 3.5], n_images=3)[0]
    assert not codec.decode_header(chunk).flags & codec.FLAG_ZLIB
    return chunk


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c[:10], "shorter"),
    (lambda c: b"XXXX" + c[4:], "magic"),
    (lambda c: c[:4] + b"\x09" + c[5:], "version"),
    (lambda c: c[:-1], "payload bytes"),
    (lambda c: c + b"\0", "payload bytes"),
    (lambda c: c[:-1] + bytes([c[-1] ^ 1]), "checksum"),
    (lambda c: c[:30] + bytes([c[30] ^ 4]) + c[31:], "checksum"),
])
def test_decode_rejects_damaged_chunks(mutate, match):
    with pytest.raises(codec.CodecError, match=match):
        codec.decode(mutate(valid_chunk()))


@pytest.mark.parametrize("change, match", [
    (dict(chunk=1, n_chunks=1), "chunk index"),
    (dict(nnz=4), "more entries|fewer entries|cannot hold|raw payload"),
    (dict(nnz=2), "more entries"),
    (dict(n_rows=1), "neuron|entries|trailing|truncated"),
    (dict(n_images=2), "image index out of range"),
    (dict(nnz=2**30), "limits"),
    (dict(flags=0x80), "flags"),
    (dict(rid_len=20), "run id"),
])
def test_decode_rejects_consistent_lies(change, match):
    chunk = uncompressed_chunk()
    fields = fields_of(chunk) | change
    with pytest.raises(codec.CodecError, match=match):
        codec.decode(reseal(fields, chunk[codec.HEADER_SIZE:]))


@pytest.mark.parametrize("zstd", [True, False])
def test_decode_rejects_lying_compressed_length(zstd, monkeypatch):
    if not zstd:
        monkeypatch.setattr(codec, "zstandard", None)
    chunk = valid_chunk()
    fields = fields_of(chunk)
    assert fields["flags"] == (codec.FLAG_ZSTD if zstd else codec.FLAG_ZLIB)
    assert codec.decode(chunk).values.size == fields["nnz"]
    for raw_len in (fields["raw_len"] - 1, fields["raw_len"] + 1):
        with pytest.raises(codec.CodecError, match="inflate"):
            codec.decode(reseal(fields | dict(raw_len=raw_len), chunk[codec.HEADER_SIZE:]))
    with pytest.raises(codec.CodecError, match="corrupt compressed"):
        codec.decode(reseal(fields, b"\x00" * fields["payload_len"]))


def test_zstd_chunk_without_zstandard_is_a_clear_error(monkeypatch):
    chunk = valid_chunk()
    monkeypatch.setattr(codec, "zstandard", None)
    with pytest.raises(codec.CodecError, match="zstandard"):
        codec.decode(chunk)


def test_tracker_counts_chunks_and_refuses_changed_count():
    chunks = codec.encode(np.repeat(np.arange(50), 8), np.tile(np.arange(8), 50),
                          np.arange(400, dtype=np.float32), n_images=8, max_bytes=400)
    tracker = codec.ChunkTracker()
    headers = [codec.decode_header(c) for c in chunks]
    assert all(tracker.accept(h) for h in headers[:-1])
    assert not tracker.complete(headers[0].key)
    assert not tracker.accept(headers[0])
    assert tracker.accept(headers[-1]) and tracker.complete(headers[0].key)
    liar = headers[0].__class__(**{**headers[0].__dict__, "n_chunks": 99})
    with pytest.raises(codec.CodecError, match="announced"):
        tracker.accept(liar)


def test_text_envelope_roundtrip_is_sqs_safe_and_budgeted():
    allowed = {9, 10, 13} | set(range(0x20, 0x7F))
    for chunk in [valid_chunk(), uncompressed_chunk(), bytes(range(256)) * 3]:
        text = codec.to_text(chunk)
        assert set(text.encode("utf-8")) <= allowed
        assert '"' not in text and "\\" not in text
        assert codec.from_text(text) == chunk
    for limit in range(40):
        n = codec.max_payload_for_text(limit)
        assert len(codec.to_text(b"\xff" * n)) <= limit < len(codec.to_text(b"\xff" * (n + 1)))
    for bad in ["~~~~~", "ab\u00e9cd", 'ab"cd', "0", "012345", 5]:
        with pytest.raises(codec.CodecError):
            codec.from_text(bad)


def test_text_envelope_is_rfc1924_base85():
    """The kernel twin of ``base64.b85encode``/``b85decode`` (the naive reference)."""
    import base64

    rng = np.random.default_rng(4)
    for n in list(range(17)) + [1000, 4097]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        text = codec.to_text(data)
        assert text.encode("ascii") == base64.b85encode(data)
        assert codec.from_text(text) == base64.b85decode(text) == data


def test_subsets_checked_together_equal_subsets_checked_one_by_one():
    """``Subset.many`` (one pass over a worker's per-peer selections) against its naive twin, a
    ``Subset`` each: the same arrays, and the same refusals, naming the subset."""
    rng = np.random.default_rng(21)
    for trial in range(40):
        k = int(rng.integers(0, 9))
        positions, neurons = [], []
        for _ in range(k):
            m = int(rng.integers(0, 6)) if rng.random() < 0.8 else 0
            positions.append(rng.integers(0, 50, m).astype(rng.choice([np.int32, np.int64, np.uint16])))
            neurons.append(np.sort(rng.choice(1 << 20, m, replace=False)).astype(rng.choice([np.int32, np.int64])))
        got = codec.Subset.many(positions, neurons)
        want = [codec.Subset(p, n) for p, n in zip(positions, neurons)]
        assert len(got) == len(want) == k
        for g, w in zip(got, want):
            assert g.positions.dtype == w.positions.dtype and g.neurons.dtype == w.neurons.dtype
            np.testing.assert_array_equal(g.positions, w.positions)
            np.testing.assert_array_equal(g.neurons, w.neurons)
            assert g.end == w.end
    # a subset may start below where the one before ended; within one, neurons strictly increase
    assert [s.end for s in codec.Subset.many([[4, 1], [0]], [[7, 9], [2]])] == [5, 1]
    good = ([0, 1], [3, 4])
    for positions, neurons, match in [
            ([1 << 31], [1], "positions must lie"), ([-1], [1], "positions must lie"),
            ([1], [-2], "neurons must lie"), ([1], [1 << 31], "neurons must lie"),
            ([1, 2], [5, 5], "strictly increase"), ([1, 2], [6, 5], "strictly increase"),
            ([1, 2], [5], "differ in length"), ([0.5], [1], "must hold integers"),
            ([[1]], [[1]], "must be 1-D")]:
        with pytest.raises(ValueError, match=f"subset 1: .*{match}"):
            codec.Subset.many([good[0], positions, good[0]], [good[1], neurons, good[1]])
    with pytest.raises(ValueError, match="positions and neurons differ in length"):
        codec.Subset.many([[1]], [])
    assert codec.Subset.many([], []) == []


def test_dense_encoders_refuse_rows_of_an_empty_block_and_take_read_only_blocks():
    """Row 0 of a block with no rows was read past the array (garbage on the wire)."""
    empty = np.zeros((0, 100), np.float32)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 0\)"):
        codec.encode_dense(empty, [0], [0], n_images=100)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 0\)"):
        codec.DenseRows(empty, [0], 100)
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    block.flags.writeable = False
    chunk = codec.encode_dense(block, [1], [7], n_images=4)[0]
    assert codec.decode(chunk).values.tolist() == [4.0, 5.0, 6.0, 7.0]
    assert codec.DenseRows(block, [2], 4).encode([0], [9])[0] == codec.encode_dense(block, [2], [9], n_images=4)[0]


def test_a_refused_chunk_does_not_count_as_seen():
    """A chunk refused for disagreeing on n_images once counted as seen, so the genuine chunk
    of that number was dropped as a duplicate and the message never completed (KeyError)."""
    neurons = np.repeat(np.arange(4, dtype=np.int32), 50)
    images = np.tile(np.arange(50, dtype=np.int32), 4)
    values = np.random.default_rng(3).random(200).astype(np.float32)
    good = codec.encode(neurons, images, values, n_images=50, max_bytes=300)
    assert len(good) > 2
    h = codec.decode_header(good[1])
    bogus = codec.encode(np.array([0], np.int32), np.array([0], np.int32), np.ones(1, np.float32),
                         n_images=60)[0]
    bogus = codec._pack_chunk((h.run_id, h.layer, h.batch, h.source, h.target, 1, h.n_chunks, 60),
                              1, 1, bogus[codec.HEADER_SIZE:], codec.decode_header(bogus).flags,
                              codec.decode_header(bogus).raw_len)
    assembler = codec.Assembler()
    assert assembler.add(good[0]) is None
    with pytest.raises(codec.CodecError, match="n_images"):
        assembler.add(bogus)
    results = [assembler.add(c) for c in good[1:]]
    assert results[:-1] == [None] * (len(good) - 2)
    np.testing.assert_array_equal(results[-1].neurons, neurons)


def test_codec_helpers_refuse_arguments_of_the_wrong_kind():
    chunk = codec.encode(np.array([1], np.int32), np.array([0], np.int32), np.ones(1, np.float32), n_images=2)[0]
    block = np.zeros((2, 4), np.float32)
    for offset in (0.9, True, "1"):
        with pytest.raises(ValueError, match="column_offset"):
            codec.decode_into(chunk, block, np.arange(2), column_offset=offset)
    with pytest.raises(ValueError, match="header"):
        codec.decode_into(chunk, block, np.arange(2), header="x")
    with pytest.raises(ValueError, match="Header"):
        codec.ChunkTracker().accept(chunk)
    with pytest.raises(ValueError, match="limit"):
        codec.max_payload_for_text(2.5)
    codec.decode_into(chunk, block, np.arange(2), column_offset=np.int64(2))
    assert block[1].tolist() == [0.0, 0.0, 1.0, 0.0]
