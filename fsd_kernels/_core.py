"""Serial sparse-DNN kernels with explicit signatures.

Every public kernel here is compiled two ways from this one source: by numba
JIT on a developer machine, and ahead of time (numba.pycc, see
``fsd_kernels/_build.py``) into the native module that the Lambda layer
ships. So: explicit signatures, no closures, no ``parallel=True``; the
parallel driver lives in :mod:`fsd_kernels.infer`. The raw arrays are
trusted here; :mod:`fsd_kernels._validate` checks them first.

Semantics (the Graph Challenge reference, inferenceReLUvec.m): every sum
Z[i, j] is a float32 sum of the products Y[i, k] * W[k, j] in ascending
order of the input neuron k, as scipy's CSR product (Gustavson) does; the
bias is added only where that sum is numerically nonzero (Z == +-0.0 gives
+0.0), then ReLU (v <= 0 gives +0.0) and clip at ymax. A sum that is not
finite (float32 overflow) is reported, never activated: the dense kernels
return the first such output column, ``sparse_layer`` a negative count.
Skipping a zero input adds or omits only +-0 terms, which can change the
sign of a zero sum but never its value, so it is exact under this rule.

Layout of a dense activation block: ``block[neuron, column]`` with one
column per image (neuron-major), so the innermost loop runs over images and
vectorises without reordering any sum.
"""
import numba as nb
import numpy as np

_OPTS = dict(nogil=True, cache=True, boundscheck=False)

#: kernel name -> numba signature; the AOT build exports exactly these.
EXPORTS = {
    "dense_layer": "i8(f4[:, ::1], i8, i8[::1], i4[::1], f4[::1], f4[::1], f4, f4[:, ::1])",
    "csr_rows_to_block": "i8(i8[::1], i4[::1], f4[::1], i8, i8, f4[:, ::1], i8[::1])",
    "coo_to_block": "void(i4[::1], i4[::1], f4[::1], f4[:, ::1])",
    "infer_block": "void(f4[:, ::1], f4[:, ::1], i8[::1], i8[::1], i8[::1], i4[::1], f4[::1], f4[:, ::1], b1[::1], f4, i8[::1], i8[::1], b1, i4[::1], f4[::1], f4[::1])",
    "csr_extremes": "void(i8[::1], i4[::1], f4[::1], i8[::1], i8, i8, f4, f4[::1], f4[::1])",
    "twin_map": "void(i8[::1], i4[::1], f4[::1], f4[::1], i4[::1])",
    "sparse_layer": "i8(i8[::1], i4[::1], f4[::1], i8[::1], i4[::1], f4[::1], f4[::1], f4, i8[::1], i4[::1], f4[::1])",
    "dense_layer_tracked": "i8(f4[:, ::1], i8, i8[::1], i4[::1], f4[::1], f4[::1], f4, f4[:, ::1], f4[::1], f4[::1])",
    "dense_layer_columns": "i8(f4[:, ::1], i8[::1], i8[::1], i4[::1], f4[::1], f4[::1], f4, f4[:, ::1], f4[::1], f4[::1])",
    "copy_rows": "void(f4[:, ::1], i8[::1], f4[:, ::1], i8[::1], i8)",
    "zero_rows": "void(f4[:, ::1], i8[::1], i8)",
}


def _kernel(fn):
    return nb.njit(EXPORTS[fn.__name__], **_OPTS)(fn)


@nb.njit(nogil=True, cache=True, inline="always")
def _activate(z, bias, ymax):
    """The reference's activation of one finite sum: bias only on a numeric nonzero, ReLU, clip."""
    if z == 0.0:
        return np.float32(0.0)  # also -0.0: no bias, and the output is +0.0
    v = z + bias
    if v <= 0.0:
        v = np.float32(0.0)
    if v > ymax:
        v = ymax
    return v


#: Largest finite float32: ``not abs(z) <= FLOAT32_MAX`` holds exactly for inf and NaN.
FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


#: Image columns one pass of ``dense_layer`` works on: the 32 input rows of
#: that width an output neuron reads stay in L1/L2 while it is summed, so a
#: block may be far wider (and hold many batches' survivors) at no cost.
#: 512 against 256: 13% less CPU on a random 4096-neuron net with half-dense
#: activations, the same on the official net; 64 and 128 were slower
#: (measured 2026-12-07, one thread, CPU seconds, bench/compare.py data).
COLUMN_TILE = 512


