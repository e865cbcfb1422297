"""A worker's share of the model: its weights per layer and its send/receive plans, computed once.

``owners[l, j]`` is the worker that computes output neuron j of layer l,
so it also holds row j of the next layer's input. Worker p at layer l:

- computes ``out_neurons[l]`` = {j : owners[l, j] == p} (ascending);
- needs input rows ``in_neurons[l]`` = every k with W_l[k, j] != 0 for one
  of its j (ascending): the *slots* of its dense input block, so W_l
  restricted to its outputs, with rows remapped to slots, keeps every
  column's rows ascending and every sum in the serial order;
- at layer 0 it reads those rows from its share (the inputs); at layer
  l >= 1 it holds the slots it computed itself (``local_slots``, taken from
  positions ``local_pos`` of its previous outputs) and receives the rest:
  ``recv_slots[l][s]`` from worker s, who sends exactly those rows
  (``send_pos[l][p]`` = positions in s's previous outputs).

Shares are stored as one npz (no pickle): per-layer arrays concatenated
with pointer arrays. :meth:`WorkerShare.from_bytes` checks every index
before a kernel can see it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fsd_runtime.storage import StorageError, pack_arrays, unpack_arrays

_SHARE_VERSION = 1


@dataclass
class WorkerShare:
    """Everything worker ``worker`` needs, for all layers (lists indexed by layer, then worker)."""

    worker: int
    n_workers: int
    n_neurons: int
    n_images: int
    ymax: np.float32
    keeps_saturated: np.ndarray        # bool [L]
    out_neurons: list[np.ndarray]      # int32 per layer
    in_neurons: list[np.ndarray]       # int32 per layer (slot -> neuron)
    colptr: list[np.ndarray]           # int64 per layer, len(out)+1
    rowidx: list[np.ndarray]           # int32 per layer, slots
    vals: list[np.ndarray]             # float32 per layer
    bias: list[np.ndarray]             # float32 per layer, len(out)
    local_slots: list[np.ndarray]      # int64 per layer (empty at layer 0)
    local_pos: list[np.ndarray]        # int64 per layer: positions in out_neurons[l-1]
    recv_slots: list[list[np.ndarray]]  # [layer][source] int64 slots (empty for self, layer 0)
    send_pos: list[list[np.ndarray]]    # [layer][target] int64 positions in out_neurons[l-1]
    x_indptr: np.ndarray               # int64 [n_images+1]: inputs restricted to in_neurons[0]
    x_slots: np.ndarray                # int32 slots of in_neurons[0]
    x_data: np.ndarray                 # float32
    active: np.ndarray                 # int64 image ids with a live, unsaturated input row
    saturated: np.ndarray              # int64 image ids whose input row is all ymax
    #: A prepared model's share whose per-layer lists read its segments as layers need them
    #: (``fsd_runtime.prepared.SegmentReader``); None: the lists hold every layer.
    reader: object | None = None

    @property
    def n_layers(self) -> int:
        return len(self.out_neurons)

    def to_bytes(self) -> bytes:
        arrays = {
            "version": np.int64(_SHARE_VERSION),
            "meta": np.array([self.worker, self.n_workers, self.n_neurons, self.n_images], np.int64),
            "ymax": np.float32(self.ymax),
            "keeps_saturated": self.keeps_saturated,
            "x_indptr": self.x_indptr, "x_slots": self.x_slots, "x_data": self.x_data,
            "active": self.active, "saturated": self.saturated,
        }
        for name in ("out_neurons", "in_neurons", "colptr", "rowidx", "vals", "bias",
                     "local_slots", "local_pos"):
            arrays[name], arrays[name + "_ptr"] = _flatten(getattr(self, name))
        for name in ("recv_slots", "send_pos"):
            arrays[name], arrays[name + "_ptr"] = _flatten([a for per in getattr(self, name) for a in per])
        return pack_arrays(arrays)

    @classmethod
    def from_bytes(cls, data) -> "WorkerShare":
        """Load and check a share (bytes, or a binary file object: ``Storage.open``); a malformed
        one raises StorageError (a ValueError)."""
        z = unpack_arrays(data, "worker share")
        try:
            return _check(_unflatten_share(z))
        except (KeyError, IndexError, TypeError) as exc:
            raise StorageError(f"worker share is malformed ({type(exc).__name__}: {exc})") from None


def _flatten(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([a.shape[0] for a in arrays], out=ptr[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return flat, ptr


def _split(flat: np.ndarray, ptr: np.ndarray, dtype) -> list[np.ndarray]:
    ptr = np.asarray(ptr, np.int64)
    if ptr.ndim != 1 or ptr.size < 1 or ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != flat.shape[0]:
        raise StorageError("worker share: a pointer array does not match its data")
    flat = np.ascontiguousarray(flat, dtype)
    bounds = ptr.tolist()  # Python ints: slicing with numpy scalars costs several times more
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _unflatten_share(z: dict) -> WorkerShare:
    if int(z["version"]) != _SHARE_VERSION:
        raise StorageError(f"worker share version {int(z['version'])} is not {_SHARE_VERSION}")
    worker, n_workers, n_neurons, n_images = (int(v) for v in z["meta"])
    lists = {}
    for name, dtype in (("out_neurons", np.int32), ("in_neurons", np.int32), ("colptr", np.int64),
                        ("rowidx", np.int32), ("vals", np.float32), ("bias", np.float32),
                        ("local_slots", np.int64), ("local_pos", np.int64)):
        lists[name] = _split(z[name], z[name + "_ptr"], dtype)
    n_layers = len(lists["out_neurons"])
    for name in ("recv_slots", "send_pos"):
        flat = _split(z[name], z[name + "_ptr"], np.int64)
        if len(flat) != n_layers * n_workers:
            raise StorageError(f"worker share: {name} has {len(flat)} parts, not {n_layers}x{n_workers}")
        lists[name] = [flat[l * n_workers:(l + 1) * n_workers] for l in range(n_layers)]
    return WorkerShare(
        worker=worker, n_workers=n_workers, n_neurons=n_neurons, n_images=n_images,
        ymax=np.float32(z["ymax"]), keeps_saturated=np.asarray(z["keeps_saturated"], np.bool_),
        x_indptr=np.ascontiguousarray(z["x_indptr"], np.int64),
        x_slots=np.ascontiguousarray(z["x_slots"], np.int32),
        x_data=np.ascontiguousarray(z["x_data"], np.float32),
        active=np.ascontiguousarray(z["active"], np.int64),
        saturated=np.ascontiguousarray(z["saturated"], np.int64), **lists)


def _within(name: str, a: np.ndarray, high: int) -> None:
    if a.size and (a.min() < 0 or a.max() >= high):
        raise StorageError(f"worker share: {name} has indices outside 0..{high - 1}")


def _each_within(name: str, per_peer: list, high: int) -> int:
    """:func:`_within` for each peer's array, with one min and max over all of them (a worker's
    plans hold a small array per peer and layer: checked one by one, they were most of a
    forked worker's start-up at P = 84); the failing peer is named. Returns their total size."""
    if not len(per_peer):
        return 0
    joined = np.concatenate(per_peer)
    if joined.size and (joined.min() < 0 or joined.max() >= high):
        for peer, a in enumerate(per_peer):
            _within(f"{name} {peer}", a, high)
    return joined.shape[0]


