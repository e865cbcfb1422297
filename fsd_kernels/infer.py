"""Whole-network inference: batches of images through every layer, in parallel threads.

The kernels release the GIL, so a thread pool over image batches is the
whole parallel driver; with the native (AOT) kernels it degrades to serial.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np

from fsd_kernels import _validate
from fsd_kernels._backend import kernels
from fsd_kernels import network
from fsd_kernels.network import PackedNetwork

#: Most threads ``infer`` takes (more than batches or cores only adds threads that wait).
MAX_THREADS = 1024

#: Most bytes one dense N x B float32 block may take (each thread holds two).
BLOCK_BYTES = 64 * 2**20
#: Batches per thread at least, so threads finish at about the same time.
BATCHES_PER_THREAD = 4


def default_batch(n_images: int, n_neurons: int, threads: int) -> int:
    """Images per block: wide blocks keep many survivors together in the late layers
    (a layer costs per output neuron per call, so a few live columns per block waste
    it), bounded by ``BLOCK_BYTES`` and cut so that every thread gets several batches."""
    by_memory = max(1, BLOCK_BYTES // (4 * n_neurons))
    by_balance = -(-n_images // (threads * BATCHES_PER_THREAD))
    return max(1, min(by_memory, by_balance))


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


def _run_batch(net, indptr, indices, data, start, stop, shortcuts, twins):
    n = net.n_neurons
    width = stop - start
    block = np.empty((n, width), np.float32)
    work = np.empty((n, width), np.float32)
    ids = np.empty(width, np.int64)
    sat_ids = np.empty(width, np.int64)
    counts = np.zeros(4, np.int64)
    counts[0] = kernels.csr_rows_to_block(indptr, indices, data, start, stop, block, ids)
    # the input columns' extremes from the CSR rows (a scan of the dense block cost ~2x the fill)
    top = np.empty(width, np.float32)
    gap = np.empty(width, np.float32)
    kernels.csr_extremes(indptr, indices, data, ids, counts[0], n, net.ymax, top, gap)
    kernels.infer_block(block, work, ids, net.colptrs, net.layer_ptr, net.rowidx, net.vals,
                        net.biases, net.keeps_saturated, net.ymax, sat_ids, counts, shortcuts, twins, top, gap)
    if counts[2] >= 0:
        raise LayerOverflowError(int(counts[2]), int(counts[3]))
    active = block[:, :counts[0]].T
    return ids[:counts[0]].copy(), np.ascontiguousarray(active), sat_ids[:counts[1]].copy()


def _twins(net, use: bool = True):
    """The packed twin map, or one computed now for a PackedNetwork built without it; with
    ``use`` False every neuron its own class (the twin shortcut off)."""
    if not use:
        return np.tile(np.arange(net.n_neurons, dtype=np.int32), net.n_layers)
    if net.twins is not None:
        return net.twins
    return np.concatenate([network.twin_map(*net.layer_csc(l)) for l in range(net.n_layers)])


class LayerOverflowError(ValueError):
    """A sum of Y W overflowed float32 (inf or NaN): the weights or inputs are too large.
    ``layer`` and ``image`` are 0-based; every path (serial, one layer, distributed) says it so."""

    def __init__(self, layer: int, image: int):
        super().__init__(f"layer {layer}, image {image} (0-based): a sum of Y W overflowed float32 "
                         "to inf/NaN; the network's weights or inputs are too large for float32")
        self.layer = layer
        self.image = image


def _assemble(n_images, n, pieces, ymax):
    row_nnz = np.zeros(n_images, np.int64)
    for ids, rows, sat in pieces:
        row_nnz[ids] = np.count_nonzero(rows, axis=1)
        row_nnz[sat] = n
    indptr = np.zeros(n_images + 1, np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.float32)
    for ids, rows, sat in pieces:
        r, c = np.nonzero(rows)  # row-major: each image's neurons ascending
        counts = row_nnz[ids]
        first = np.cumsum(counts) - counts
        dest = np.repeat(indptr[ids] - first, counts) + np.arange(r.size)
        indices[dest] = c
        data[dest] = rows[r, c]
        if sat.size:
            dest = (indptr[sat][:, None] + np.arange(n)).ravel()
            indices[dest] = np.tile(np.arange(n, dtype=np.int32), sat.size)
            data[dest] = ymax
    return Activations(indptr, indices, data, n)


def infer(indptr, indices, data, net: PackedNetwork, *, batch_size: int | None = None,
          threads: int | None = None,
          progress: Callable[[int, int], None] | None = None, shortcuts: bool = True,
          twins: bool = True) -> Activations:
    """Run images (CSR, images x neurons) through ``net``; exact Graph Challenge semantics.

    ``threads`` defaults to all cores, ``batch_size`` to :func:`default_batch`;
    ``progress(images_done, n_images)`` is called from this thread as batches finish.
    A sum that overflows float32 raises :class:`LayerOverflowError` naming layer and image.
    ``shortcuts=False`` computes every image column through every layer, summing every input
    row (no dead columns, no parking, no zero-row skip; blank input images are still skipped):
    the same bits, to measure what the exact shortcuts are worth. ``twins=False`` turns off only
    the twin shortcut (outputs with equal W column and bias computed once), an algorithmic one
    that the other tools lack.
    """
    network.check_packed(net)
    indptr = _validate.as_array("images indptr", indptr, np.int64)
    if indptr.shape[0] < 1:
        raise ValueError("images indptr must have at least one entry")
    n_images = indptr.shape[0] - 1
    indptr, indices, data = _validate.csr("images", indptr, indices, data, (n_images, net.n_neurons))
    threads = (os.cpu_count() or 1) if threads is None else _validate.integer("threads", threads, 1, MAX_THREADS)
    if batch_size is None:
        batch_size = default_batch(n_images, net.n_neurons, threads)
    batch_size = _validate.integer("batch_size", batch_size, 1)
    spans = [(s, min(s + batch_size, n_images)) for s in range(0, n_images, batch_size)]
    twin_map = _twins(net, twins)
    pieces, done = [], 0
    with ThreadPoolExecutor(min(threads, max(1, len(spans)))) as pool:
        futures = [pool.submit(_run_batch, net, indptr, indices, data, s, e, bool(shortcuts), twin_map) for s, e in spans]
        for future, (s, e) in zip(futures, spans):
            pieces.append(future.result())
            done += e - s
            if progress is not None:
                progress(done, n_images)
    return _assemble(n_images, net.n_neurons, pieces, net.ymax)