@nb.njit(nogil=True, cache=True)
def _first_overflow(block, c0, m, rows, weights, d):
    """The first of columns [c0, c0 + m) whose sum (the same terms in the same order) is not finite."""
    for i in range(m):
        s = np.float32(0.0)
        for t in range(d):
            s += weights[t] * block[rows[t], c0 + i]
        if not abs(s) <= FLOAT32_MAX:
            return i
    return 0


@nb.njit(nogil=True, cache=True, inline="always")
def _dense_tile(block, c0, c1, colptr, rowidx, vals, bias, ymax, out, o0, top, gap, skip_zero_rows,
                outs, alias, phys):
    # Input columns [c0, c1) of ``block`` give output columns from ``o0`` on, for the output
    # neurons ``outs``; input neuron k is read from row ``alias[k]`` of ``block``, and ``phys``
    # lists the rows that ``alias`` points at. Returns -1, or the first output column whose sum
    # overflowed (outputs after it are not written).
    # Row slices indexed from 0 (not range(c0, c1)): numba then knows the
    # index is never negative, skips wrap-around and the loops vectorise.
    m = c1 - c0
    # Input rows that are zero in every column of this tile add only +-0
    # terms, which never change a float32 sum, so they are skipped (about a
    # third of the pixels of a batch of MNIST digits are never set).
    live_row = np.zeros(block.shape[0], np.bool_)
    if not skip_zero_rows:  # the shortcut off (for measuring it): every input row is summed
        live_row[:] = True
    for p in range(phys.shape[0] if skip_zero_rows else 0):
        k = phys[p]
        y = block[k, c0:c1]
        for i in range(m):
            if y[i] != 0.0:
                live_row[k] = True
                break
    degree = 0
    for jj in range(outs.shape[0]):
        j = outs[jj]
        degree = max(degree, colptr[j + 1] - colptr[j])
    rows = np.empty(degree, np.int64)
    weights = np.empty(degree, np.float32)
    track = top.shape[0] > 0
    zero = np.float32(0.0)
    for jj in range(outs.shape[0]):
        j = outs[jj]
        acc = out[j, o0:o0 + m]
        d = 0
        for t in range(colptr[j], colptr[j + 1]):
            k = alias[rowidx[t]]
            if live_row[k]:
                rows[d] = k
                weights[d] = vals[t]
                d += 1
        # Eight terms per pass, still added one by one in ascending k; the first pass starts
        # from +0.0 itself (+0.0 + x is an addition like any other: -0.0 products give +0.0).
        t = 0
        if d >= 8:
            w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
            w4, w5, w6, w7 = weights[4], weights[5], weights[6], weights[7]
            y0, y1 = block[rows[0], c0:c1], block[rows[1], c0:c1]
            y2, y3 = block[rows[2], c0:c1], block[rows[3], c0:c1]
            y4, y5 = block[rows[4], c0:c1], block[rows[5], c0:c1]
            y6, y7 = block[rows[6], c0:c1], block[rows[7], c0:c1]
            for i in range(m):
                acc[i] = ((((((((zero + w0 * y0[i]) + w1 * y1[i]) + w2 * y2[i]) + w3 * y3[i])
                             + w4 * y4[i]) + w5 * y5[i]) + w6 * y6[i]) + w7 * y7[i])
            t = 8
        else:
            for i in range(m):
                acc[i] = 0.0
        while t + 8 <= d:
            w0, w1, w2, w3 = weights[t], weights[t + 1], weights[t + 2], weights[t + 3]
            w4, w5, w6, w7 = weights[t + 4], weights[t + 5], weights[t + 6], weights[t + 7]
            y0, y1 = block[rows[t], c0:c1], block[rows[t + 1], c0:c1]
            y2, y3 = block[rows[t + 2], c0:c1], block[rows[t + 3], c0:c1]
            y4, y5 = block[rows[t + 4], c0:c1], block[rows[t + 5], c0:c1]
            y6, y7 = block[rows[t + 6], c0:c1], block[rows[t + 7], c0:c1]
            for i in range(m):
                acc[i] = ((((((((acc[i] + w0 * y0[i]) + w1 * y1[i]) + w2 * y2[i]) + w3 * y3[i])
                             + w4 * y4[i]) + w5 * y5[i]) + w6 * y6[i]) + w7 * y7[i])
            t += 8
        if t + 4 <= d:
            w0, w1, w2, w3 = weights[t], weights[t + 1], weights[t + 2], weights[t + 3]
            y0, y1 = block[rows[t], c0:c1], block[rows[t + 1], c0:c1]
            y2, y3 = block[rows[t + 2], c0:c1], block[rows[t + 3], c0:c1]
            for i in range(m):
                acc[i] = (((acc[i] + w0 * y0[i]) + w1 * y1[i]) + w2 * y2[i]) + w3 * y3[i]
            t += 4
        if t + 2 <= d:
            w0, w1 = weights[t], weights[t + 1]
            y0, y1 = block[rows[t], c0:c1], block[rows[t + 1], c0:c1]
            for i in range(m):
                acc[i] = (acc[i] + w0 * y0[i]) + w1 * y1[i]
            t += 2
        if t < d:
            w0 = weights[t]
            y0 = block[rows[t], c0:c1]
            for i in range(m):
                acc[i] = acc[i] + w0 * y0[i]
        # One pass over the sums: overflow check, activation and (if asked) the per-column
        # largest output and largest distance below ymax, while the row is hot. Outputs lie
        # in [0, ymax], so a column is all zero iff top == 0 and all ymax iff gap == 0.
        b = bias[j]
        overflow = False
        if track:
            column_top = top[o0:o0 + m]
            column_gap = gap[o0:o0 + m]
            for i in range(m):
                z = acc[i]
                overflow |= not abs(z) <= FLOAT32_MAX
                v = _activate(z, b, ymax)
                acc[i] = v
                column_top[i] = max(column_top[i], v)
                column_gap[i] = max(column_gap[i], ymax - v)
        else:
            for i in range(m):
                z = acc[i]
                overflow |= not abs(z) <= FLOAT32_MAX
                acc[i] = _activate(z, b, ymax)
        if overflow:  # the sums are gone: the same sums again, one column at a time, find it
            return o0 + _first_overflow(block, c0, m, rows, weights, d)
    return -1