def check_layer(l: int, n_neurons: int, n_workers: int, prev_out: int | None, out, inn, cp, rowidx, vals,
                bias, local_slots, local_pos, recv_slots, send_pos) -> None:
    """Every index of layer ``l``'s part a kernel or the loop will follow lies in range. The plan's
    positions in the previous layer's outputs are checked against ``prev_out`` (its output count)
    when given; None defers that to :func:`check_link` (a layer read without the one before)."""
    _within(f"layer {l} out_neurons", out, n_neurons)
    _within(f"layer {l} in_neurons", inn, n_neurons)
    if cp.shape[0] != out.shape[0] + 1 or cp[0] != 0 or np.any(np.diff(cp) < 0) \
            or cp[-1] != rowidx.shape[0] or vals.shape != rowidx.shape or bias.shape != out.shape:
        raise StorageError(f"worker share: layer {l} weights are inconsistent")
    _within(f"layer {l} rowidx", rowidx, inn.shape[0])
    _within(f"layer {l} local_slots", local_slots, inn.shape[0])
    if local_pos.shape != local_slots.shape:
        raise StorageError(f"worker share: layer {l} local plan is inconsistent")
    if len(recv_slots) != n_workers or len(send_pos) != n_workers:
        raise StorageError(f"worker share: layer {l} plans are not one per worker")
    received = _each_within(f"layer {l} recv_slots from", recv_slots, inn.shape[0])
    if l == 0 or prev_out is not None:
        check_link(l, prev_out or 0, local_pos, send_pos)
    covered = local_slots.shape[0] + received
    if l and covered != inn.shape[0]:
        raise StorageError(f"worker share: layer {l} receives {covered} of {inn.shape[0]} rows")


