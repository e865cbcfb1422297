"""Serial Numba kernels of the activation-message codec (format: docs/codec.md).

Compiled two ways from this source, like :mod:`fsd_kernels._core`: numba
JIT on a developer machine, AOT into the native module of the Lambda layer.
So: explicit signatures in ``EXPORTS``, no closures, no ``parallel=True``,
results through preallocated arrays.

Encoding kernels trust their (validated) arguments. Decoding kernels read
hostile bytes: every read is bounds-checked by hand (``boundscheck`` is
off), every count is checked before it is used, and errors come back as
negative codes that :mod:`fsd_kernels.codec` turns into ``CodecError``.
Every decoding kernel first walks the whole payload without writing (the
check costs O(payload bytes), not O(entries)), then writes.
"""
import numba as nb
import numpy as np

from fsd_kernels._codec_codes import (
    DICT_MAX, DICT_MIN_USES, E_COPY, E_DICT, E_DICT_ORDER, E_EMPTY_ROW, E_IMAGE_RANGE, E_NEURON_RANGE,
    E_NO_PREVIOUS, E_ROW_KIND, E_TOO_FEW, E_TOO_MANY, E_TRAILING, E_TRUNCATED, E_UNEXPECTED_NEURON,
    E_VALUE_MODE, E_VARINT, KIND_BITMAP, KIND_BITS, KIND_COPY, KIND_LIST, KIND_RUN, VALUES_CONST,
    VALUES_DICT, VALUES_RAW,
)

_OPTS = dict(nogil=True, cache=True, boundscheck=False)
_INLINE = dict(nogil=True, cache=True, inline="always")

#: kernel name -> numba signature; the AOT build exports exactly these.
EXPORTS = {
    "dense_rows_to_csr": "i8(f4[:, ::1], i8[::1], i8, i8[::1], i4[::1], u4[::1])",
    "encode_dense_rows": "i8(f4[:, ::1], i8[::1], i4[::1], i8, u1[::1], i8[::1])",
    "csr_row_groups": "void(i8[::1], i4[::1], u4[::1], i8[::1])",
    "encode_csr_subset": "i8(i8[::1], i4[::1], u4[::1], i8[::1], i8[::1], i4[::1], u1[::1], i8[::1])",
    "encode_rows": "i8(i4[::1], i8[::1], i4[::1], u4[::1], u1[::1], u4[::1], i8[::1])",
    "encode_values": "i8(u4[::1], u1[::1], i8)",
    "check_payload": "i8(u1[::1], i8, i8, i8)",
    "decode_coo": "i8(u1[::1], i8, i8, i8, i4[::1], i4[::1], u4[::1])",
    "decode_into_block": "i8(u1[::1], i8, i8, i8, i8[::1], f4[:, ::1], i8)",
    "base85_encode": "i8(u1[::1], u1[::1])",
    "base85_decode": "i8(u1[::1], u1[::1])",
}

_NEURON_LIMIT = 2 ** 31
_U32_MAX = 2 ** 32 - 1
_GOLDEN = np.uint64(2654435761)


def _kernel(fn):
    return nb.njit(EXPORTS[fn.__name__], **_OPTS)(fn)


# ---------------------------------------------------------------- encoding

@nb.njit(**_INLINE)
def _put_varint(out, pos, value):
    """LEB128: 7 bits a byte, low bits first; returns the position after it."""
    v = np.uint64(value)
    while v >= 128:
        out[pos] = np.uint8((v & np.uint64(127)) | np.uint64(128))
        v >>= np.uint64(7)
        pos += 1
    out[pos] = np.uint8(v)
    return pos + 1


@nb.njit(**_INLINE)
def _varint_size(value):
    n = 1
    while value >= 128:
        value >>= 7
        n += 1
    return n


@nb.njit(nogil=True, cache=True)
def _same_images(images, a0, a1, b0, b1):
    if a1 - a0 != b1 - b0:
        return False
    for k in range(a1 - a0):
        if images[a0 + k] != images[b0 + k]:
            return False
    return True