@nb.njit(nogil=True, cache=True)
def _layer_tiles(block, n, colptr, rowidx, vals, bias, ymax, out, top, gap, skip_zero_rows, outs, alias, phys):
    """The first ``n`` columns, ``COLUMN_TILE`` at a time; returns as ``dense_layer``."""
    for c0 in range(0, n, COLUMN_TILE):
        bad = _dense_tile(block, c0, min(c0 + COLUMN_TILE, n), colptr, rowidx, vals, bias, ymax, out,
                          c0, top, gap, skip_zero_rows, outs, alias, phys)
        if bad >= 0:
            return bad
    return -1


@nb.njit(nogil=True, cache=True)
def _identity(n):
    return np.arange(n, dtype=np.int64)


@_kernel
def dense_layer(block, n, colptr, rowidx, vals, bias, ymax, out):
    """One layer on the first ``n`` columns of a dense block.

    ``colptr/rowidx/vals`` is W in CSC form (per output neuron j, its input
    rows ascending); ``rowidx`` indexes rows of ``block``, which lets a
    distributed worker pass W remapped to the rows it holds. Writes
    ``out[j, :n]`` for every output neuron j, ``COLUMN_TILE`` columns at a
    time. Returns -1, or the first column whose sum overflowed to inf/NaN
    (``out`` is then partly written and must not be used).
    """
    no_tracking = np.empty(0, np.float32)
    every = _identity(max(block.shape[0], out.shape[0]))
    return _layer_tiles(block, n, colptr, rowidx, vals, bias, ymax, out, no_tracking, no_tracking, True,
                        every[:colptr.shape[0] - 1], every[:block.shape[0]], every[:block.shape[0]])


@_kernel
def dense_layer_tracked(block, n, colptr, rowidx, vals, bias, ymax, out, top, gap):
    """``dense_layer`` that also leaves, per column, ``top`` = the largest output and ``gap`` =
    the largest ``ymax - output``: a column is all zero iff top == 0 and all ymax iff gap == 0
    (what a distributed worker tells its peers, found while the rows are hot). Returns as
    ``dense_layer``."""
    top[:n] = 0.0
    gap[:n] = 0.0
    every = _identity(max(block.shape[0], out.shape[0]))
    return _layer_tiles(block, n, colptr, rowidx, vals, bias, ymax, out, top, gap, True,
                        every[:colptr.shape[0] - 1], every[:block.shape[0]], every[:block.shape[0]])


