"""Pack a network's layers once into the flat arrays the kernels read."""
import weakref
from collections import OrderedDict
from typing import NamedTuple, Sequence

import numpy as np

from fsd_kernels import _validate
from fsd_kernels._backend import kernels

#: The Graph Challenge clips activations at 32.
YMAX = 32.0
#: Neuron ids are int32 in the kernels and on the wire.
MAX_NEURONS = (1 << 31) - 1


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
    n = _validate.integer("n_neurons", n_neurons, 1, MAX_NEURONS)
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


_ARRAY_FIELDS = ("colptrs", "layer_ptr", "rowidx", "vals", "biases", "keeps_saturated", "twins")
_CHECKED: "OrderedDict[tuple, tuple]" = OrderedDict()   # the last few networks found whole
_CHECKED_KEEP = 16


def _seen_whole(net) -> tuple[tuple | None, bool]:
    """(key, whether this very network, the same array objects still alive, passed before)."""
    arrays = [getattr(net, f) for f in _ARRAY_FIELDS]
    if not all(a is None or isinstance(a, np.ndarray) for a in arrays):
        return None, False
    key = (tuple(id(a) for a in arrays), repr(net.n_neurons), repr(net.ymax), type(net.ymax))
    refs = _CHECKED.get(key)
    return key, refs is not None and all((r is None and a is None) or (r is not None and r() is a)
                                         for r, a in zip(refs, arrays))


def check_packed(net) -> None:
    """Refuse a ``PackedNetwork`` that ``pack`` did not make as it is: arrays of other types or
    shapes, indices out of range, or the derived fields (saturation flags, twins) disagreeing
    with the weights, biases and ymax (e.g. after ``net._replace(ymax=...)``), so the kernels
    can trust every field. O(nnz) the first time; a network that passed is remembered (by its
    array objects, while they live, and its n_neurons and ymax), so repeated runs pay nothing.
    Arrays changed in place after packing are not looked at again."""
    if not isinstance(net, PackedNetwork):
        raise ValueError("net must be a PackedNetwork (see fsd_kernels.pack)")
    key, seen = _seen_whole(net)
    if seen:
        return
    _check_packed(net)
    if key is not None:
        _CHECKED[key] = tuple(None if a is None else weakref.ref(a)
                              for a in (getattr(net, f) for f in _ARRAY_FIELDS))
        while len(_CHECKED) > _CHECKED_KEEP:
            _CHECKED.popitem(last=False)


def _check_packed(net) -> None:
    n = _validate.integer("net.n_neurons", net.n_neurons, 1, MAX_NEURONS)
    arrays = {"colptrs": np.int64, "layer_ptr": np.int64, "rowidx": np.int32, "vals": np.float32,
              "biases": np.float32, "keeps_saturated": np.bool_}
    for name, dtype in arrays.items():
        a = getattr(net, name)
        if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous \
                or not a.flags.writeable or a.ndim != (2 if name == "biases" else 1):
            raise ValueError(f"net.{name} is not what fsd_kernels.pack makes (a writeable "
                             f"C-contiguous {np.dtype(dtype).name} array): use pack")
    n_layers = net.biases.shape[0]
    ptr, nnz = net.layer_ptr, net.rowidx.shape[0]
    if n_layers < 1 or net.biases.shape[1] != n or net.keeps_saturated.shape[0] != n_layers \
            or net.colptrs.shape[0] != n_layers * (n + 1) or ptr.shape[0] != n_layers + 1 \
            or net.vals.shape[0] != nnz or ptr[0] != 0 or ptr[-1] != nnz or np.any(np.diff(ptr) < 0):
        raise ValueError("net's arrays disagree in size: use fsd_kernels.pack")
    if not isinstance(net.ymax, np.float32):
        raise ValueError("net.ymax must be a float32 (use fsd_kernels.pack)")
    _validate.ymax(net.ymax)
    if not (np.all(np.isfinite(net.vals)) and np.all(np.isfinite(net.biases))):
        raise ValueError("net's weights and biases must be finite")
    if nnz and (net.rowidx.min() < 0 or net.rowidx.max() >= n):
        raise ValueError("net.rowidx holds rows outside the network")
    twins = net.twins
    if twins is not None and (not isinstance(twins, np.ndarray) or twins.dtype != np.int32
                              or twins.shape != (n_layers * n,) or not twins.flags.c_contiguous):
        raise ValueError("net.twins is not what fsd_kernels.pack makes: use pack")
    for l in range(n_layers):
        colptr, rows, vals, bias = net.layer_csc(l)
        if colptr[0] != 0 or colptr[-1] != ptr[l + 1] - ptr[l] or np.any(np.diff(colptr) < 0):
            raise ValueError(f"net layer {l}: column pointers out of order: use fsd_kernels.pack")
        starts = colptr[1:-1]
        inside = np.ones(max(rows.shape[0] - 1, 0), bool)
        inside[starts[(starts > 0) & (starts < rows.shape[0])] - 1] = False
        if np.any(np.diff(rows)[inside] <= 0):
            raise ValueError(f"net layer {l}: rows must strictly increase within each column")
        if bool(net.keeps_saturated[l]) != keeps_saturated(colptr, rows, vals, bias, net.ymax):
            raise ValueError(f"net layer {l}: keeps_saturated disagrees with the weights, bias and "
                             "ymax (changed after packing?): pack the network again")
        if twins is not None and not np.array_equal(twins[l * n:(l + 1) * n], twin_map(colptr, rows, vals, bias)):
            raise ValueError(f"net layer {l}: twins disagree with the weights and bias: pack again")