def check_link(l: int, prev_out: int, local_pos, send_pos) -> None:
    """Layer ``l``'s positions in layer ``l - 1``'s ``prev_out`` outputs lie in range (none at 0)."""
    high = max(prev_out, 1) if l else 0
    _within(f"layer {l} local_pos", local_pos, high)
    _each_within(f"layer {l} send_pos to", send_pos, high)


def check_inputs(s: WorkerShare) -> None:
    """The share's inputs (layer 0's rows of its images, the images' status) lie in range."""
    if s.x_indptr.shape != (s.n_images + 1,) or s.x_indptr[0] != 0 or np.any(np.diff(s.x_indptr) < 0) \
            or s.x_indptr[-1] != s.x_slots.shape[0] or s.x_data.shape != s.x_slots.shape:
        raise StorageError("worker share: input rows are inconsistent")
    _within("input slots", s.x_slots, s.in_neurons[0].shape[0] if s.n_layers else 0)
    _within("active images", s.active, max(s.n_images, 1))
    _within("saturated images", s.saturated, max(s.n_images, 1))


def _check(s: WorkerShare) -> WorkerShare:
    """Every index a kernel or the loop will follow lies in range; counts agree."""
    if not (0 <= s.worker < s.n_workers and s.n_neurons >= 1 and s.n_images >= 0):
        raise StorageError("worker share: bad worker, worker count, neuron or image count")
    L = s.n_layers
    if s.keeps_saturated.shape != (L,) or any(len(x) != L for x in (s.in_neurons, s.colptr, s.rowidx,
                                                                       s.vals, s.bias, s.local_slots,
                                                                       s.local_pos, s.recv_slots, s.send_pos)):
        raise StorageError("worker share: per-layer lists differ in length")
    for l in range(L):
        check_layer(l, s.n_neurons, s.n_workers, s.out_neurons[l - 1].shape[0] if l else 0,
                    s.out_neurons[l], s.in_neurons[l], s.colptr[l], s.rowidx[l], s.vals[l], s.bias[l],
                    s.local_slots[l], s.local_pos[l], s.recv_slots[l], s.send_pos[l])
    check_inputs(s)
    return s


def _restrict_layer(colptr, rowidx, vals, outs):
    """W restricted to output columns ``outs``: (needed rows, colptr, rows as slots, vals)."""
    starts, stops = colptr[outs], colptr[outs + 1]
    lengths = stops - starts
    sub_ptr = np.zeros(outs.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=sub_ptr[1:])
    gather = np.repeat(starts - sub_ptr[:-1], lengths) + np.arange(sub_ptr[-1])
    rows = rowidx[gather]
    needed = np.unique(rows).astype(np.int32)
    slots = np.searchsorted(needed, rows).astype(np.int32)
    return needed, sub_ptr, slots, np.ascontiguousarray(vals[gather])


def initial_status(indptr, data, n_neurons: int, ymax) -> tuple[np.ndarray, np.ndarray]:
    """(active, saturated) image ids of the inputs: empty rows are dead, full all-ymax rows parked."""
    nnz = np.diff(indptr)
    at_ymax = np.concatenate([[0], np.cumsum(data == ymax)])  # not reduceat: blank last rows
    full_ymax = at_ymax[indptr[1:]] - at_ymax[indptr[:-1]]
    saturated = (nnz == n_neurons) & (full_ymax == n_neurons)
    return np.flatnonzero((nnz > 0) & ~saturated), np.flatnonzero(saturated)


class LayerPlan(NamedTuple):
    """One worker's part of one layer (the per-layer entries of :class:`WorkerShare`)."""

    out_neurons: np.ndarray
    in_neurons: np.ndarray
    colptr: np.ndarray
    rowidx: np.ndarray
    vals: np.ndarray
    bias: np.ndarray
    local_slots: np.ndarray
    local_pos: np.ndarray
    recv_slots: list
    send_pos: list