@_kernel
def dense_layer_columns(block, columns, colptr, rowidx, vals, bias, ymax, out, top, gap):
    """``dense_layer_tracked`` of ``block[:, columns]`` (``columns`` strictly increasing): output
    column i is input column ``columns[i]``. A worker's surviving images, read a tile at a time
    (a contiguous run in place, else gathered into a cache-sized tile) instead of copying the
    whole block without its dropped columns first. Returns as ``dense_layer`` (an output column)."""
    n = columns.shape[0]
    top[:n] = 0.0
    gap[:n] = 0.0
    tile = np.empty((block.shape[0], COLUMN_TILE), np.float32)
    every = _identity(max(block.shape[0], out.shape[0]))
    outs = every[:colptr.shape[0] - 1]
    rows = every[:block.shape[0]]
    for c0 in range(0, n, COLUMN_TILE):
        m = min(c0 + COLUMN_TILE, n) - c0
        first = columns[c0]
        if columns[c0 + m - 1] - first == m - 1:  # no column dropped here
            bad = _dense_tile(block, first, first + m, colptr, rowidx, vals, bias, ymax, out, c0, top, gap,
                              True, outs, rows, rows)
        else:
            picked = columns[c0:c0 + m]
            for r in range(block.shape[0]):
                src = block[r]
                dst = tile[r]
                for i in range(m):
                    dst[i] = src[picked[i]]
            bad = _dense_tile(tile, 0, m, colptr, rowidx, vals, bias, ymax, out, c0, top, gap, True, outs, rows, rows)
        if bad >= 0:
            return bad
    return -1


@_kernel
def copy_rows(src, src_rows, dst, dst_rows, n):
    """``dst[dst_rows[i], :n] = src[src_rows[i], :n]`` without numpy's temporary gather."""
    for i in range(src_rows.shape[0]):
        a = src[src_rows[i]]
        b = dst[dst_rows[i]]
        for c in range(n):
            b[c] = a[c]


@_kernel
def zero_rows(block, rows, n):
    """``block[rows[i], :n] = 0``."""
    for i in range(rows.shape[0]):
        r = block[rows[i]]
        for c in range(n):
            r[c] = 0.0


@_kernel
def csr_rows_to_block(indptr, indices, data, row_start, row_stop, block, ids):
    """Scatter the non-empty CSR rows [row_start, row_stop) into block columns.

    Empty rows stay zero through every layer, so they are skipped. Zeroes
    ``block[:, :row_stop - row_start]`` row by row first (a column-wise
    clear touches a new cache line per element and cost more than a layer).
    Writes the row id of each column into ``ids``; returns the number of columns.
    """
    width = row_stop - row_start
    for j in range(block.shape[0]):
        r = block[j]
        for i in range(width):
            r[i] = 0.0
    n = 0
    for r in range(row_start, row_stop):
        lo = indptr[r]
        hi = indptr[r + 1]
        if lo == hi:
            continue
        for p in range(lo, hi):
            block[indices[p], n] = data[p]
        ids[n] = r
        n += 1
    return n


@_kernel
def coo_to_block(rows, cols, vals, block):
    """Scatter (row, column, value) triples into a zeroed block."""
    for p in range(rows.shape[0]):
        block[rows[p], cols[p]] = vals[p]


@_kernel
def csr_extremes(indptr, indices, data, ids, n, n_neurons, ymax, top, gap):
    """What ``_scan_extremes`` finds in the block ``csr_rows_to_block`` fills, from the CSR rows
    ``ids[:n]`` themselves: ``top`` = max |v| and ``gap`` = max |v - ymax| per column over all
    ``n_neurons`` entries, the entries not stored being 0 (|0 - ymax| = ymax). The same maxima
    of the same values, without reading the dense block again."""
    for c in range(n):
        r = ids[c]
        t = np.float32(0.0)
        g = np.float32(0.0)
        if indptr[r + 1] - indptr[r] < n_neurons:
            g = abs(np.float32(0.0) - ymax)
        for p in range(indptr[r], indptr[r + 1]):
            t = max(t, abs(data[p]))
            g = max(g, abs(data[p] - ymax))
        top[c] = t
        gap[c] = g


@nb.njit(nogil=True, cache=True)
def _scan_extremes(block, n, ymax, top, gap):
    """``top`` = max |v| and ``gap`` = max |v - ymax| per column, for a block of raw inputs."""
    top[:n] = 0.0
    gap[:n] = 0.0
    for j in range(block.shape[0]):
        r = block[j]
        for i in range(n):
            top[i] = max(top[i], abs(r[i]))
            gap[i] = max(gap[i], abs(r[i] - ymax))


