"""Compact, safe binary codec for activation messages (format spec: docs/codec.md).

A message is a block of activation rows: the neurons one source worker
sends one target worker at one layer, over the images of a batch, as COO
sorted by (neuron, image). It becomes one or more self-describing chunks,
each no larger than a byte budget. No pickle, no eval: decoding validates
the header, the checksum and every count before any array is touched, and
raises :class:`CodecError` (a ``ValueError``) on anything malformed.

API (the runtime and custom handlers use these):

* ``encode(neurons, images, values, *, n_images, layer=0, source=0, target=0,
  batch=0, run_id=b"", max_bytes=None) -> list[bytes]``: COO in, chunks out.
* ``encode_rows(row_neurons, row_ptr, images, values, *, n_images, ...)``: the
  same from CSR (one row per neuron, ``row_ptr`` into images/values).
* ``encode_dense(block, rows, neurons, *, n_images, ...)``: the nonzeros of
  ``block[rows[i], :n_images]`` sent as neuron ``neurons[i]`` (the worker loop's
  dense ``[slot, image-column]`` blocks, no COO in between).
* ``DenseRows(block, rows, n_images).encode(positions, neurons, ...)``: the same for
  subsets of rows extracted once (one block's rows going to several targets);
  ``encode_subset(Subset(positions, neurons), ...)`` with the subset checked once
  (``Subset.many`` checks a list of them in one pass).
* ``decode(data) -> Message``: one chunk to COO arrays.
* ``decode_header(data) -> Header``: header and checksum only (for routing/dedup).
* ``chunk_nnz(chunk)``: the entry count of a chunk this process encoded (unchecked).
* ``decode_into(data, block, slot_of_neuron, *, column_offset=0, header=None) -> Header``:
  one chunk scattered straight into ``block[slot_of_neuron[neuron],
  column_offset + image]`` (``header``: what ``decode_header`` returned for this same
  chunk object, not checked again; nothing is written unless the whole chunk is valid;
  the caller zeroes the rows first; a neuron whose slot is -1 is an error).
* ``Assembler``: reassembles chunks (any order, duplicates ignored) into Messages;
  ``ChunkTracker``: the same bookkeeping for callers who use ``decode_into``.
* ``to_text``/``from_text``: a text-safe envelope for SNS/SQS bodies;
  ``max_payload_for_text(limit)``: the ``max_bytes`` that keeps the text within ``limit``.
"""
from __future__ import annotations

import itertools
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

try:
    import zstandard
except ImportError:  # zlib then, and zstd chunks cannot be read here
    zstandard = None

from fsd_kernels import _codec_codes as core
from fsd_kernels._backend import kernels

MAGIC = b"FSDM"
VERSION = 1
#: Flag values (low two bits): how the payload is compressed (``raw_len`` is its inflated size).
FLAG_ZLIB = 1
FLAG_ZSTD = 2
_COMPRESSION = 3
#: magic, version, flags, run_id length, reserved, run_id, layer, batch, source, target,
#: chunk, n_chunks, n_images, n_rows, nnz, raw_len, payload_len; then the crc32.
_HEAD = struct.Struct("<4sBBBB16s11I")
_CRC = struct.Struct("<I")
_NNZ, _NNZ_OFFSET = struct.Struct("<I"), 56
HEADER_SIZE = _HEAD.size + _CRC.size
RUN_ID_MAX = 16
#: Most entries one chunk may carry (bounds what a header can make a decoder allocate).
MAX_CHUNK_NNZ = 1 << 24
#: Largest image count (columns) a message may address.
MAX_IMAGES = (1 << 31) - 1
_U32 = (1 << 32) - 1
#: Most a payload may inflate: ``raw_len <= MAX_INFLATION * payload_len + INFLATION_FLOOR``. The
#: encoder sends a payload that would inflate more uncompressed (never seen on real blocks: the
#: raw format is already compact), so a forged header cannot make a decoder allocate more than
#: about ``2 * MAX_INFLATION`` times the chunk it received (inflated bytes, plus one copy for zlib).
MAX_INFLATION = 32
INFLATION_FLOOR = 64 * 1024
#: Smallest chunk budget accepted: a header and one worst-case entry.
MIN_MAX_BYTES = HEADER_SIZE + 64
#: Compression levels used when compression pays (zstd when installed, else zlib). zstd 3 is
#: within 3% of level 19 in bytes on the official run's blocks and 5-50x faster (docs/codec.md).
ZSTD_LEVEL = 3
ZLIB_LEVEL = 6
#: Payloads shorter than this are sent as they are.
MIN_COMPRESS = 64

_KERNEL_ERRORS = {
    core.E_TRUNCATED: "payload ends inside a field (truncated or a length field lies)",
    core.E_VARINT: "varint longer than 5 bytes",
    core.E_NEURON_RANGE: "neuron id out of range",
    core.E_NO_PREVIOUS: "first row refers to a previous row's images",
    core.E_IMAGE_RANGE: "image index out of range (>= n_images)",
    core.E_EMPTY_ROW: "row with no entries",
    core.E_TOO_MANY: "rows hold more entries than the header's nnz",
    core.E_VALUE_MODE: "unknown value section mode",
    core.E_DICT: "value dictionary code out of range",
    core.E_TRAILING: "trailing bytes after the value section",
    core.E_UNEXPECTED_NEURON: "neuron not expected by this receiver (no slot)",
    core.E_TOO_FEW: "rows hold fewer entries than the header's nnz",
    core.E_ROW_KIND: "unknown row record kind",
    core.E_DICT_ORDER: "value dictionary not strictly ascending",
    core.E_COPY: "row copies a row that is not before it",
}


