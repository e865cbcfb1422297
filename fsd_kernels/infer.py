"""Whole-network inference: batches of images through every layer, in parallel threads.

The kernels release the GIL, so a thread pool over image batches is the
whole parallel driver; with the native (AOT) kernels it degrades to serial.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from fsd_kernels import _validate
from fsd_kernels._backend import kernels
from fsd_kernels.network import PackedNetwork

#: Images per dense block: two N x B float32 blocks stay in a core's L2 at N=1024.
DEFAULT_BATCH = 128


class Activations(NamedTuple):
    """Final activations as CSR (images x neurons) and the images they came from."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_neurons: int

    @property
    def categories(self) -> np.ndarray:
        """0-based ids of the images whose final row is nonzero."""
        return np.flatnonzero(np.diff(self.indptr))


def _run_batch(net, indptr, indices, data, start, stop):
    n = net.n_neurons
    width = stop - start
    block = np.empty((n, width), np.float32)
    work = np.empty((n, width), np.float32)
    ids = np.empty(width, np.int64)
    sat_ids = np.empty(width, np.int64)
    counts = np.zeros(2, np.int64)
    counts[0] = kernels.csr_rows_to_block(indptr, indices, data, start, stop, block, ids)
    kernels.infer_block(block, work, ids, net.colptrs, net.layer_ptr, net.rowidx, net.vals,
                        net.biases, net.keeps_saturated, net.ymax, sat_ids, counts)
    active = block[:, :counts[0]].T
    return ids[:counts[0]].copy(), np.ascontiguousarray(active), sat_ids[:counts[1]].copy()


def _assemble(n_images, n, pieces, ymax):
    row_nnz = np.zeros(n_images, np.int64)
    for ids, rows, sat in pieces:
        row_nnz[ids] = np.count_nonzero(rows, axis=1)
        row_nnz[sat] = n
    indptr = np.zeros(n_images + 1, np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.float32)
    full = np.arange(n, dtype=np.int32)
    for ids, rows, sat in pieces:
        for r, i in zip(rows, ids):
            nz = np.flatnonzero(r)
            indices[indptr[i]:indptr[i + 1]] = nz
            data[indptr[i]:indptr[i + 1]] = r[nz]
        for i in sat:
            indices[indptr[i]:indptr[i + 1]] = full
            data[indptr[i]:indptr[i + 1]] = ymax
    return Activations(indptr, indices, data, n)


def infer(indptr, indices, data, net: PackedNetwork, *, batch_size: int = DEFAULT_BATCH,
          threads: int | None = None) -> Activations:
    """Run images (CSR, images x neurons) through ``net``; exact Graph Challenge semantics."""
    if not isinstance(net, PackedNetwork):
        raise ValueError("net must be a PackedNetwork (see fsd_kernels.pack)")
    n_images = np.asarray(indptr).shape[0] - 1
    indptr, indices, data = _validate.csr("images", indptr, indices, data, (n_images, net.n_neurons))
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    spans = [(s, min(s + batch_size, n_images)) for s in range(0, n_images, batch_size)]
    if threads == 1 or len(spans) <= 1:
        pieces = [_run_batch(net, indptr, indices, data, s, e) for s, e in spans]
    else:
        with ThreadPoolExecutor(threads) as pool:
            pieces = list(pool.map(lambda span: _run_batch(net, indptr, indices, data, *span), spans))
    return _assemble(n_images, net.n_neurons, pieces, net.ymax)