def plan_layer(layer: int, csc, owners_l: np.ndarray, owners_prev: np.ndarray | None,
               n_workers: int) -> list[LayerPlan]:
    """Every worker's :class:`LayerPlan` of layer ``layer``, from that layer alone.

    ``csc`` is the layer's (colptr, rowidx, vals, bias); ``owners_l`` its owners and
    ``owners_prev`` the previous layer's (None at layer 0). Nothing of other layers is needed,
    so a network can be planned one layer at a time (fsd_runtime.prepared).
    """
    colptr, rowidx, vals, bias = csc
    empty = np.zeros(0, np.int64)
    per = []
    for p in range(n_workers):
        outs = np.flatnonzero(owners_l == p).astype(np.int32)
        needed, sub_ptr, slots, sub_vals = _restrict_layer(colptr, rowidx, vals, outs)
        per.append((outs, needed, sub_ptr, slots, sub_vals, np.ascontiguousarray(bias[outs])))
    plans = []
    for p in range(n_workers):
        if layer == 0:
            plans.append(LayerPlan(*per[p], empty, empty, [empty] * n_workers, [empty] * n_workers))
            continue
        needed = per[p][1]
        src = owners_prev[needed]
        prev_outs = np.flatnonzero(owners_prev == p).astype(np.int32)
        mine = np.flatnonzero(src == p)
        local_pos = np.searchsorted(prev_outs, needed[mine]).astype(np.int64)
        recv = [empty if s == p else np.flatnonzero(src == s) for s in range(n_workers)]
        sends = []
        for q in range(n_workers):
            if q == p:
                sends.append(empty)
                continue
            their = per[q][1]
            rows = their[owners_prev[their] == p]
            sends.append(np.searchsorted(prev_outs, rows).astype(np.int64))
        plans.append(LayerPlan(*per[p], mine, local_pos, recv, sends))
    return plans


def input_rows(indptr, indices, data, in_neurons0: np.ndarray, n_neurons: int):
    """(x_indptr, x_slots, x_data): the images (CSR) restricted to a worker's layer-0 input rows,
    columns renumbered as its slots."""
    n_images = indptr.shape[0] - 1
    col_slot = np.full(n_neurons, -1, np.int64)
    col_slot[in_neurons0] = np.arange(in_neurons0.shape[0])
    keep = col_slot[indices] >= 0
    x_indptr = np.zeros(n_images + 1, np.int64)
    row_of = np.repeat(np.arange(n_images), np.diff(indptr))
    np.cumsum(np.bincount(row_of[keep], minlength=n_images), out=x_indptr[1:])
    return x_indptr, col_slot[indices[keep]].astype(np.int32), np.ascontiguousarray(data[keep], np.float32)


def check_owners(owners: np.ndarray, shape: tuple[int, int], n_workers: int | None) -> int:
    """Refuse a malformed partition; the worker count (default: the largest owner + 1)."""
    if owners.shape != shape:
        raise ValueError(f"owners must have shape {shape}, got {owners.shape}")
    if owners.min() < 0:
        raise ValueError("owners must be worker ids >= 0")
    n_workers = int(owners.max()) + 1 if n_workers is None else int(n_workers)
    if owners.max() >= n_workers:
        raise ValueError(f"owners name worker {int(owners.max())}, but there are {n_workers} workers")
    return n_workers


def build_shares(net, indptr, indices, data, owners: np.ndarray,
                 n_workers: int | None = None) -> list[WorkerShare]:
    """Every worker's share of ``net`` (a PackedNetwork) and the images (CSR images x neurons).

    ``owners`` is the partition, shape (layers, neurons), values 0..P-1 (see fsd_runtime.partition).
    ``n_workers`` defaults to the largest owner + 1; a worker may own no neuron of a layer (or of
    any layer: it then only reports, vacuously, that its rows are all zero and all ymax).
    Layer by layer the same :func:`plan_layer` as a prepared model (fsd_runtime.prepared).
    """
    L, n = net.n_layers, net.n_neurons
    owners = np.asarray(owners)
    n_workers = check_owners(owners, (L, n), n_workers)
    active, saturated = initial_status(indptr, data, n, net.ymax)
    per: list[list[LayerPlan]] = [[] for _ in range(n_workers)]
    for l in range(L):
        plans = plan_layer(l, net.layer_csc(l), owners[l], owners[l - 1] if l else None, n_workers)
        for p in range(n_workers):
            per[p].append(plans[p])
    shares = []
    for p in range(n_workers):
        x_indptr, x_slots, x_data = input_rows(indptr, indices, data, per[p][0].in_neurons, n)
        lists = {name: [getattr(per[p][l], name) for l in range(L)] for name in LayerPlan._fields}
        shares.append(WorkerShare(
            worker=p, n_workers=n_workers, n_neurons=n, n_images=indptr.shape[0] - 1,
            ymax=np.float32(net.ymax), keeps_saturated=np.asarray(net.keeps_saturated, np.bool_),
            x_indptr=x_indptr, x_slots=x_slots, x_data=x_data, active=active, saturated=saturated,
            **lists))
    return shares