@nb.njit(nogil=True, cache=True)
def _compact(block, n, ids, top, gap, sat_ids, counts, phys):
    """Drop all-zero columns (``top`` == 0), move all-``ymax`` ones (``gap`` == 0) to ``sat_ids``;
    only the rows ``phys`` of ``block`` are moved (the others are not read)."""
    keep = np.empty(n, np.int64)
    m = 0
    for i in range(n):
        if top[i] > 0.0 and gap[i] > 0.0:
            keep[m] = i
            m += 1
        elif top[i] > 0.0:
            sat_ids[counts[1]] = ids[i]
            counts[1] += 1
    if m == n:
        return n
    for p in range(phys.shape[0]):
        r = block[phys[p]]
        for c in range(m):
            r[c] = r[keep[c]]
    for c in range(m):
        ids[c] = ids[keep[c]]
    return m


@_kernel
def twin_map(colptr, rowidx, vals, bias, twins):
    """``twins[j]`` = the first output neuron whose column of W (CSC ``colptr/rowidx/vals``: the
    same input rows, the same weights bit for bit) and bias (bit for bit) equal those of j, so
    that j's sums are the very same float operations on the very same inputs as twins[j]'s.
    ``twins[j] == j`` for the first of each class; ``twins[j] <= j`` always. Equal columns are
    found by a hash and then compared in full (a hash collision only costs a missed twin)."""
    n = colptr.shape[0] - 1
    vbits = vals.view(np.int32)
    bbits = bias.view(np.int32)
    h = np.empty(n, np.int64)
    for j in range(n):
        x = np.int64(colptr[j + 1] - colptr[j]) * np.int64(1000003) + np.int64(bbits[j])
        for t in range(colptr[j], colptr[j + 1]):
            x = (x ^ np.int64(rowidx[t])) * np.int64(1000003)
            x = (x ^ np.int64(vbits[t])) * np.int64(1000003)
        h[j] = x
    order = np.argsort(h, kind="mergesort")  # stable: within equal hashes, ascending j
    s = 0
    while s < n:
        first = order[s]
        twins[first] = first
        e = s + 1
        while e < n and h[order[e]] == h[first]:
            j = order[e]
            same = colptr[j + 1] - colptr[j] == colptr[first + 1] - colptr[first] and bbits[j] == bbits[first]
            if same:
                a = colptr[first]
                for t in range(colptr[j], colptr[j + 1]):
                    if rowidx[t] != rowidx[a] or vbits[t] != vbits[a]:
                        same = False
                        break
                    a += 1
            twins[j] = first if same else j
            e += 1
        s = e


