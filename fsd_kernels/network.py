"""Pack a network's layers once into the flat arrays the kernels read."""
from typing import NamedTuple, Sequence

import numpy as np

from fsd_kernels import _validate
from fsd_kernels._backend import kernels

#: The Graph Challenge clips activations at 32.
YMAX = 32.0


class PackedNetwork(NamedTuple):
    """All layers of an N x N network in CSC form, concatenated.

    Layer l: column pointer ``colptrs[l*(N+1):(l+1)*(N+1)]`` (starting at 0)
    into ``rowidx/vals[layer_ptr[l]:layer_ptr[l+1]]``; ``biases[l]`` per
    output neuron. ``keeps_saturated[l]`` says whether layer l maps an
    all-``ymax`` image row to an all-``ymax`` row (computed, never assumed).
    """

    n_neurons: int
    colptrs: np.ndarray
    layer_ptr: np.ndarray
    rowidx: np.ndarray
    vals: np.ndarray
    biases: np.ndarray
    keeps_saturated: np.ndarray
    ymax: np.float32
    #: ``twins[l*N + j]``: the first output neuron of layer l whose W column and bias equal
    #: neuron j's bit for bit (see ``kernels.twin_map``); ``infer`` computes each class once.
    twins: np.ndarray | None = None

    @property
    def n_layers(self) -> int:
        return self.biases.shape[0]

    @property
    def nnz(self) -> int:
        """Sum of nnz(W) over layers: the nominal edges one image crosses."""
        return int(self.layer_ptr[-1])

    def layer_csc(self, layer: int):
        """(colptr, rowidx, vals, bias) of one layer."""
        n = self.n_neurons
        lo, hi = self.layer_ptr[layer], self.layer_ptr[layer + 1]
        return (self.colptrs[layer * (n + 1):(layer + 1) * (n + 1)],
                self.rowidx[lo:hi], self.vals[lo:hi], self.biases[layer])


def csr_to_csc(indptr, indices, data, n_cols):
    """Transpose CSR (rows = inputs) to CSC with each column's rows ascending."""
    rows = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int32), np.diff(indptr))
    order = np.argsort(indices, kind="stable")
    colptr = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(indices, minlength=n_cols), out=colptr[1:])
    return colptr, np.ascontiguousarray(rows[order]), np.ascontiguousarray(data[order])


def keeps_saturated(colptr, rowidx, vals, bias, ymax):
    """Does this layer map an all-``ymax`` row to an all-``ymax`` row, bit for bit?"""
    n = bias.shape[0]
    probe = np.full((n, 1), ymax, np.float32)
    out = np.empty((n, 1), np.float32)
    overflowed = kernels.dense_layer(probe, 1, colptr, rowidx, vals, bias, np.float32(ymax), out) >= 0
    # an overflowing probe: not kept (a parked image is put back, and its own run reports it)
    return not overflowed and bool(np.all(out == ymax))


def twin_map(colptr, rowidx, vals, bias):
    """Per output neuron, the first neuron with the same W column and bias bit for bit (int32)."""
    twins = np.empty(bias.shape[0], np.int32)
    kernels.twin_map(colptr, rowidx, vals, np.ascontiguousarray(bias, np.float32), twins)
    return twins


def pack(layers: Sequence, biases: Sequence, n_neurons: int, ymax: float = YMAX) -> PackedNetwork:
    """Validate and pack layers given as CSR ``(indptr, indices, data)`` with rows = inputs.

    ``biases`` holds one scalar or one length-N vector per layer.
    """
    if len(layers) != len(biases):
        raise ValueError(f"{len(layers)} layers but {len(biases)} biases")
    if len(layers) == 0:
        raise ValueError("a network needs at least one layer")
    if int(n_neurons) < 1:
        raise ValueError(f"n_neurons must be positive, got {n_neurons}")
    n = int(n_neurons)
    ymax = _validate.ymax(ymax)
    colptrs, rowidx, vals, bias_rows, keeps, twins = [], [], [], [], [], []
    layer_ptr = [0]
    for l, ((indptr, indices, data), bias) in enumerate(zip(layers, biases)):
        indptr, indices, data = _validate.csr(f"layer {l} weights", indptr, indices, data, (n, n))
        bias = np.broadcast_to(np.float32(bias), (n,)) if np.ndim(bias) == 0 else bias
        bias = _validate.vector(f"layer {l} bias", bias, n)
        colptr, rows, v = csr_to_csc(indptr, indices, data, n)
        colptrs.append(colptr)
        rowidx.append(rows)
        vals.append(v)
        bias_rows.append(bias)
        keeps.append(keeps_saturated(colptr, rows, v, bias, ymax))
        twins.append(twin_map(colptr, rows, v, bias))
        layer_ptr.append(layer_ptr[-1] + rows.shape[0])
    return PackedNetwork(
        n_neurons=n,
        colptrs=np.concatenate(colptrs),
        layer_ptr=np.asarray(layer_ptr, np.int64),
        rowidx=np.concatenate(rowidx),
        vals=np.concatenate(vals),
        biases=np.ascontiguousarray(np.stack(bias_rows)),
        keeps_saturated=np.asarray(keeps, np.bool_),
        ymax=ymax,
        twins=np.concatenate(twins),
    )
