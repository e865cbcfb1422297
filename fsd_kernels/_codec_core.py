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

from fsd_kernels._codec_codes import (  # noqa: F401  (the kernels read them as globals)
    DICT_MAX, DICT_MIN_USES, E_DICT, E_DICT_ORDER, E_EMPTY_ROW, E_IMAGE_RANGE, E_NEURON_RANGE,
    E_NO_PREVIOUS, E_ROW_KIND, E_TOO_FEW, E_TOO_MANY, E_TRAILING, E_TRUNCATED,
    E_UNEXPECTED_NEURON, E_VALUE_MODE, E_VARINT, KIND_BITMAP, KIND_LIST, KIND_RUN, VALUES_CONST,
    VALUES_DICT, VALUES_RAW,
)

_OPTS = dict(nogil=True, cache=True, boundscheck=False)
_INLINE = dict(nogil=True, cache=True, inline="always")

#: kernel name -> numba signature; the AOT build exports exactly these.
EXPORTS = {
    "dense_rows_to_csr": "i8(f4[:, ::1], i8[::1], i8, i8[::1], i4[::1], u4[::1])",
    "encode_rows": "i8(i4[::1], i8[::1], i4[::1], u1[::1])",
    "encode_values": "i8(u4[::1], u1[::1], i8)",
    "decode_coo": "i8(u1[::1], i8, i8, i8, i4[::1], i4[::1], u4[::1])",
    "decode_into_block": "i8(u1[::1], i8, i8, i8, i8[::1], f4[:, ::1], i8)",
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
        pos = _put_varint(out, pos, (count << 2) | KIND_RUN)
        return _put_varint(out, pos, first)
    nbytes = (last - first) // 8 + 1
    bitmap_cost = _varint_size((nbytes << 2) | KIND_BITMAP) + _varint_size(first) + nbytes
    list_cost = _varint_size((count << 2) | KIND_LIST) + _varint_size(first)
    for p in range(lo + 1, hi):
        list_cost += _varint_size(images[p] - images[p - 1] - 1)
        if list_cost > bitmap_cost:
            break
    if list_cost <= bitmap_cost:
        pos = _put_varint(out, pos, (count << 2) | KIND_LIST)
        pos = _put_varint(out, pos, first)
        for p in range(lo + 1, hi):
            pos = _put_varint(out, pos, images[p] - images[p - 1] - 1)
        return pos
    pos = _put_varint(out, pos, (nbytes << 2) | KIND_BITMAP)
    pos = _put_varint(out, pos, first)
    for b in range(nbytes):
        out[pos + b] = 0
    for p in range(lo, hi):
        d = images[p] - first
        out[pos + (d >> 3)] |= np.uint8(1 << (d & 7))
    return pos + nbytes


@_kernel
def encode_rows(row_neurons, row_ptr, images, out):
    """Write the neuron section and the row section; return the bytes written.

    Rows must be non-empty. ``out`` must hold ``16 * n_rows + 5 * nnz + 16``
    bytes (the worst case). A row equal to the previous one costs one byte.
    """
    n_rows = row_neurons.shape[0]
    pos = 0
    prev = -1
    for r in range(n_rows):
        pos = _put_varint(out, pos, row_neurons[r] - prev - 1 if r else row_neurons[r])
        prev = row_neurons[r]
    for r in range(n_rows):
        lo = row_ptr[r]
        hi = row_ptr[r + 1]
        if r and _same_images(images, lo, hi, row_ptr[r - 1], row_ptr[r]):
            out[pos] = 0
            pos += 1
        else:
            pos = _put_row(out, pos, images, lo, hi)
    return pos


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
    codes = np.empty(n, np.int32)
    for i in range(n):
        codes[i] = np.searchsorted(table, bits[i])
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

    ``images``/``bits`` need ``len(rows) * n_cols`` room; returns nnz.
    """
    nnz = 0
    row_ptr[0] = 0
    flat = block.view(np.uint32)
    for r in range(rows.shape[0]):
        src = block[rows[r]]
        src_bits = flat[rows[r]]
        for c in range(n_cols):
            if src[c] != 0.0:
                images[nnz] = c
                bits[nnz] = src_bits[c]
                nnz += 1
        row_ptr[r + 1] = nnz
    return nnz


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
def _value(data, mode, vpos, width, dictionary, nnz, k):
    """Bits of value ``k`` from a checked value section."""
    if mode == VALUES_CONST:
        return (np.uint32(data[vpos]) | (np.uint32(data[vpos + 1]) << np.uint32(8))
                | (np.uint32(data[vpos + 2]) << np.uint32(16)) | (np.uint32(data[vpos + 3]) << np.uint32(24)))
    if mode == VALUES_RAW:
        return (np.uint32(data[vpos + k]) | (np.uint32(data[vpos + nnz + k]) << np.uint32(8))
                | (np.uint32(data[vpos + 2 * nnz + k]) << np.uint32(16))
                | (np.uint32(data[vpos + 3 * nnz + k]) << np.uint32(24)))
    code = np.int64(data[vpos + k])
    if width == 2:
        code = (code << 8) | np.int64(data[vpos + nnz + k])
    return dictionary[code]


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
    c = 0
    while byte:
        byte &= byte - 1
        c += 1
    return c


@nb.njit(nogil=True, cache=True)
def _record(data, pos, n_images):
    """Parse a row record's fixed part: ``(error or next pos, kind, count or nbytes, first)``."""
    tag, pos = _get_varint(data, pos)
    if pos < 0:
        return pos, 0, 0, 0
    kind = tag & 3
    count = tag >> 2
    if kind == 0:
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
def _check_rows(data, n_rows, nnz, n_images, slot_of_neuron):
    """Walk the neuron and row sections without writing; return where values start or an error.

    Costs O(bytes): bitmaps are counted a byte at a time, repeated rows by their stored count.
    """
    pos = 0
    neuron = np.int64(-1)
    for r in range(n_rows):
        v, pos = _get_varint(data, pos)
        if pos < 0:
            return pos
        neuron = v if r == 0 else neuron + v + 1
        if neuron >= _NEURON_LIMIT:
            return E_NEURON_RANGE
        if slot_of_neuron.shape[0]:
            if neuron >= slot_of_neuron.shape[0] or slot_of_neuron[neuron] < 0:
                return E_UNEXPECTED_NEURON
    k = np.int64(0)
    prev_count = np.int64(-1)
    for r in range(n_rows):
        if pos >= data.shape[0]:
            return E_TRUNCATED
        if data[pos] == 0:
            if prev_count < 0:
                return E_NO_PREVIOUS
            pos += 1
            count = prev_count
        else:
            pos, kind, count, first = _record(data, pos, n_images)
            if pos < 0:
                return pos
            if kind == KIND_RUN:
                if count > n_images - first:
                    return E_IMAGE_RANGE
            elif kind == KIND_LIST:
                if count > n_images - first:
                    return E_IMAGE_RANGE
                img = first
                for i in range(1, count):
                    gap, pos = _get_varint(data, pos)
                    if pos < 0:
                        return pos
                    img += gap + 1
                    if img >= n_images:
                        return E_IMAGE_RANGE
            else:
                nbytes = count
                if nbytes > data.shape[0] - pos:
                    return E_TRUNCATED
                count = 0
                last = np.int64(-1)
                for b in range(nbytes):
                    byte = np.int64(data[pos + b])
                    if byte:
                        count += _popcount(byte)
                        last = 8 * b + _highest_bit(byte)
                pos += nbytes
                if count == 0:
                    return E_EMPTY_ROW
                if first + last >= n_images:
                    return E_IMAGE_RANGE
        if count > nnz - k:
            return E_TOO_MANY
        k += count
        prev_count = count
    if k != nnz:
        return E_TOO_FEW
    return pos


@nb.njit(nogil=True, cache=True)
def _emit_rows(data, n_rows, nnz, write_coo, neurons_out, images_out, slot_of_neuron, block, col_off,
               mode, vpos, width, dictionary):
    """Second pass over checked sections: fill COO arrays or scatter value bits into ``block`` (uint32)."""
    pos = 0
    for r in range(n_rows):
        _, pos = _get_varint(data, pos)
    npos = 0
    neuron = np.int64(-1)
    k = np.int64(0)
    prev_rec = np.int64(-1)
    prev_start = np.int64(0)
    for r in range(n_rows):
        v, npos = _get_varint(data, npos)
        neuron = v if r == 0 else neuron + v + 1
        start = k
        if data[pos] == 0:
            pos += 1
            if write_coo:
                count = k - prev_start
                for i in range(count):
                    images_out[k + i] = images_out[prev_start + i]
                    neurons_out[k + i] = neuron
                prev_start = start
                k += count
                continue
            rec = prev_rec
        else:
            rec = pos
            prev_rec = pos
        p, kind, count, first = _record(data, rec, 1 << 62)
        dst = block[slot_of_neuron[neuron]] if not write_coo else block[0]
        if kind == KIND_RUN:
            for i in range(count):
                if write_coo:
                    neurons_out[k] = neuron
                    images_out[k] = first + i
                else:
                    dst[col_off + first + i] = _value(data, mode, vpos, width, dictionary, nnz, k)
                k += 1
        elif kind == KIND_LIST:
            img = first
            for i in range(count):
                if i:
                    gap, p = _get_varint(data, p)
                    img += gap + 1
                if write_coo:
                    neurons_out[k] = neuron
                    images_out[k] = img
                else:
                    dst[col_off + img] = _value(data, mode, vpos, width, dictionary, nnz, k)
                k += 1
        else:
            for b in range(count):
                byte = np.int64(data[p + b])
                base = first + 8 * b
                for bit in range(8):
                    if not (byte >> bit) & 1:
                        continue
                    img = base + bit
                    if write_coo:
                        neurons_out[k] = neuron
                        images_out[k] = img
                    else:
                        dst[col_off + img] = _value(data, mode, vpos, width, dictionary, nnz, k)
                    k += 1
            p += count
        if rec == pos:
            pos = p
        prev_start = start


@_kernel
def decode_coo(data, n_rows, nnz, n_images, neurons, images, bits):
    """Check a raw payload, then decode it into COO arrays of length ``nnz``; 0 or an error code."""
    no_slots = np.empty(0, np.int64)
    end = _check_rows(data, n_rows, nnz, n_images, no_slots)
    if end < 0:
        return end
    err, mode, vpos, width, dictionary = _check_values(data, end, nnz)
    if err:
        return err
    no_block = np.empty((1, 1), np.uint32)
    _emit_rows(data, n_rows, nnz, True, neurons, images, no_slots, no_block, 0, mode, vpos, width, dictionary)
    if mode == VALUES_CONST:
        v = _value(data, mode, vpos, width, dictionary, nnz, 0)
        for k in range(nnz):
            bits[k] = v
    else:
        for k in range(nnz):
            bits[k] = _value(data, mode, vpos, width, dictionary, nnz, k)
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
    end = _check_rows(data, n_rows, nnz, n_images, slot_of_neuron)
    if end < 0:
        return end
    err, mode, vpos, width, dictionary = _check_values(data, end, nnz)
    if err:
        return err
    no_idx = np.empty(0, np.int32)
    _emit_rows(data, n_rows, nnz, False, no_idx, no_idx, slot_of_neuron, block.view(np.uint32), col_off,
               mode, vpos, width, dictionary)
    return 0