@nb.njit(nogil=True, cache=True)
def _put_row(out, pos, images, lo, hi):
    """One explicit row record: the smallest of run, bitmap and gap list."""
    count = hi - lo
    first = np.int64(images[lo])
    last = np.int64(images[hi - 1])
    if last - first + 1 == count:
        pos = _put_varint(out, pos, (count << KIND_BITS) | KIND_RUN)
        return _put_varint(out, pos, first)
    nbytes = (last - first) // 8 + 1
    bitmap_cost = _varint_size((nbytes << KIND_BITS) | KIND_BITMAP) + _varint_size(first) + nbytes
    list_cost = _varint_size((count << KIND_BITS) | KIND_LIST) + _varint_size(first)
    for p in range(lo + 1, hi):
        list_cost += _varint_size(images[p] - images[p - 1] - 1)
        if list_cost > bitmap_cost:
            break
    if list_cost <= bitmap_cost:
        pos = _put_varint(out, pos, (count << KIND_BITS) | KIND_LIST)
        pos = _put_varint(out, pos, first)
        for p in range(lo + 1, hi):
            pos = _put_varint(out, pos, images[p] - images[p - 1] - 1)
        return pos
    pos = _put_varint(out, pos, (nbytes << KIND_BITS) | KIND_BITMAP)
    pos = _put_varint(out, pos, first)
    for b in range(nbytes):
        out[pos + b] = 0
    for p in range(lo, hi):
        d = images[p] - first
        out[pos + (d >> 3)] |= np.uint8(1 << (d & 7))
    return pos + nbytes


@nb.njit(nogil=True, cache=True)
def _row_hashes(row_ptr, images, bits):
    """A 64-bit FNV-style hash of each row's (image, value bits) pairs, one multiply a pair
    (the chain of multiplies is the cost), the high half folded into the low bits that pick
    a table slot."""
    n_rows = row_ptr.shape[0] - 1
    hashes = np.empty(n_rows, np.uint64)
    prime = np.uint64(1099511628211)
    for r in range(n_rows):
        h = np.uint64(14695981039346656037)
        for p in range(row_ptr[r], row_ptr[r + 1]):
            h = (h ^ ((np.uint64(images[p]) << np.uint64(32)) | np.uint64(bits[p]))) * prime
        hashes[r] = h ^ (h >> np.uint64(32))
    return hashes


@nb.njit(nogil=True, cache=True)
def _same_row(row_ptr, images, bits, a, b):
    if not _same_images(images, row_ptr[a], row_ptr[a + 1], row_ptr[b], row_ptr[b + 1]):
        return False
    for k in range(row_ptr[a + 1] - row_ptr[a]):
        if bits[row_ptr[a] + k] != bits[row_ptr[b] + k]:
            return False
    return True


@nb.njit(nogil=True, cache=True)
def _copy_sources(row_ptr, images, bits):
    """For each row, the earlier row with the same images and values (-1: none).

    Only rows that are not copies themselves are sources, so a copy is one hop.
    """
    n_rows = row_ptr.shape[0] - 1
    source = np.full(n_rows, -1, np.int64)
    hashes = _row_hashes(row_ptr, images, bits)
    size = 16
    while size < 2 * n_rows:
        size *= 2
    mask = size - 1
    table = np.full(size, -1, np.int64)
    for r in range(n_rows):
        h = np.int64(hashes[r] >> np.uint64(1)) & mask
        while table[h] >= 0:
            other = table[h]
            if hashes[other] == hashes[r] and _same_row(row_ptr, images, bits, other, r):
                source[r] = other
                break
            h = (h + 1) & mask
        if source[r] < 0:
            table[h] = r
    return source


@_kernel
def csr_row_groups(row_ptr, images, bits, group):
    """``group[r]``: the first row with the images and values of row ``r`` (``r`` if none is
    before it). Found once for rows encoded for several targets, so that each message finds
    its copies without hashing or comparing rows again."""
    source = _copy_sources(row_ptr, images, bits)
    for r in range(source.shape[0]):
        group[r] = source[r] if source[r] >= 0 else r


@nb.njit(nogil=True, cache=True)
def _image_ranks(images):
    """Each entry's place when the entries are stably ordered by image: a counting sort over
    the images' span when that is small next to the entries, else a merge sort (so a far-out
    image cannot force a big table)."""
    n = images.shape[0]
    rank = np.empty(n, np.int64)
    if n == 0:
        return rank
    lo = images.min()
    span = np.int64(images.max()) - lo + 1
    if span > n + 4096:  # the table (8 bytes an image of the span) stays within 8 (n + 4097) bytes
        order = np.argsort(images, kind="mergesort")
        for i in range(n):
            rank[order[i]] = i
        return rank
    start = np.zeros(span + 1, np.int64)
    for i in range(n):
        start[images[i] - lo + 1] += 1
    for j in range(span):
        start[j + 1] += start[j]
    for i in range(n):
        j = images[i] - lo
        rank[i] = start[j]
        start[j] += 1
    return rank


