"""Serial Numba kernels of the activation-message codec (format: :mod:`fsd_kernels.codec`).

Compiled two ways from this source, like :mod:`fsd_kernels._core`: numba
JIT on a developer machine, AOT into the native module of the Lambda layer.
So: explicit signatures in ``EXPORTS``, no closures, no ``parallel=True``,
results through preallocated arrays.

Encoding kernels trust their (validated) arguments. Decoding kernels read
hostile bytes: every read is bounds-checked by hand (``boundscheck`` is
off), every count is checked before it is used, and errors come back as
negative codes that :mod:`fsd_kernels.codec` turns into ``CodecError``.
Decoding walks the payload twice where it writes into caller memory: a
checking pass first, so nothing is written unless the whole chunk is valid.
"""
import numba as nb
import numpy as np

_OPTS = dict(nogil=True, cache=True, boundscheck=False)

#: kernel name -> numba signature; the AOT build exports exactly these.
EXPORTS = {
    "dense_rows_to_csr": "i8(f4[:, ::1], i8[::1], i8, i8[::1], i4[::1], u4[::1])",
    "encode_rows": "i8(i4[::1], i8[::1], i4[::1], u1[::1])",
    "encode_values": "i8(u4[::1], u1[::1], i8)",
    "decode_coo": "i8(u1[::1], i8, i8, i8, i4[::1], i4[::1], u4[::1])",
    "decode_into_block": "i8(u1[::1], i8, i8, i8, i8[::1], f4[:, ::1], i8)",
}

from fsd_kernels._codec_codes import (  # noqa: F401  (the kernels read them as globals)
    KIND_LIST, KIND_BITMAP, KIND_RUN, VALUES_RAW, VALUES_CONST, VALUES_DICT,
    DICT_MAX, E_TRUNCATED, E_VARINT, E_NEURON_RANGE, E_NO_PREVIOUS, E_IMAGE_RANGE, E_EMPTY_ROW,
    E_TOO_MANY, E_VALUE_MODE, E_DICT, E_TRAILING, E_UNEXPECTED_NEURON, E_TOO_FEW, E_ROW_KIND,
)

_NEURON_LIMIT = 2 ** 31


def _kernel(fn):
    return nb.njit(EXPORTS[fn.__name__], **_OPTS)(fn)


# ---------------------------------------------------------------- encoding

@nb.njit(nogil=True, cache=True, inline="always")
def _put_varint(out, pos, value):
    """LEB128: 7 bits a byte, low bits first; returns the position after it."""
    v = np.uint64(value)
    while v >= 128:
        out[pos] = np.uint8((v & np.uint64(127)) | np.uint64(128))
        v >>= np.uint64(7)
        pos += 1
    out[pos] = np.uint8(v)
    return pos + 1


@nb.njit(nogil=True, cache=True, inline="always")
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