class CodecError(ValueError):
    """A chunk is malformed, corrupted or inconsistent; the message says what is wrong."""


@dataclass(frozen=True)
class Header:
    """The fixed fields of one chunk."""

    run_id: bytes
    layer: int
    batch: int
    source: int
    target: int
    chunk: int
    n_chunks: int
    n_images: int
    n_rows: int
    nnz: int
    flags: int
    raw_len: int
    #: the chunk this header was read from (lets :func:`decode_into` skip reading it twice)
    source_chunk: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple:
        """What identifies the message this chunk belongs to."""
        return (self.run_id, self.layer, self.batch, self.source, self.target)


@dataclass(frozen=True)
class Message:
    """A decoded block in COO form, sorted by (neuron, image)."""

    neurons: np.ndarray
    images: np.ndarray
    values: np.ndarray
    n_images: int
    layer: int
    source: int
    target: int
    batch: int
    chunk: int
    n_chunks: int
    run_id: bytes


# ---------------------------------------------------------------- encoding

def _raw_bound(n_rows: int, nnz: int) -> int:
    """Most bytes a raw payload of ``n_rows`` rows and ``nnz`` entries can take."""
    return 16 * n_rows + 9 * nnz + 32


def _int_array(name: str, a, limit: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":  # signed or unsigned integers (not bool)
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= limit):
        raise ValueError(f"{name} must lie in [0, {limit})")
    return np.ascontiguousarray(a, dtype=np.int32)


def _float32_bits(values) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if v.dtype != np.float32:
        if v.size and not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
            raise ValueError(f"values must be float32, got dtype {v.dtype}")
        f = v.astype(np.float32)
        if not np.array_equal(f, v, equal_nan=True):
            raise ValueError("values must be exactly representable as float32")
        v = f
    return np.ascontiguousarray(v).view(np.uint32)


def _check_fields(n_images, layer, source, target, batch, run_id, max_bytes):
    for name, value in (("layer", layer), ("source", source), ("target", target), ("batch", batch)):
        if not isinstance(value, (int, np.integer)) or not 0 <= value <= _U32:
            raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    if not isinstance(n_images, (int, np.integer)) or not 0 <= n_images <= MAX_IMAGES:
        raise ValueError(f"n_images must be an int in [0, 2**31), got {n_images!r}")
    if not isinstance(run_id, (bytes, bytearray)) or len(run_id) > RUN_ID_MAX:
        raise ValueError(f"run_id must be bytes of length <= {RUN_ID_MAX}, got {run_id!r}")
    if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer)) or max_bytes < MIN_MAX_BYTES):
        raise ValueError(f"max_bytes must be an int >= {MIN_MAX_BYTES}, got {max_bytes!r}")


def _payload(row_neurons, row_ptr, images, bits) -> tuple[bytes, int, int]:
    """Encode one chunk's rows; return (payload, flags, raw length)."""
    n_rows = row_neurons.shape[0]
    nnz = images.shape[0]
    out = np.empty(_raw_bound(n_rows, nnz), np.uint8)
    kept_bits = np.empty(nnz, np.uint32)
    counts = np.zeros(1, np.int64)
    pos = kernels.encode_rows(row_neurons, row_ptr, images, bits, out, kept_bits, counts)
    pos = kernels.encode_values(kept_bits[:counts[0]], out, pos)
    return _finish_payload(out[:pos])


def inflation_bound(payload_len: int) -> int:
    """The largest raw payload a chunk with ``payload_len`` payload bytes may declare."""
    return MAX_INFLATION * payload_len + INFLATION_FLOOR


def _finish_payload(raw: np.ndarray) -> tuple[bytes, int, int]:
    """(body, flags, raw length): the raw payload compressed when that pays (and stays within
    the inflation bound every decoder enforces)."""
    if raw.shape[0] >= MIN_COMPRESS:
        packed, flag = _compress(raw)
        if len(packed) < raw.shape[0] and raw.shape[0] <= inflation_bound(len(packed)):
            return packed, flag, raw.shape[0]
    return raw.tobytes(), 0, raw.shape[0]


_local = threading.local()


def _zstd_compressor():
    """This thread's compressor: building one per chunk costs more than compressing a small
    payload, and a ZstdCompressor must not be shared between threads."""
    compressor = getattr(_local, "zstd", None)
    if compressor is None:
        compressor = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return compressor


def _zstd_decompressor():
    """This thread's decompressor (one per chunk costs more than a small chunk's decoding)."""
    decompressor = getattr(_local, "unzstd", None)
    if decompressor is None:
        decompressor = _local.unzstd = zstandard.ZstdDecompressor()
    return decompressor