@_kernel
def infer_block(block, work, ids, colptrs, layer_ptr, rowidx, vals, biases,
                keeps_saturated, ymax, sat_ids, counts, shortcuts, twins, top_in, gap_in):
    """Run one batch of images through every layer, in place.

    ``block`` holds ``counts[0]`` image columns (ids in ``ids``); layer l is
    the CSC column pointer ``colptrs[l*(N+1):(l+1)*(N+1)]`` (starting at 0)
    into ``rowidx/vals[layer_ptr[l]:layer_ptr[l+1]]``. Exact shortcuts: an all-zero column is dead for
    good; an all-``ymax`` column is parked in ``sat_ids`` and skipped for
    every layer whose ``keeps_saturated`` flag (checked per layer by the
    caller with this same kernel) says it maps saturation to saturation,
    and put back as an explicit column before any layer that does not.
    Twin outputs (``twins[l*N:(l+1)*N]`` from ``twin_map``: the same inputs, weights and bias
    bit for bit) are computed once: the rows of a twin class share one physical row, which
    the next layer reads through an alias map, and are copied out only at the end.
    On return ``block[:, :counts[0]]`` holds the live, unsaturated columns
    and ``sat_ids[:counts[1]]`` the saturated images; ``counts[2:4]`` is
    (-1, -1), or (layer, image id) of a sum that overflowed to inf/NaN, where
    the batch stopped (``counts`` has 4 entries). ``top_in``/``gap_in``: the input columns'
    extremes if the caller has them (``csr_extremes``), else empty (the block is scanned). ``shortcuts=False`` turns
    every exact shortcut off (dead columns, parking, zero input rows, twins), so
    that their worth can be measured: the same bits, more work.
    """
    n_layers = keeps_saturated.shape[0]
    rows = block.shape[0]
    counts[1] = 0
    counts[2] = -1
    counts[3] = -1
    top = np.empty(block.shape[1], np.float32)
    gap = np.empty(block.shape[1], np.float32)
    every = _identity(rows)
    alias = every  # input neuron k of the next layer is in row alias[k] of src
    phys = every   # the rows alias points at
    outs = np.empty(rows, np.int64)
    n = counts[0]
    if shortcuts:
        if top_in.shape[0] >= n:
            top[:n] = top_in[:n]
            gap[:n] = gap_in[:n]
        else:
            _scan_extremes(block, n, ymax, top, gap)
        n = _compact(block, n, ids, top, gap, sat_ids, counts, phys)
    src = block
    dst = work
    for layer in range(n_layers):
        if counts[1] > 0 and not keeps_saturated[layer]:
            for c in range(counts[1]):
                for p in range(phys.shape[0]):
                    src[phys[p], n + c] = ymax
                ids[n + c] = sat_ids[c]
            n += counts[1]
            counts[1] = 0
        if n == 0:
            continue
        base = layer * (rows + 1)
        cp = colptrs[base:base + rows + 1]
        lo = layer_ptr[layer]
        hi = layer_ptr[layer + 1]
        if shortcuts:
            rep = twins[layer * rows:(layer + 1) * rows]
            n_outs = 0
            for j in range(rows):
                if rep[j] == j:
                    outs[n_outs] = j
                    n_outs += 1
        else:
            n_outs = rows
        layer_outs = outs[:n_outs] if shortcuts else every
        top[:n] = 0.0
        gap[:n] = 0.0
        bad = _layer_tiles(src, n, cp, rowidx[lo:hi], vals[lo:hi], biases[layer], ymax, dst, top, gap, shortcuts,
                           layer_outs, alias, phys)
        if bad >= 0:
            counts[0] = 0
            counts[2] = layer
            counts[3] = ids[bad]
            return
        if shortcuts:
            phys = layer_outs.copy()
            alias = np.empty(rows, np.int64)
            for j in range(rows):
                alias[j] = rep[j]
            n = _compact(dst, n, ids, top, gap, sat_ids, counts, phys)
        src, dst = dst, src
    # Every row out: a twin's row from its class's row, then (if the last layer wrote work) all.
    for j in range(rows):
        a = alias[j]
        if a != j:
            s = src[a]
            r = src[j]
            for i in range(n):
                r[i] = s[i]
    if src is not block:
        for j in range(rows):
            for i in range(n):
                block[j, i] = src[j, i]
    counts[0] = n


@_kernel
def sparse_layer(y_indptr, y_indices, y_data, w_indptr, w_indices, w_data,
                 bias, ymax, z_indptr, z_indices, z_data):
    """One layer as a CSR product (Gustavson), for sparse activations.

    Y is images x neurons; W is CSR (rows = input neurons). Output columns
    come out sorted. ``z_indices``/``z_data`` must hold the structural
    upper bound (the caller sizes them); returns the nnz written, or
    ``-1 - r`` when a sum of image row r overflowed to inf/NaN.
    """
    n_rows = y_indptr.shape[0] - 1
    n_cols = bias.shape[0]
    acc = np.zeros(n_cols, np.float32)
    seen = np.zeros(n_cols, np.bool_)
    touched = np.empty(n_cols, np.int32)
    nnz = 0
    z_indptr[0] = 0
    for r in range(n_rows):
        m = 0
        for p in range(y_indptr[r], y_indptr[r + 1]):
            k = y_indices[p]
            v = y_data[p]
            if v == 0.0:
                continue  # adds only +-0 terms: no change to any sum's value
            for q in range(w_indptr[k], w_indptr[k + 1]):
                j = w_indices[q]
                if not seen[j]:
                    seen[j] = True
                    touched[m] = j
                    m += 1
                acc[j] += v * w_data[q]
        if m * 16 > n_cols:  # many outputs: one scan of the flags beats a sort
            m = 0
            for j in range(n_cols):
                if seen[j]:
                    touched[m] = j
                    m += 1
        else:
            touched[:m].sort()
        for c in range(m):
            j = touched[c]
            if not abs(acc[j]) <= FLOAT32_MAX:
                return -1 - r
            v = _activate(acc[j], bias[j], ymax)
            acc[j] = 0.0
            seen[j] = False
            if v != 0.0:
                z_indices[nnz] = j
                z_data[nnz] = v
                nnz += 1
        z_indptr[r + 1] = nnz
    return nnz