@_kernel
def encode_rows(row_neurons, row_ptr, images, out):
    """Write the neuron section and the row section; return the bytes written.

    ``out`` must hold ``16 * n_rows + 5 * nnz + 16`` bytes (the worst case).
    Each row picks its smallest record: same-as-previous, run, bitmap or
    gap list.
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
            continue
        count = hi - lo
        first = np.int64(images[lo])
        last = np.int64(images[hi - 1])
        if last - first + 1 == count:
            pos = _put_varint(out, pos, (count << 2) | KIND_RUN)
            pos = _put_varint(out, pos, first)
            continue
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
        else:
            pos = _put_varint(out, pos, (nbytes << 2) | KIND_BITMAP)
            pos = _put_varint(out, pos, first)
            for b in range(nbytes):
                out[pos + b] = 0
            for p in range(lo, hi):
                d = images[p] - first
                out[pos + (d >> 3)] |= np.uint8(1 << (d & 7))
            pos += nbytes
    return pos


@nb.njit(nogil=True, cache=True, inline="always")
def _put_u32(out, pos, v):
    out[pos] = np.uint8(v & 255)
    out[pos + 1] = np.uint8((v >> 8) & 255)
    out[pos + 2] = np.uint8((v >> 16) & 255)
    out[pos + 3] = np.uint8((v >> 24) & 255)


@_kernel
def encode_values(bits, out, pos):
    """Write the value section at ``pos`` (float32 bit patterns); return the end.

    Constant if every value is the same, a dictionary of up to 256 values
    with one code byte per value if that is smaller, raw otherwise. Needs
    ``4 * nnz + 8`` bytes of room.
    """
    n = bits.shape[0]
    if n == 0:
        return pos
    same = True
    for k in range(1, n):
        if bits[k] != bits[0]:
            same = False
            break
    if same:
        out[pos] = VALUES_CONST
        _put_u32(out, pos + 1, bits[0])
        return pos + 5
    # open addressing, 1024 slots, keyed by the bit pattern
    keys = np.zeros(1024, np.uint32)
    used = np.zeros(1024, np.bool_)
    code_of = np.zeros(1024, np.int64)
    table = np.zeros(DICT_MAX, np.uint32)
    k_used = 0
    fits = True
    for k in range(n):
        v = bits[k]
        h = np.int64((np.uint64(v) * np.uint64(2654435761)) >> np.uint64(7)) & 1023
        while used[h] and keys[h] != v:
            h = (h + 1) & 1023
        if not used[h]:
            if k_used == DICT_MAX:
                fits = False
                break
            used[h] = True
            keys[h] = v
            code_of[h] = k_used
            table[k_used] = v
            k_used += 1
    dict_cost = 2 + 4 * k_used + n
    if not fits or dict_cost >= 1 + 4 * n:
        out[pos] = VALUES_RAW
        pos += 1
        for k in range(n):
            _put_u32(out, pos + 4 * k, bits[k])
        return pos + 4 * n
    out[pos] = VALUES_DICT
    out[pos + 1] = np.uint8(k_used - 1)
    pos += 2
    for c in range(k_used):
        _put_u32(out, pos + 4 * c, table[c])
    pos += 4 * k_used
    for k in range(n):
        v = bits[k]
        h = np.int64((np.uint64(v) * np.uint64(2654435761)) >> np.uint64(7)) & 1023
        while keys[h] != v:
            h = (h + 1) & 1023
        out[pos + k] = np.uint8(code_of[h])
    return pos + n


@_kernel
def dense_rows_to_csr(block, rows, n_cols, row_ptr, images, bits):
    """Nonzeros of ``block[rows[r], :n_cols]`` as CSR (row_ptr, images, float32 bits).

    ``images``/``bits`` need ``len(rows) * n_cols`` room; returns nnz.
    """
    nnz = 0
    row_ptr[0] = 0
    for r in range(rows.shape[0]):
        src = block[rows[r]]
        for c in range(n_cols):
            v = src[c]
            if v != 0.0:
                images[nnz] = c
                bits[nnz] = np.array(v, np.float32).view(np.uint32)[()]
                nnz += 1
        row_ptr[r + 1] = nnz
    return nnz


# ---------------------------------------------------------------- decoding

@nb.njit(nogil=True, cache=True, inline="always")
def _get_varint(data, pos):
    """Return ``(value, next position)``; next position < 0 is an error code."""
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


@nb.njit(nogil=True, cache=True, inline="always")
def _get_u32(data, pos):
    return (np.uint32(data[pos]) | (np.uint32(data[pos + 1]) << np.uint32(8))
            | (np.uint32(data[pos + 2]) << np.uint32(16)) | (np.uint32(data[pos + 3]) << np.uint32(24)))


@nb.njit(nogil=True, cache=True, inline="always")
def _value_at(data, mode, vpos, dict_pos, k):
    if mode == VALUES_RAW:
        return _get_u32(data, vpos + 4 * k)
    if mode == VALUES_CONST:
        return _get_u32(data, vpos)
    return _get_u32(data, dict_pos + 4 * np.int64(data[vpos + k]))


@nb.njit(nogil=True, cache=True)
def _walk(data, n_rows, nnz, n_images, write, neurons_out, images_out, slot_of_neuron,
          block, col_off, vmode, vpos, dict_pos):
    """Walk the neuron and row sections; return the position after them or an error code.

    ``write`` 0: check only; 1: fill ``neurons_out``/``images_out`` (COO);
    2: scatter values (section described by vmode/vpos/dict_pos) into
    ``block[slot_of_neuron[neuron], col_off + image]``. ``slot_of_neuron``
    is only read when it is non-empty (then every neuron must have a slot).
    """
    pos = 0
    row_pos = 0
    # pass over neurons once to find where the row section starts
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
    row_pos = pos
    npos = 0
    neuron = -1
    k = np.int64(0)
    prev_rec = np.int64(-1)
    for r in range(n_rows):
        v, npos = _get_varint(data, npos)
        neuron = v if r == 0 else neuron + v + 1
        slot = np.int64(0)
        if write == 2:
            slot = slot_of_neuron[neuron]
        if row_pos >= data.shape[0]:
            return E_TRUNCATED
        if data[row_pos] == 0:
            if prev_rec < 0:
                return E_NO_PREVIOUS
            rec = prev_rec
            row_pos += 1
        else:
            rec = row_pos
            prev_rec = row_pos
        tag, p = _get_varint(data, rec)
        if p < 0:
            return p
        kind = tag & 3
        count = tag >> 2
        if kind == 0 or count == 0:
            return E_ROW_KIND if kind == 0 else E_EMPTY_ROW
        first, p = _get_varint(data, p)
        if p < 0:
            return p
        if kind == KIND_BITMAP:
            nbytes = count
            if p + nbytes > data.shape[0]:
                return E_TRUNCATED
            if first >= n_images:
                return E_IMAGE_RANGE
            for b in range(nbytes):
                byte = np.int64(data[p + b])
                while byte:
                    bit = 0
                    while not (byte >> bit) & 1:
                        bit += 1
                    byte &= byte - 1
                    img = first + 8 * b + bit
                    if img >= n_images:
                        return E_IMAGE_RANGE
                    if k >= nnz:
                        return E_TOO_MANY
                    if write == 1:
                        neurons_out[k] = neuron
                        images_out[k] = img
                    elif write == 2:
                        block[slot, col_off + img] = np.array(
                            _value_at(data, vmode, vpos, dict_pos, k), np.uint32).view(np.float32)[()]
                    k += 1
            p += nbytes
        else:
            if k + count > nnz:
                return E_TOO_MANY
            if kind == KIND_RUN:
                if first + count > n_images:
                    return E_IMAGE_RANGE
                if write == 1:
                    for i in range(count):
                        neurons_out[k + i] = neuron
                        images_out[k + i] = first + i
                elif write == 2:
                    dst = block[slot]
                    for i in range(count):
                        dst[col_off + first + i] = np.array(
                            _value_at(data, vmode, vpos, dict_pos, k + i), np.uint32).view(np.float32)[()]
                k += count
            else:
                img = first
                for i in range(count):
                    if i:
                        gap, p = _get_varint(data, p)
                        if p < 0:
                            return p
                        img += gap + 1
                    if img >= n_images:
                        return E_IMAGE_RANGE
                    if write == 1:
                        neurons_out[k] = neuron
                        images_out[k] = img
                    elif write == 2:
                        block[slot, col_off + img] = np.array(
                            _value_at(data, vmode, vpos, dict_pos, k), np.uint32).view(np.float32)[()]
                    k += 1
        if rec == row_pos:
            row_pos = p
    if k != nnz:
        return E_TOO_FEW
    return row_pos


@nb.njit(nogil=True, cache=True)
def _check_values(data, pos, nnz, info):
    """Check the value section at ``pos``; fill ``info`` = (mode, values pos, dict pos); 0 or error."""
    end = data.shape[0]
    if nnz == 0:
        info[0] = VALUES_CONST
        info[1] = pos
        info[2] = pos
        return 0 if pos == end else E_TRAILING
    if pos >= end:
        return E_TRUNCATED
    mode = np.int64(data[pos])
    pos += 1
    info[0] = mode
    if mode == VALUES_RAW:
        stop = pos + 4 * nnz
    elif mode == VALUES_CONST:
        stop = pos + 4
    elif mode == VALUES_DICT:
        if pos >= end:
            return E_TRUNCATED
        size = np.int64(data[pos]) + 1
        pos += 1
        info[2] = pos
        pos += 4 * size
        if pos + nnz > end:
            return E_TRUNCATED
        for k in range(nnz):
            if data[pos + k] >= size:
                return E_DICT
        stop = pos + nnz
    else:
        return E_VALUE_MODE
    info[1] = pos
    if stop > end:
        return E_TRUNCATED
    if stop < end:
        return E_TRAILING
    return 0


@_kernel
def decode_coo(data, n_rows, nnz, n_images, neurons, images, bits):
    """Decode a raw payload into COO arrays of length ``nnz``; 0 or an error code."""
    no_slots = np.empty(0, np.int64)
    no_block = np.empty((0, 0), np.float32)
    info = np.zeros(3, np.int64)
    end = _walk(data, n_rows, nnz, n_images, 1, neurons, images, no_slots, no_block, 0, 0, 0, 0)
    if end < 0:
        return end
    err = _check_values(data, end, nnz, info)
    if err:
        return err
    for k in range(nnz):
        bits[k] = _value_at(data, info[0], info[1], info[2], k)
    return 0


@_kernel
def decode_into_block(data, n_rows, nnz, n_images, slot_of_neuron, block, col_off):
    """Check a raw payload, then write its values to ``block[slot_of_neuron[n], col_off + image]``.

    The caller guarantees ``col_off + n_images <= block.shape[1]`` and that
    every non-negative slot is a row of ``block``; a neuron without a slot
    (out of range or negative) is an error. Returns 0 or an error code.
    """
    no_idx = np.empty(0, np.int32)
    info = np.zeros(3, np.int64)
    end = _walk(data, n_rows, nnz, n_images, 0, no_idx, no_idx, slot_of_neuron, block, col_off, 0, 0, 0)
    if end < 0:
        return end
    err = _check_values(data, end, nnz, info)
    if err:
        return err
    _walk(data, n_rows, nnz, n_images, 2, no_idx, no_idx, slot_of_neuron, block, col_off,
          info[0], info[1], info[2])
    return 0