def _compress(raw: bytes) -> tuple[bytes, int]:
    if zstandard is not None:
        return _zstd_compressor().compress(raw), FLAG_ZSTD
    return zlib.compress(raw, ZLIB_LEVEL), FLAG_ZLIB


def _piece_arrays(row_neurons, row_ptr, images, bits, a: int, b: int):
    """Rows covering entries [a, b) (a row may be cut at either end)."""
    whole = a == 0 and b == images.shape[0]
    if whole and row_neurons.flags.writeable and images.flags.writeable and bits.flags.writeable:
        return row_neurons, row_ptr, images, bits  # nothing to cut; the kernels need writeable arrays
    r0 = int(np.searchsorted(row_ptr, a, "right")) - 1
    r1 = int(np.searchsorted(row_ptr, b, "left"))
    ptr = np.clip(row_ptr[r0:r1 + 1], a, b) - a
    return row_neurons[r0:r1].copy(), np.ascontiguousarray(ptr), images[a:b].copy(), bits[a:b].copy()


def _cuts(row_ptr, a: int, b: int, parts: int) -> list[int]:
    """Cut points spreading entries [a, b) over ``parts`` pieces, each moved to a row boundary
    inside (a, b) if one is near (a row cut in two costs a second row header); strictly
    increasing, at least one."""
    cuts: list[int] = []
    slack = (b - a) // (8 * parts)
    for i in range(1, parts):
        x = a + (b - a) * i // parts
        j = int(np.searchsorted(row_ptr, x))
        near = [int(row_ptr[q]) for q in (j - 1, j) if 0 <= q < row_ptr.shape[0]
                and a < row_ptr[q] < b and abs(int(row_ptr[q]) - x) <= slack]
        x = min(near, key=lambda c: abs(c - x)) if near else x
        if (cuts[-1] if cuts else a) < x < b:
            cuts.append(x)
    return cuts or [(a + b) // 2]


def _chunk_payloads(row_neurons, row_ptr, images, bits, budget: int | None):
    """Payloads of the pieces of a block, each within ``budget`` bytes (None: one piece) and
    ``MAX_CHUNK_NNZ`` entries. A piece over either is cut into as many even parts as fill 90% of
    the budget (at row boundaries where possible), and so on until every piece fits."""
    nnz = images.shape[0]
    pending = [(0, nnz)]
    done = []
    while pending:
        a, b = pending.pop()
        arrays = _piece_arrays(row_neurons, row_ptr, images, bits, a, b)
        payload = _payload(*arrays)
        size = len(payload[0])
        if (budget is None or size <= budget) and b - a <= MAX_CHUNK_NNZ:
            done.append((a, arrays, payload))
            continue
        if b - a <= 1:
            raise ValueError("max_bytes is too small for a single entry")
        parts = max(2, -(-(b - a) // MAX_CHUNK_NNZ), -(-size * 10 // (9 * budget)) if budget else 0)
        bounds = [a, *_cuts(row_ptr, a, b, parts), b]
        pending += list(itertools.pairwise(bounds))
    done.sort(key=lambda item: item[0])
    return [(arrays, payload) for _, arrays, payload in done]


def _pack_chunk(fields: tuple, n_rows: int, nnz: int, body: bytes, flags: int, raw_len: int) -> bytes:
    """Header + checksum + body; ``fields`` = (run_id, layer, batch, source, target, chunk,
    n_chunks, n_images)."""
    rid, *numbers = fields
    rid = bytes(rid)
    head = _HEAD.pack(MAGIC, VERSION, flags, len(rid), 0, rid.ljust(RUN_ID_MAX, b"\0"), *numbers,
                      n_rows, nnz, raw_len, len(body))
    return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body


def _encode_csr(row_neurons, row_ptr, images, bits, *, n_images, layer, source, target, batch,
                run_id, max_bytes) -> list[bytes]:
    budget = None if max_bytes is None else max_bytes - HEADER_SIZE
    pieces = _chunk_payloads(row_neurons, row_ptr, images, bits, budget)
    return [_pack_chunk((run_id, int(layer), int(batch), int(source), int(target), i, len(pieces),
                         int(n_images)), arrays[0].shape[0], arrays[2].shape[0], *payload)
            for i, (arrays, payload) in enumerate(pieces)]


def encode(neurons, images, values, *, n_images, layer=0, source=0, target=0, batch=0,
           run_id=b"", max_bytes=None) -> list[bytes]:
    """Encode a block given as COO sorted by (neuron, image) into chunks of at most ``max_bytes``."""
    _check_fields(n_images, layer, source, target, batch, run_id, max_bytes)
    neurons = _int_array("neurons", neurons, 1 << 31)
    images = _int_array("images", images, n_images)
    bits = _float32_bits(values)
    if not neurons.shape[0] == images.shape[0] == bits.shape[0]:
        raise ValueError(f"neurons, images and values differ in length: "
                         f"{neurons.shape[0]}, {images.shape[0]}, {bits.shape[0]}")
    if neurons.shape[0] > 1:
        key = neurons.astype(np.int64) * (int(n_images) + 1) + images
        if np.any(np.diff(key) <= 0):
            raise ValueError("entries must be sorted by (neuron, image) without duplicates")
    starts = np.flatnonzero(np.diff(neurons)) + 1 if neurons.size else np.empty(0, np.int64)
    row_ptr = np.concatenate(([0], starts, [neurons.shape[0]])).astype(np.int64) if neurons.size \
        else np.zeros(1, np.int64)
    row_neurons = np.ascontiguousarray(neurons[row_ptr[:-1]])
    return _encode_csr(row_neurons, row_ptr, images, bits, n_images=n_images, layer=layer,
                       source=source, target=target, batch=batch, run_id=run_id, max_bytes=max_bytes)


def encode_rows(row_neurons, row_ptr, images, values, *, n_images, layer=0, source=0, target=0,
                batch=0, run_id=b"", max_bytes=None) -> list[bytes]:
    """Encode a block given as CSR rows: row i is neuron ``row_neurons[i]`` with images
    ``images[row_ptr[i]:row_ptr[i+1]]`` (strictly increasing). Empty rows are dropped."""
    _check_fields(n_images, layer, source, target, batch, run_id, max_bytes)
    row_neurons = _int_array("row_neurons", row_neurons, 1 << 31)
    images = _int_array("images", images, n_images)
    bits = _float32_bits(values)
    row_ptr = np.asarray(row_ptr)
    if row_ptr.ndim != 1 or row_ptr.shape[0] != row_neurons.shape[0] + 1 or not (
            row_ptr.size == 0 or np.issubdtype(row_ptr.dtype, np.integer)):
        raise ValueError("row_ptr must be integers, one more than row_neurons")
    row_ptr = row_ptr.astype(np.int64)
    if row_ptr[0] != 0 or row_ptr[-1] != images.shape[0] or np.any(np.diff(row_ptr) < 0):
        raise ValueError("row_ptr must start at 0, never decrease and end at len(images)")
    if bits.shape[0] != images.shape[0]:
        raise ValueError("images and values differ in length")
    if np.any(np.diff(row_neurons.astype(np.int64)) <= 0):
        raise ValueError("row_neurons must strictly increase")
    if images.shape[0] > 1:
        inside = np.ones(images.shape[0] - 1, bool)
        bounds = row_ptr[1:-1]
        inside[bounds[(bounds > 0) & (bounds < images.shape[0])] - 1] = False
        if np.any(np.diff(images)[inside] <= 0):
            raise ValueError("images must strictly increase within each row")
    keep = np.flatnonzero(np.diff(row_ptr))
    row_neurons = np.ascontiguousarray(row_neurons[keep])
    row_ptr = np.concatenate(([0], row_ptr[keep + 1])).astype(np.int64)
    return _encode_csr(row_neurons, row_ptr, images, bits, n_images=n_images, layer=layer,
                       source=source, target=target, batch=batch, run_id=run_id, max_bytes=max_bytes)


def encode_dense(block, rows, neurons, *, n_images, layer=0, source=0, target=0, batch=0,
                 run_id=b"", max_bytes=None) -> list[bytes]:
    """Encode the nonzeros of ``block[rows[i], :n_images]`` as neuron ``neurons[i]``.

    ``block`` is a float32 C-contiguous ``[slot, image-column]`` array;
    ``neurons`` must strictly increase. Zeros (either sign) are absent.
    """
    _check_fields(n_images, layer, source, target, batch, run_id, max_bytes)
    block, rows = _dense_rows(block, rows, n_images)
    neurons = _neuron_ids(neurons, rows.shape[0])
    fields = (run_id, int(layer), int(batch), int(source), int(target))
    single = _single_chunk(kernels.encode_dense_rows, (block, rows, neurons, int(n_images)), max_bytes)
    if single is not None:
        return [_pack_chunk((*fields, 0, 1, int(n_images)), *single)]
    return DenseRows(block, rows, n_images)._encode_pieces(np.arange(rows.shape[0]), neurons, fields,
                                                           max_bytes)


class Subset:
    """Rows ``positions`` of a :class:`DenseRows`, sent as ``neurons`` (strictly increasing):
    checked once, for a selection encoded again and again (a worker's rows for one peer at
    one layer, every batch)."""

    def __init__(self, positions, neurons):
        self.positions = _int_array("positions", positions, 1 << 31).astype(np.int64)
        self.neurons = _neuron_ids(neurons, self.positions.shape[0])
        self.end = int(self.positions.max()) + 1 if self.positions.size else 0  # rows it needs

    @classmethod
    def many(cls, positions: Sequence, neurons: Sequence) -> list["Subset"]:
        """``[Subset(p, n) for p, n in zip(positions, neurons)]``, checked in one pass over all of
        them (a worker builds one per peer and layer; checked one by one, they were most of its
        send plans' cost). Errors are :class:`Subset`'s, prefixed with the subset's index."""
        if len(positions) != len(neurons):
            raise ValueError("positions and neurons differ in length")
        pos = [np.asarray(p) for p in positions]
        neu = [np.asarray(n) for n in neurons]
        lengths = [p.shape[0] if p.ndim == 1 else -1 for p in pos]
        if not pos or any(a.ndim != 1 or a.size and a.dtype.kind not in "iu" for a in (*pos, *neu)) \
                or lengths != [n.shape[0] for n in neu]:
            return cls._one_by_one(positions, neurons)
        all_pos = np.concatenate(pos).astype(np.int64, copy=False)
        all_neu = np.concatenate(neu).astype(np.int64, copy=False)
        ends = np.cumsum(lengths)
        increasing = np.diff(all_neu) > 0
        inner = ends[:-1][(ends[:-1] > 0) & (ends[:-1] < all_neu.size)]
        increasing[inner - 1] = True  # a subset's first neuron need not exceed the last one's before
        if all_pos.size and (all_pos.min() < 0 or all_pos.max() >= 1 << 31 or all_neu.min() < 0
                             or all_neu.max() >= 1 << 31 or not increasing.all()):
            return cls._one_by_one(positions, neurons)
        neurons32 = all_neu.astype(np.int32)
        starts = ends - lengths
        nonempty = np.flatnonzero(np.asarray(lengths) > 0)
        last = np.zeros(len(lengths), np.int64)
        if nonempty.size:
            last[nonempty] = np.maximum.reduceat(all_pos, starts[nonempty]) + 1
        out = []
        for a, b, end in zip(starts.tolist(), ends.tolist(), last.tolist()):
            subset = cls.__new__(cls)
            subset.positions, subset.neurons, subset.end = all_pos[a:b], neurons32[a:b], end
            out.append(subset)
        return out

    @classmethod
    def _one_by_one(cls, positions, neurons) -> list["Subset"]:
        out = []
        for i, (p, n) in enumerate(zip(positions, neurons)):
            try:
                out.append(cls(p, n))
            except ValueError as exc:
                raise ValueError(f"subset {i}: {exc}") from None
        return out


class DenseRows:
    """The nonzeros of some rows of a dense block, extracted once, to encode subsets of them for
    several targets: a row several targets need is extracted (and compared with the others)
    once and encoded in each message.

    ``DenseRows(block, rows, n_images).encode(positions, neurons, ...)`` gives the chunks of
    :func:`encode_dense` ``(block, rows[positions], neurons, ...)``, byte for byte.
    """

    def __init__(self, block, rows, n_images: int):
        _check_fields(n_images, 0, 0, 0, 0, b"", None)
        block, rows = _dense_rows(block, rows, n_images)
        self.n_images = int(n_images)
        self.n_rows = rows.shape[0]
        self.row_ptr = np.empty(self.n_rows + 1, np.int64)
        # room for every entry (+1, see the kernel); pages past the nonzeros are never touched
        self.images = np.empty(self.n_rows * self.n_images + 1, np.int32)
        self.bits = np.empty(self.n_rows * self.n_images + 1, np.uint32)
        kernels.dense_rows_to_csr(block, rows, self.n_images, self.row_ptr, self.images, self.bits)
        self.groups = np.empty(self.n_rows, np.int64)  # equal rows, for the copy records
        kernels.csr_row_groups(self.row_ptr, self.images, self.bits, self.groups)

    def encode(self, positions, neurons, *, layer=0, source=0, target=0, batch=0, run_id=b"",
               max_bytes=None) -> list[bytes]:
        """Chunks of rows ``positions`` (indices into this object's rows) as ``neurons``."""
        return self.encode_subset(Subset(positions, neurons), layer=layer, source=source, target=target,
                                  batch=batch, run_id=run_id, max_bytes=max_bytes)

    def encode_subset(self, subset: Subset, *, layer=0, source=0, target=0, batch=0, run_id=b"",
                      max_bytes=None) -> list[bytes]:
        """:meth:`encode` of a :class:`Subset` (checked when it was made)."""
        _check_fields(self.n_images, layer, source, target, batch, run_id, max_bytes)
        if subset.end > self.n_rows:
            raise ValueError(f"positions must lie in [0, {self.n_rows})")
        fields = (run_id, int(layer), int(batch), int(source), int(target))
        single = _single_chunk(kernels.encode_csr_subset, (self.row_ptr, self.images, self.bits, self.groups,
                                                           subset.positions, subset.neurons), max_bytes)
        if single is not None:
            return [_pack_chunk((*fields, 0, 1, self.n_images), *single)]
        return self._encode_pieces(subset.positions, subset.neurons, fields, max_bytes)

    def _encode_pieces(self, positions, neurons, fields, max_bytes) -> list[bytes]:
        """The general path (chunks under ``max_bytes``) on the selected rows' CSR. The CSR is
        valid by construction (images ascend in each row): no re-check, empty rows dropped."""
        starts, ends = self.row_ptr[positions], self.row_ptr[positions + 1]
        keep = np.flatnonzero(ends > starts)
        lengths = ends[keep] - starts[keep]
        row_ptr = np.concatenate(([0], np.cumsum(lengths)))
        take = np.repeat(starts[keep] - row_ptr[:-1], lengths) + np.arange(row_ptr[-1])
        run_id, layer, batch, source, target = fields
        return _encode_csr(neurons[keep], row_ptr, self.images[take], self.bits[take], n_images=self.n_images,
                           layer=layer, source=source, target=target, batch=batch, run_id=run_id,
                           max_bytes=max_bytes)


def _dense_rows(block, rows, n_images) -> tuple[np.ndarray, np.ndarray]:
    """Check a dense block and its row indices: (the block as the kernels take it, the rows
    as int64)."""
    if not isinstance(block, np.ndarray) or block.dtype != np.float32 or block.ndim != 2 \
            or not block.flags.c_contiguous:
        raise ValueError("block must be a C-contiguous 2-D float32 array")
    if n_images > block.shape[1]:
        raise ValueError(f"n_images={n_images} exceeds the block's {block.shape[1]} columns")
    rows = _int_array("rows", rows, block.shape[0]).astype(np.int64)
    return (block if block.flags.writeable else block.copy()), rows  # (the JIT takes writeable arrays)


def _neuron_ids(neurons, n_rows: int) -> np.ndarray:
    neurons = _int_array("neurons", neurons, 1 << 31)
    if neurons.shape[0] != n_rows:
        raise ValueError("rows and neurons differ in length")
    if np.any(np.diff(neurons.astype(np.int64)) <= 0):
        raise ValueError("neurons must strictly increase")
    return neurons


def _scratch(size: int) -> np.ndarray:
    """This thread's reusable payload buffer, at least ``size`` bytes (a fresh one per chunk
    costs page faults that dwarf encoding a small block)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.shape[0] < size:
        buf = _local.scratch = np.empty(max(size, 1 << 16, 2 * (0 if buf is None else buf.shape[0])), np.uint8)
    return buf


def _single_chunk(kernel, args, max_bytes):
    """A block in one kernel call (``encode_dense_rows`` or ``encode_csr_subset`` on ``args``):
    ``(n_rows, nnz, body, flags, raw_len)`` when it fits one chunk, else None (then it is cut)."""
    counts = np.zeros(2, np.int64)
    out = _scratch(4096)
    pos = kernel(*args, out, counts)
    if pos < 0:
        out = _scratch(-pos)
        pos = kernel(*args, out, counts)
    n_rows, nnz = int(counts[0]), int(counts[1])
    body, flags, raw_len = (b"", 0, 0) if not nnz else _finish_payload(out[:pos])
    budget = None if max_bytes is None else max_bytes - HEADER_SIZE
    if nnz > MAX_CHUNK_NNZ or (budget is not None and len(body) > budget):
        return None
    return n_rows, nnz, body, flags, raw_len


# ---------------------------------------------------------------- decoding

def _as_bytes(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise CodecError(f"a chunk must be bytes, got {type(data).__name__}")


def decode_header(data, *, max_bytes: int | None = None) -> Header:
    """Check magic, version, lengths, field consistency and the checksum; return the header.

    ``max_bytes``: the receiver's chunk budget (its channel's ``max_chunk_bytes``); a longer
    chunk is refused before anything else is read."""
    data = _as_bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"chunk of {len(data)} bytes exceeds the receiver's budget of {max_bytes}")
    if len(data) < HEADER_SIZE:
        raise CodecError(f"chunk of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, flags, rid_len, reserved, rid, layer, batch, source, target, chunk, n_chunks,
     n_images, n_rows, nnz, raw_len, payload_len) = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r} (not an fsd_kernels.codec chunk)")
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version} (this reader knows {VERSION})")
    if flags & ~_COMPRESSION or flags == _COMPRESSION or reserved:
        raise CodecError(f"unknown flags {flags:#x} or nonzero reserved byte")
    if rid_len > RUN_ID_MAX or any(rid[rid_len:]):
        raise CodecError("bad run id field")
    if payload_len != len(data) - HEADER_SIZE:
        raise CodecError(f"header says {payload_len} payload bytes, chunk has {len(data) - HEADER_SIZE}")
    (crc,) = _CRC.unpack_from(data, _HEAD.size)
    if zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:_HEAD.size])) != crc:
        raise CodecError("checksum mismatch (chunk corrupted)")
    if n_chunks == 0 or chunk >= n_chunks:
        raise CodecError(f"chunk index {chunk} not below chunk count {n_chunks}")
    if n_images > MAX_IMAGES or nnz > MAX_CHUNK_NNZ:
        raise CodecError(f"n_images={n_images} or nnz={nnz} beyond the codec's limits")
    if n_rows > nnz or (nnz and not n_rows) or nnz > n_rows * n_images:
        raise CodecError(f"{n_rows} rows over {n_images} images cannot hold {nnz} entries")
    if raw_len > _raw_bound(n_rows, nnz) or (not flags and raw_len != payload_len) \
            or (flags and not raw_len):
        raise CodecError(f"raw payload length {raw_len} impossible for {n_rows} rows, {nnz} entries")
    if raw_len > inflation_bound(payload_len):
        raise CodecError(f"raw payload length {raw_len} beyond the inflation bound of a "
                         f"{payload_len}-byte payload ({inflation_bound(payload_len)})")
    return Header(rid[:rid_len], layer, batch, source, target, chunk, n_chunks, n_images, n_rows,
                  nnz, flags, raw_len, data)


def chunk_nnz(chunk: bytes) -> int:
    """The entry count a chunk's header declares, unchecked: for a sender's metrics on the
    chunks it has just encoded (anything received goes through :func:`decode_header`)."""
    return _NNZ.unpack_from(chunk, _NNZ_OFFSET)[0]


def _raw_payload(data: bytes, header: Header) -> np.ndarray:
    body = memoryview(data)[HEADER_SIZE:]
    if header.flags == FLAG_ZLIB:
        inflater = zlib.decompressobj()
        try:  # max_length bounds the output (decode_header refused raw_len 0, zlib's "no limit")
            raw = inflater.decompress(body, header.raw_len)
        except zlib.error as exc:
            raise CodecError(f"corrupt compressed payload: {exc}") from None
        if not inflater.eof or inflater.unused_data:
            raise CodecError(f"compressed payload does not inflate to the {header.raw_len} bytes declared")
    elif header.flags == FLAG_ZSTD:
        return _unzstd(body, header.raw_len)
    else:
        raw = body
    if len(raw) != header.raw_len:
        raise CodecError(f"compressed payload does not inflate to the {header.raw_len} bytes declared")
    return np.frombuffer(bytearray(raw), np.uint8)


def _unzstd(body, raw_len: int) -> np.ndarray:
    """The inflated payload, written straight into one writable array of ``raw_len`` bytes."""
    if zstandard is None:
        raise CodecError("chunk is zstd-compressed but the zstandard package is not installed")
    try:
        params = zstandard.get_frame_parameters(body)
        if params.content_size != raw_len:
            raise CodecError(f"compressed payload does not inflate to the {raw_len} bytes declared")
        out = np.empty(raw_len, np.uint8)
        with _zstd_decompressor().stream_reader(body, read_across_frames=False) as reader:
            filled = 0
            view = memoryview(out)
            while filled < raw_len:
                got = reader.readinto(view[filled:])
                if not got:
                    break
                filled += got
            extra = reader.read(1)
        if filled != raw_len or extra:
            raise CodecError(f"compressed payload does not inflate to the {raw_len} bytes declared")
        return out
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt compressed payload: {exc}") from None


def _kernel_error(code: int, header: Header) -> CodecError:
    what = _KERNEL_ERRORS.get(code, f"error code {code}")
    return CodecError(f"chunk {header.chunk}/{header.n_chunks} from {header.source} "
                      f"(layer {header.layer}): {what}")


def decode(data, *, max_bytes: int | None = None, max_nnz: int | None = None) -> Message:
    """Decode one chunk into a validated COO :class:`Message`. A receiver that knows its
    chunk budget (``max_bytes``) or how many entries it can expect (``max_nnz``, e.g. rows x
    images) passes them: the output arrays (12 bytes an entry) are then bounded by the receiver,
    not by the sender's header."""
    return _decode(data, max_bytes=max_bytes, max_nnz=max_nnz)[1]


def _decode(data, *, max_bytes: int | None = None, max_nnz: int | None = None) -> tuple[Header, Message]:
    data = _as_bytes(data)
    h = decode_header(data, max_bytes=max_bytes)
    if max_nnz is not None and h.nnz > max_nnz:
        raise CodecError(f"chunk declares {h.nnz} entries, the receiver expects at most {max_nnz}")
    raw = _raw_payload(data, h)
    if h.n_rows > raw.shape[0]:
        raise CodecError(f"{h.n_rows} rows cannot fit in {raw.shape[0]} payload bytes")
    err = kernels.check_payload(raw, h.n_rows, h.nnz, h.n_images)
    if err:
        raise _kernel_error(err, h)
    neurons = np.empty(h.nnz, np.int32)
    images = np.empty(h.nnz, np.int32)
    bits = np.empty(h.nnz, np.uint32)
    err = kernels.decode_coo(raw, h.n_rows, h.nnz, h.n_images, neurons, images, bits)
    if err:
        raise _kernel_error(err, h)
    return h, Message(neurons, images, bits.view(np.float32), h.n_images, h.layer, h.source, h.target,
                      h.batch, h.chunk, h.n_chunks, h.run_id)


def decode_into(data, block: np.ndarray, slot_of_neuron: np.ndarray, *, column_offset: int = 0,
                header: Header | None = None) -> Header:
    """Scatter one chunk into ``block[slot_of_neuron[neuron], column_offset + image]``.

    ``slot_of_neuron`` maps neuron id -> block row (int64; -1 = not expected,
    an error). The chunk is checked completely before anything is written.
    ``header``: what :func:`decode_header` returned for this very ``data`` object, to
    route a chunk before decoding it without checking its header twice.
    """
    data = _as_bytes(data)
    if not isinstance(block, np.ndarray) or block.dtype != np.float32 or block.ndim != 2 \
            or not block.flags.c_contiguous or not block.flags.writeable:
        raise ValueError("block must be a writeable C-contiguous 2-D float32 array")
    slots = np.asarray(slot_of_neuron)
    if slots.ndim != 1 or slots.size == 0 or slots.dtype.kind not in "iu":
        raise ValueError("slot_of_neuron must be a non-empty 1-D integer array")
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if slots.max() >= block.shape[0]:
        raise ValueError("slot_of_neuron points past the block's rows")
    if header is not None and not isinstance(header, Header):
        raise ValueError(f"header must be what decode_header returned, got {type(header).__name__}")
    h = header if header is not None and header.source_chunk is data else decode_header(data)
    if isinstance(column_offset, bool) or not isinstance(column_offset, (int, np.integer)):
        raise ValueError(f"column_offset must be an integer, got {column_offset!r}")
    if column_offset < 0 or column_offset + h.n_images > block.shape[1]:
        raise CodecError(f"chunk addresses {h.n_images} images at offset {column_offset}, "
                         f"block has {block.shape[1]} columns")
    if h.n_rows > block.shape[0]:  # rows of one chunk are distinct neurons, so distinct block rows
        raise CodecError(f"chunk has {h.n_rows} rows, more than the receiver's block has "
                         f"({block.shape[0]}): rows not expected")
    raw = _raw_payload(data, h)
    if h.n_rows > raw.shape[0]:
        raise CodecError(f"{h.n_rows} rows cannot fit in {raw.shape[0]} payload bytes")
    err = kernels.decode_into_block(raw, h.n_rows, h.nnz, h.n_images, slots, block, int(column_offset))
    if err:
        raise _kernel_error(err, h)
    return h


# ---------------------------------------------------------------- reassembly

class ChunkTracker:
    """Which chunks of which messages have been seen: at-least-once delivery, any order."""

    def __init__(self):
        self._seen: dict[tuple, set[int]] = {}
        self._n_chunks: dict[tuple, int] = {}

    def accept(self, header: Header) -> bool:
        """True the first time a (message, chunk) is offered; False for a duplicate."""
        if not isinstance(header, Header):
            raise ValueError(f"accept takes a Header (see decode_header), got {type(header).__name__}")
        n = self._n_chunks.setdefault(header.key, header.n_chunks)
        if n != header.n_chunks:
            raise CodecError(f"message {header.key} announced {n} chunks, now {header.n_chunks}")
        seen = self._seen.setdefault(header.key, set())
        if header.chunk in seen:
            return False
        seen.add(header.chunk)
        return True

    def complete(self, key: tuple) -> bool:
        """Whether every chunk of message ``key`` has been accepted."""
        return key in self._n_chunks and len(self._seen[key]) == self._n_chunks[key]


def _check_chunk_order(key, parts: list[Message], n_images: int) -> None:
    """Each chunk is sorted by (neuron, image); the message is only if every chunk starts after
    the one before ends (a sender cuts a block in order; overlapping chunks are forged)."""
    for before, after in zip(parts, parts[1:]):
        last = int(before.neurons[-1]) * n_images + int(before.images[-1])
        if int(after.neurons[0]) * n_images + int(after.images[0]) <= last:
            raise CodecError(f"message {key}: chunks overlap or are out of order")


class Assembler:
    """Reassemble chunks into whole Messages; duplicates (also after completion) are ignored."""

    def __init__(self):
        self._tracker = ChunkTracker()
        self._parts: dict[tuple, dict[int, Message]] = {}

    def add(self, data) -> Message | None:
        """Add one chunk; return the whole message (``chunk`` 0 of ``n_chunks``) when its last
        missing chunk arrives, else None."""
        header, message = _decode(data)  # decoded (checked) before it counts as seen
        parts = self._parts.get(header.key, {})
        if parts and next(iter(parts.values())).n_images != message.n_images:  # before it is seen
            raise CodecError(f"message {header.key}: chunks disagree on n_images")
        if not self._tracker.accept(header):
            return None
        self._parts.setdefault(header.key, parts)[header.chunk] = message
        if not self._tracker.complete(header.key):
            return None
        del self._parts[header.key]
        ordered = [parts[i] for i in range(header.n_chunks)]
        _check_chunk_order(header.key, [m for m in ordered if m.neurons.shape[0]], message.n_images)
        return Message(np.concatenate([m.neurons for m in ordered]),
                       np.concatenate([m.images for m in ordered]),
                       np.concatenate([m.values for m in ordered]),
                       message.n_images, message.layer, message.source, message.target,
                       message.batch, 0, header.n_chunks, message.run_id)


# ---------------------------------------------------------------- text envelope

def to_text(chunk: bytes) -> str:
    """A chunk as text valid in SNS, SQS and S3 bodies: RFC 1924 base85 (5 ASCII characters per
    4 bytes, no quote or backslash, so JSON envelopes do not escape it; byte-identical to
    ``base64.b85encode``). See docs/codec.md for why base85."""
    data = np.frombuffer(_as_bytes(chunk), np.uint8).copy()
    out = np.empty(5 * (-(-data.shape[0] // 4)), np.uint8)
    return out[:kernels.base85_encode(data, out)].tobytes().decode("ascii")


def from_text(text: str) -> bytes:
    """Inverse of :func:`to_text`; malformed text raises :class:`CodecError`."""
    if not isinstance(text, str):
        raise CodecError(f"text envelope must be str, got {type(text).__name__}")
    try:
        data = np.frombuffer(text.encode("ascii"), np.uint8).copy()
    except UnicodeEncodeError:
        raise CodecError("text envelope has non-ASCII characters") from None
    out = np.empty(4 * (-(-data.shape[0] // 5)), np.uint8)
    n = kernels.base85_decode(data, out)
    if n < 0:
        raise CodecError("malformed text envelope (not base85)")
    return out[:n].tobytes()


def max_payload_for_text(limit: int) -> int:
    """The largest chunk size whose :func:`to_text` form has at most ``limit`` characters."""
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
    return 4 * (limit // 5) + max(0, limit % 5 - 1)