@nb.njit(nogil=True, cache=True)
def _encode_rows_copying(row_neurons, starts, ends, images, bits, source, out, kept_bits, counts):
    """:func:`encode_rows` of the rows ``images/bits[starts[r]:ends[r]]`` (no copy of a subset
    of some bigger CSR) given each row's copy source (``_copy_sources``); ``kept_bits`` has
    room for every entry."""
    n_rows = row_neurons.shape[0]
    pos = 0
    prev = -1
    for r in range(n_rows):
        pos = _put_varint(out, pos, row_neurons[r] - prev - 1 if r else row_neurons[r])
        prev = row_neurons[r]
    kept_images = np.empty(kept_bits.shape[0], np.int64)
    n_kept = 0
    for r in range(n_rows):
        lo = starts[r]
        hi = ends[r]
        if source[r] >= 0:
            pos = _put_varint(out, pos, ((r - source[r]) << KIND_BITS) | KIND_COPY)
            continue
        if r and _same_images(images, lo, hi, starts[r - 1], ends[r - 1]):
            out[pos] = 0
            pos += 1
        else:
            pos = _put_row(out, pos, images, lo, hi)
        kept_images[n_kept:n_kept + hi - lo] = images[lo:hi]
        n_kept += hi - lo
    rank = _image_ranks(kept_images[:n_kept])
    k = 0
    for r in range(n_rows):
        if source[r] < 0:
            for p in range(starts[r], ends[r]):
                kept_bits[rank[k]] = bits[p]
                k += 1
    counts[0] = n_kept
    return pos


@_kernel
def encode_rows(row_neurons, row_ptr, images, bits, out, kept_bits, counts):
    """Write the neuron section and the row section; return the bytes written.

    Rows must be non-empty. A row equal (images and values) to an earlier
    row is a copy of it; a row with the previous row's images costs one
    byte. The values of the rows that are not copies go to ``kept_bits``
    (their number to ``counts[0]``) for :func:`encode_values`, in image
    order (by image, then row), which compresses 5-35% better than row order. ``out`` must
    hold ``16 * n_rows + 5 * nnz + 16`` bytes (the worst case; with the
    value section, ``codec._raw_bound``).
    """
    return _encode_rows_copying(row_neurons, row_ptr[:-1], row_ptr[1:], images, bits,
                                _copy_sources(row_ptr, images, bits), out, kept_bits, counts)


@nb.njit(**_INLINE)
def _slot(key, mask, shift):
    return np.int64(((np.uint64(key) * _GOLDEN) & np.uint64(0xFFFFFFFF)) >> np.uint64(shift)) & mask


@nb.njit(nogil=True, cache=True)
def _dictionary(bits, limit):
    """Distinct values of ``bits`` (sorted) and each value's code, or an empty table if
    there are more than ``limit`` of them."""
    n = bits.shape[0]
    log = 6
    while (1 << log) < 2 * limit:
        log += 1
    size = 1 << log
    mask = size - 1
    shift = 32 - log
    keys = np.zeros(size, np.uint32)
    used = np.zeros(size, np.bool_)
    k = 0
    for i in range(n):
        v = bits[i]
        h = _slot(v, mask, shift)
        while used[h] and keys[h] != v:
            h = (h + 1) & mask
        if not used[h]:
            if k == limit:
                return np.empty(0, np.uint32), np.empty(0, np.int32)
            used[h] = True
            keys[h] = v
            k += 1
    table = np.empty(k, np.uint32)
    j = 0
    for h in range(size):
        if used[h]:
            table[j] = keys[h]
            j += 1
    table.sort()
    # each slot's code (its key's rank in the sorted table): one probe a value, not a search
    code_of_slot = np.empty(size, np.int32)
    for c in range(k):
        h = _slot(table[c], mask, shift)
        while keys[h] != table[c]:
            h = (h + 1) & mask
        code_of_slot[h] = c
    codes = np.empty(n, np.int32)
    for i in range(n):
        v = bits[i]
        h = _slot(v, mask, shift)
        while keys[h] != v:
            h = (h + 1) & mask
        codes[i] = code_of_slot[h]
    return table, codes


@_kernel
def encode_values(bits, out, pos):
    """Write the value section (float32 bit patterns) at ``pos``; return its end.

    Constant when every value is the same; a sorted dictionary with 1- or
    2-byte codes when each entry serves at least ``DICT_MIN_USES`` values;
    else the raw bits as four byte planes (which a compressor likes better).
    Needs ``4 * nnz + 16`` bytes of room.
    """
    n = bits.shape[0]
    if n == 0:
        return pos
    same = True
    for i in range(1, n):
        if bits[i] != bits[0]:
            same = False
            break
    if same:
        out[pos] = VALUES_CONST
        for b in range(4):
            out[pos + 1 + b] = np.uint8((bits[0] >> np.uint32(8 * b)) & np.uint32(255))
        return pos + 5
    limit = min(DICT_MAX, n // DICT_MIN_USES)
    if limit >= 2:
        table, codes = _dictionary(bits, limit)
        if table.shape[0]:
            out[pos] = VALUES_DICT
            pos = _put_varint(out, pos + 1, table.shape[0] - 1)
            prev = np.int64(-1)
            for c in range(table.shape[0]):
                pos = _put_varint(out, pos, np.int64(table[c]) - prev - 1)
                prev = np.int64(table[c])
            if table.shape[0] <= 256:
                for i in range(n):
                    out[pos + i] = np.uint8(codes[i])
                return pos + n
            for i in range(n):
                out[pos + i] = np.uint8(codes[i] >> 8)
                out[pos + n + i] = np.uint8(codes[i] & 255)
            return pos + 2 * n
    out[pos] = VALUES_RAW
    pos += 1
    for i in range(n):
        v = bits[i]
        out[pos + i] = np.uint8(v & np.uint32(255))
        out[pos + n + i] = np.uint8((v >> np.uint32(8)) & np.uint32(255))
        out[pos + 2 * n + i] = np.uint8((v >> np.uint32(16)) & np.uint32(255))
        out[pos + 3 * n + i] = np.uint8(v >> np.uint32(24))
    return pos + 4 * n


@_kernel
def dense_rows_to_csr(block, rows, n_cols, row_ptr, images, bits):
    """Nonzeros of ``block[rows[r], :n_cols]`` as CSR (row_ptr, images, float32 bits).

    ``images``/``bits`` need ``len(rows) * n_cols + 1`` room (every entry is written, only
    nonzeros are kept: no branch to mispredict); returns nnz.
    """
    nnz = 0
    row_ptr[0] = 0
    flat = block.view(np.uint32)
    for r in range(rows.shape[0]):
        src = block[rows[r]]
        src_bits = flat[rows[r]]
        for c in range(n_cols):
            images[nnz] = c
            bits[nnz] = src_bits[c]
            nnz += src[c] != 0.0
        row_ptr[r + 1] = nnz
    return nnz


@nb.njit(nogil=True, cache=True)
def _short_of_room(n_kept, nnz, out, counts):
    """Record (rows kept, nnz) in ``counts``; ``-(bytes needed)`` if ``out`` cannot hold the
    payload, else 0."""
    counts[0] = n_kept
    counts[1] = nnz
    need = 16 * n_kept + 9 * nnz + 32
    return -need if out.shape[0] < need else 0


@nb.njit(nogil=True, cache=True)
def _payload_of_rows(row_neurons, starts, ends, nnz, images, bits, source, out):
    """Neuron, row and value sections of the non-empty rows ``images/bits[starts[r]:ends[r]]``
    (``nnz`` entries in all), whose copy sources are ``source``, into ``out``; returns the length."""
    kept_bits = np.empty(nnz, np.uint32)
    kept = np.zeros(1, np.int64)
    pos = _encode_rows_copying(row_neurons, starts, ends, images, bits, source, out, kept_bits, kept)
    return encode_values(kept_bits[:kept[0]], out, pos)


@_kernel
def encode_dense_rows(block, rows, neurons, n_cols, out, counts):
    """The raw payload of the nonzeros of ``block[rows[r], :n_cols]`` as neuron ``neurons[r]``,
    in one call (what ``dense_rows_to_csr``, dropping empty rows, ``encode_rows`` and
    ``encode_values`` do in turn). Returns the payload length, or ``-(bytes needed)`` when
    ``out`` is too small; ``counts`` gets (rows kept, nnz). Trusted input: rows in range,
    neurons strictly increasing.
    """
    n_in = rows.shape[0]
    nnz = 0
    n_kept = 0
    for r in range(n_in):
        src = block[rows[r]]
        k = 0
        for c in range(n_cols):
            if src[c] != 0.0:
                k += 1
        nnz += k
        if k:
            n_kept += 1
    short = _short_of_room(n_kept, nnz, out, counts)
    if short:
        return short
    kept_neurons = np.empty(n_kept, np.int32)
    row_ptr = np.empty(n_kept + 1, np.int64)
    images = np.empty(nnz + 1, np.int32)  # + 1: every entry is written, only nonzeros kept
    bits = np.empty(nnz + 1, np.uint32)
    flat = block.view(np.uint32)
    row_ptr[0] = 0
    q = 0
    p = 0
    for r in range(n_in):
        src = block[rows[r]]
        src_bits = flat[rows[r]]
        start = p
        for c in range(n_cols):
            # branch-free: rows are neither sparse nor dense enough for a branch to predict
            images[p] = c
            bits[p] = src_bits[c]
            p += src[c] != 0.0
        if p > start:
            kept_neurons[q] = neurons[r]
            q += 1
            row_ptr[q] = p
    return _payload_of_rows(kept_neurons, row_ptr[:-1], row_ptr[1:], nnz, images, bits,
                            _copy_sources(row_ptr, images, bits), out)


@_kernel
def encode_csr_subset(row_ptr, images, bits, groups, positions, neurons, out, counts):
    """The raw payload of CSR rows ``positions[i]`` sent as neuron ``neurons[i]`` (rows
    extracted once, encoded for several targets; ``groups`` from :func:`csr_row_groups`).
    Returns the payload length, or ``-(bytes needed)`` when ``out`` is too small; ``counts``
    gets (rows kept, nnz). Trusted input: a CSR with ascending images per row, positions in
    range, neurons strictly increasing.
    """
    n_sel = positions.shape[0]
    nnz = 0
    n_kept = 0
    for i in range(n_sel):
        k = row_ptr[positions[i] + 1] - row_ptr[positions[i]]
        nnz += k
        if k:
            n_kept += 1
    short = _short_of_room(n_kept, nnz, out, counts)
    if short:
        return short
    kept_neurons = np.empty(n_kept, np.int32)
    starts = np.empty(n_kept, np.int64)
    ends = np.empty(n_kept, np.int64)
    source = np.empty(n_kept, np.int64)
    first_of_group = np.full(groups.shape[0], -1, np.int64)  # kept row showing each group first
    q = 0
    for i in range(n_sel):
        lo = row_ptr[positions[i]]
        hi = row_ptr[positions[i] + 1]
        if hi == lo:
            continue
        g = groups[positions[i]]
        source[q] = first_of_group[g]
        if source[q] < 0:
            first_of_group[g] = q
        kept_neurons[q] = neurons[i]
        starts[q] = lo
        ends[q] = hi
        q += 1
    return _payload_of_rows(kept_neurons, starts, ends, nnz, images, bits, source, out)


# ---------------------------------------------------------------- decoding

@nb.njit(**_INLINE)
def _get_varint(data, pos):
    """Return ``(value, next position)``; a next position < 0 is an error code."""
    end = data.shape[0]
    value = np.int64(0)
    shift = 0
    while True:
        if pos >= end:
            return value, E_TRUNCATED
        b = np.int64(data[pos])
        pos += 1
        value |= (b & 127) << shift
        if b < 128:
            return value, pos
        shift += 7
        if shift >= 35:
            return value, E_VARINT


@nb.njit(**_INLINE)
def _u32(data, pos, stride):
    """Four bytes ``stride`` apart, least significant first."""
    return np.uint32(np.int64(data[pos]) | (np.int64(data[pos + stride]) << 8)
                     | (np.int64(data[pos + 2 * stride]) << 16) | (np.int64(data[pos + 3 * stride]) << 24))


@nb.njit(nogil=True, cache=True)
def _check_values(data, pos, nnz):
    """Check the value section at ``pos``: ``(error, mode, values pos, code width, dictionary)``."""
    end = data.shape[0]
    no_dict = np.empty(0, np.uint32)
    if nnz == 0:
        return (0 if pos == end else E_TRAILING), VALUES_CONST, pos, 0, no_dict
    if pos >= end:
        return E_TRUNCATED, 0, 0, 0, no_dict
    mode = np.int64(data[pos])
    pos += 1
    if mode == VALUES_CONST:
        stop = pos + 4
    elif mode == VALUES_RAW:
        stop = pos + 4 * nnz
    elif mode == VALUES_DICT:
        size, pos = _get_varint(data, pos)
        if pos < 0:
            return pos, 0, 0, 0, no_dict
        size += 1
        if size > DICT_MAX or size > end - pos:
            return E_DICT, 0, 0, 0, no_dict
        dictionary = np.empty(size, np.uint32)
        prev = np.int64(-1)
        for c in range(size):
            gap, pos = _get_varint(data, pos)
            if pos < 0:
                return pos, 0, 0, 0, no_dict
            prev = prev + gap + 1
            if prev > _U32_MAX:
                return E_DICT_ORDER, 0, 0, 0, no_dict
            dictionary[c] = np.uint32(prev)
        width = 1 if size <= 256 else 2
        stop = pos + width * nnz
        if stop > end:
            return E_TRUNCATED, 0, 0, 0, no_dict
        if stop < end:
            return E_TRAILING, 0, 0, 0, no_dict
        if size != 256 and size != DICT_MAX:
            for k in range(nnz):
                code = np.int64(data[pos + k])
                if width == 2:
                    code = (code << 8) | np.int64(data[pos + nnz + k])
                if code >= size:
                    return E_DICT, 0, 0, 0, no_dict
        return 0, mode, pos, width, dictionary
    else:
        return E_VALUE_MODE, 0, 0, 0, no_dict
    if stop > end:
        return E_TRUNCATED, 0, 0, 0, no_dict
    if stop < end:
        return E_TRAILING, 0, 0, 0, no_dict
    return 0, mode, pos, 0, no_dict


@nb.njit(**_INLINE)
def _highest_bit(byte):
    h = 0
    while byte > 1:
        byte >>= 1
        h += 1
    return h


@nb.njit(**_INLINE)
def _popcount(byte):
    c = byte - ((byte >> 1) & 0x55)
    c = (c & 0x33) + ((c >> 2) & 0x33)
    return (c + (c >> 4)) & 0x0F


@nb.njit(nogil=True, cache=True)
def _record(data, pos, n_images):
    """Parse an explicit row record's fixed part: ``(error or next pos, kind, count or nbytes, first)``."""
    tag, pos = _get_varint(data, pos)
    if pos < 0:
        return pos, 0, 0, 0
    kind = tag & 7
    count = tag >> KIND_BITS
    if kind != KIND_LIST and kind != KIND_BITMAP and kind != KIND_RUN:
        return E_ROW_KIND, 0, 0, 0
    if count == 0:
        return E_EMPTY_ROW, 0, 0, 0
    first, pos = _get_varint(data, pos)
    if pos < 0:
        return pos, 0, 0, 0
    if first >= n_images:
        return E_IMAGE_RANGE, 0, 0, 0
    return pos, kind, count, first


@nb.njit(nogil=True, cache=True)
def _check_record(data, pos, n_images):
    """Check an explicit row record; return ``(error or next pos, entries)``. O(bytes)."""
    pos, kind, count, first = _record(data, pos, n_images)
    if pos < 0:
        return pos, 0
    if kind == KIND_RUN:
        if count > n_images - first:
            return E_IMAGE_RANGE, 0
        return pos, count
    if kind == KIND_LIST:
        if count > n_images - first:
            return E_IMAGE_RANGE, 0
        img = first
        for i in range(1, count):
            gap, pos = _get_varint(data, pos)
            if pos < 0:
                return pos, 0
            img += gap + 1
            if img >= n_images:
                return E_IMAGE_RANGE, 0
        return pos, count
    nbytes = count
    if nbytes > data.shape[0] - pos:
        return E_TRUNCATED, 0
    count = 0
    for b in range(nbytes):
        count += _popcount(np.int64(data[pos + b]))
    if count == 0:
        return E_EMPTY_ROW, 0
    b = nbytes - 1
    while data[pos + b] == 0:
        b -= 1
    last = 8 * b + _highest_bit(np.int64(data[pos + b]))
    if first + last >= n_images:
        return E_IMAGE_RANGE, 0
    return pos + nbytes, count


@nb.njit(nogil=True, cache=True)
def _check_rows(data, n_rows, nnz, n_images, slot_of_neuron, rec, vstart, copied):
    """Walk the neuron and row sections without writing; return ``(values pos or error, n values, longest row)``.

    Fills, per row, the position of the explicit record that holds its
    images (``rec``), the index of its first value in row order (``vstart``)
    and whether it is a copy (``copied``), which resolves repeats and copies
    for the writing pass. O(bytes), not O(nnz).
    """
    pos = 0
    neuron = np.int64(-1)
    for r in range(n_rows):
        v, pos = _get_varint(data, pos)
        if pos < 0:
            return pos, 0, 0
        neuron = v if r == 0 else neuron + v + 1
        if neuron >= _NEURON_LIMIT:
            return E_NEURON_RANGE, 0, 0
        if slot_of_neuron.shape[0] and (neuron >= slot_of_neuron.shape[0] or slot_of_neuron[neuron] < 0):
            return E_UNEXPECTED_NEURON, 0, 0
    k = np.int64(0)
    n_values = np.int64(0)
    count = np.int64(0)
    max_count = np.int64(0)
    counts = np.empty(n_rows, np.int64)
    for r in range(n_rows):
        if pos >= data.shape[0]:
            return E_TRUNCATED, 0, 0
        if data[pos] == 0:
            if r == 0:
                return E_NO_PREVIOUS, 0, 0
            pos += 1
            rec[r] = rec[r - 1]
            count = counts[r - 1]
            vstart[r] = n_values
            n_values += count
        elif data[pos] & 7 == KIND_COPY:
            back, pos = _get_varint(data, pos)
            if pos < 0:
                return pos, 0, 0
            back >>= KIND_BITS
            if back < 1 or back > r:
                return E_COPY, 0, 0
            rec[r] = rec[r - back]
            vstart[r] = vstart[r - back]
            copied[r] = True
            count = counts[r - back]
        else:
            rec[r] = pos
            pos, count = _check_record(data, pos, n_images)
            if pos < 0:
                return pos, 0, 0
            vstart[r] = n_values
            n_values += count
        if count > nnz - k:
            return E_TOO_MANY, 0, 0
        counts[r] = count
        k += count
        max_count = max(max_count, count)
    if k != nnz:
        return E_TOO_FEW, 0, 0
    return pos, n_values, max_count


@nb.njit(nogil=True, cache=True)
def _row_images(data, pos, out):
    """Images of a checked explicit record into ``out``; returns how many."""
    p, kind, count, first = _record(data, pos, 1 << 62)
    if kind == KIND_RUN:
        for i in range(count):
            out[i] = first + i
        return count
    if kind == KIND_LIST:
        img = first
        out[0] = img
        for i in range(1, count):
            gap, p = _get_varint(data, p)
            img += gap + 1
            out[i] = img
        return count
    n = 0
    for b in range(count):
        byte = np.int64(data[p + b])
        if byte == 0:
            continue
        base = first + 8 * b
        for bit in range(8):  # branch-free: always write, advance on a set bit (out has 8 spare)
            out[n] = base + bit
            n += (byte >> bit) & 1
    return n


@nb.njit(nogil=True, cache=True)
def _decode_values(data, mode, vpos, width, dictionary, n_values):
    """All values of a checked value section, as float32 bits (the one value of a constant
    section once: entry k's value is ``values[k * (values.shape[0] > 1)]``)."""
    if mode == VALUES_CONST:
        return np.full(1, _u32(data, vpos, 1), np.uint32)
    values = np.empty(n_values, np.uint32)
    if mode == VALUES_RAW:
        for k in range(n_values):
            values[k] = _u32(data, vpos + k, n_values)
    elif width == 1:
        for k in range(n_values):
            values[k] = dictionary[data[vpos + k]]
    else:
        for k in range(n_values):
            values[k] = dictionary[(np.int64(data[vpos + k]) << 8) | np.int64(data[vpos + n_values + k])]
    return values


@nb.njit(nogil=True, cache=True)
def _to_row_order(data, rec, vstart, copied, max_count, mode, values):
    """Permute the values of the non-copy rows from image order (as sent) to row order, in place."""
    if mode == VALUES_CONST:
        return
    n_values = values.shape[0]
    images = np.empty(n_values, np.int32)  # image ids are below 2**31 (MAX_IMAGES)
    row_images = np.empty(max_count + 8, np.int32)
    for r in range(rec.shape[0]):
        if not copied[r]:
            count = _row_images(data, rec[r], row_images)
            images[vstart[r]:vstart[r] + count] = row_images[:count]
    rank = _image_ranks(images)
    sent = values.copy()
    for i in range(n_values):
        values[i] = sent[rank[i]]


@nb.njit(nogil=True, cache=True)
def _emit_rows(data, n_rows, write_coo, neurons_out, images_out, bits_out, slot_of_neuron, block, col_off,
               rec, vstart, max_count, values):
    """Second pass over checked sections: fill COO arrays or scatter value bits into ``block`` (uint32)."""
    row_images = np.empty(max_count + 8, np.int32)
    step = np.int64(values.shape[0] > 1)  # 0: one constant value for every entry
    npos = 0
    neuron = np.int64(-1)
    k = np.int64(0)
    for r in range(n_rows):
        v, npos = _get_varint(data, npos)
        neuron = v if r == 0 else neuron + v + 1
        count = _row_images(data, rec[r], row_images)
        vi = vstart[r]
        if write_coo:
            for i in range(count):
                neurons_out[k + i] = neuron
                images_out[k + i] = row_images[i]
                bits_out[k + i] = values[(vi + i) * step]
        else:
            dst = block[slot_of_neuron[neuron]]
            for i in range(count):
                dst[col_off + row_images[i]] = values[(vi + i) * step]
        k += count


@nb.njit(nogil=True, cache=True)
def _check_payload(data, n_rows, nnz, n_images, slot_of_neuron):
    """Check a whole raw payload: ``(error or 0, rec, vstart, copied, longest row, mode,
    values pos, code width, dictionary, n values)`` (see :func:`_check_rows`, :func:`_check_values`)."""
    rec = np.empty(n_rows, np.int64)
    vstart = np.empty(n_rows, np.int64)
    copied = np.zeros(n_rows, np.bool_)
    end, n_values, max_count = _check_rows(data, n_rows, nnz, n_images, slot_of_neuron, rec, vstart, copied)
    if end < 0:
        return end, rec, vstart, copied, max_count, 0, 0, 0, np.empty(0, np.uint32), n_values
    err, mode, vpos, width, dictionary = _check_values(data, end, n_values)
    return err, rec, vstart, copied, max_count, mode, vpos, width, dictionary, n_values


@_kernel
def check_payload(data, n_rows, nnz, n_images):
    """0 if a raw payload is a valid encoding of ``nnz`` entries in ``n_rows`` rows, else an
    error code. O(bytes): lets the caller allocate for ``nnz`` only once it is proven."""
    return _check_payload(data, n_rows, nnz, n_images, np.empty(0, np.int64))[0]


@_kernel
def decode_coo(data, n_rows, nnz, n_images, neurons, images, bits):
    """Check a raw payload, then decode it into COO arrays of length ``nnz``; 0 or an error code."""
    no_slots = np.empty(0, np.int64)
    err, rec, vstart, copied, max_count, mode, vpos, width, dictionary, n_values = _check_payload(
        data, n_rows, nnz, n_images, no_slots)
    if err:
        return err
    values = _decode_values(data, mode, vpos, width, dictionary, n_values)
    _to_row_order(data, rec, vstart, copied, max_count, mode, values)
    _emit_rows(data, n_rows, True, neurons, images, bits, no_slots, np.empty((1, 1), np.uint32), 0,
               rec, vstart, max_count, values)
    return 0


@_kernel
def decode_into_block(data, n_rows, nnz, n_images, slot_of_neuron, block, col_off):
    """Check a raw payload, then write its values to ``block[slot_of_neuron[n], col_off + image]``.

    The caller guarantees ``col_off + n_images <= block.shape[1]`` and that
    every non-negative slot is a row of ``block``; a neuron without a slot
    (out of range or negative) is an error. Returns 0 or an error code.
    """
    if slot_of_neuron.shape[0] == 0:
        return E_UNEXPECTED_NEURON if n_rows else 0
    err, rec, vstart, copied, max_count, mode, vpos, width, dictionary, n_values = _check_payload(
        data, n_rows, nnz, n_images, slot_of_neuron)
    if err:
        return err
    values = _decode_values(data, mode, vpos, width, dictionary, n_values)
    _to_row_order(data, rec, vstart, copied, max_count, mode, values)
    no_idx = np.empty(0, np.int32)
    _emit_rows(data, n_rows, False, no_idx, no_idx, np.empty(0, np.uint32), slot_of_neuron,
               block.view(np.uint32), col_off, rec, vstart, max_count, values)
    return 0


# ---------------------------------------------------------------- text envelope (RFC 1924 base85)

_B85_ALPHABET = np.frombuffer(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~", np.uint8)
_B85_VALUE = np.full(256, -1, np.int64)
_B85_VALUE[_B85_ALPHABET] = np.arange(85)


@_kernel
def base85_encode(src, out):
    """RFC 1924 base85 of ``src`` into ``out`` (``5 * ceil(n / 4)`` bytes of room), exactly as
    Python's ``base64.b85encode``: 5 characters per 4 bytes, big-endian, a short last group
    padded with zeros and cut to (its bytes + 1) characters. Returns the length."""
    n = src.shape[0]
    pos = 0
    for start in range(0, n, 4):
        word = np.int64(0)
        for j in range(4):
            word = (word << 8) | (np.int64(src[start + j]) if start + j < n else 0)
        for j in range(4, -1, -1):
            out[pos + j] = _B85_ALPHABET[word % 85]
            word //= 85
        pos += 5 if start + 4 <= n else n - start + 1
    return pos


@_kernel
def base85_decode(src, out):
    """Inverse of :func:`base85_encode` into ``out`` (``4 * ceil(n / 5)`` bytes of room);
    returns the length, or -1 for a character outside the alphabet, a group above 2**32 - 1
    or a one-character last group."""
    n = src.shape[0]
    if n % 5 == 1:
        return -1
    pos = 0
    for start in range(0, n, 5):
        word = np.int64(0)
        for j in range(5):
            v = _B85_VALUE[src[start + j]] if start + j < n else 84
            if v < 0:
                return -1
            word = word * 85 + v
        if word > 0xFFFFFFFF:
            return -1
        take = 4 if start + 5 <= n else n - start - 1
        for j in range(take):
            out[pos + j] = np.uint8((word >> (24 - 8 * j)) & 255)
        pos += take
    return pos
