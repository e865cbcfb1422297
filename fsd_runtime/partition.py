"""Partitioning a network's neurons over workers, layer by layer.

A partition is ``owners[l, j]``: the worker computing output neuron j of
layer l, which so holds row j of layer l+1's input. Partitions chain: the
rows worker p must receive at layer l are the inputs of its outputs that
another worker computed at layer l-1, so the exact communication volume of
layer l (rows sent, counted once per receiving worker) is

    V_l = sum over input rows k of |need_l(k) - {owners[l-1, k]}|,
    need_l(k) = {owners[l, j] : W_l[k, j] != 0}

(the connectivity of the column net of k with the owner of k pinned as an
extra vertex). Layer 0 reads its inputs from storage and sends nothing.

``contiguous``: equal neuron ranges in every layer. ``hypergraph``: a
documented heuristic that minimises V_l layer by layer under a balance
tolerance (KaHyPar 1.3.7 installs from PyPI here, but its wheel ships no
preset .ini and its objective has no pinned owners, which is what the
chain needs): outputs with identical input sets are grouped, and groups,
in lexicographic order of their inputs, go greedily to the worker that
would receive the fewest new remote rows for them, with every worker
holding at most (1+eps) N/P outputs (or ceil(N/P) if that is more). (Fiduccia-Mattheyses passes moving
single outputs afterwards were tried and gained nothing on the official
net, so they are not here.) On the official net it cuts the volume of
layers 1-19 from 7 N rows a layer (contiguous ranges: everyone needs
everything) to about 1.1 N.
"""
from __future__ import annotations

import math

import numpy as np

METHODS = ("contiguous", "hypergraph")
#: Allowed deviation of a worker's output count from N/P (hypergraph).
DEFAULT_IMBALANCE = 0.03


def _check(n_neurons: int, n_workers: int) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    if n_workers > n_neurons:
        raise ValueError(f"{n_workers} workers for {n_neurons} neurons: each worker needs a neuron")


def contiguous(n_neurons: int, n_layers: int, n_workers: int) -> np.ndarray:
    """Equal contiguous neuron ranges, the same in every layer."""
    _check(n_neurons, n_workers)
    row = (np.arange(n_neurons, dtype=np.int64) * n_workers // n_neurons).astype(np.int32)
    return np.tile(row, (n_layers, 1))


def _column_groups(colptr: np.ndarray, rowidx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outputs with identical input rows, as (rows, outputs) pairs in lexicographic order of rows.

    Challenge layers have 16 or 32 outputs per input set, so the greedy works on 32-64 groups.
    """
    groups: dict[bytes, list[int]] = {}
    for j in range(colptr.shape[0] - 1):
        groups.setdefault(rowidx[colptr[j]:colptr[j + 1]].tobytes(), []).append(j)
    ordered = sorted(groups.items(), key=lambda item: tuple(np.frombuffer(item[0], rowidx.dtype)))
    return [(np.frombuffer(key, rowidx.dtype), np.asarray(js)) for key, js in ordered]


def _layer(colptr, rowidx, in_owner: np.ndarray | None, n_workers: int, imbalance: float) -> np.ndarray:
    """Owners of one layer's outputs minimising that layer's volume, given its inputs' owners.

    Greedy over groups of outputs with identical inputs (in lexicographic order, so groups
    that share rows come together): each group goes to the worker that would receive the
    fewest new remote rows for it, ties to the least loaded; a group that does not fit
    spills its remaining outputs to the next best worker.
    """
    n = colptr.shape[0] - 1
    high = max(math.floor(n / n_workers * (1 + imbalance)), math.ceil(n / n_workers))
    # remote[k, p]: row k would have to be sent to p (p is not k's owner); layer 0: every copy counts.
    remote = np.ones((n, n_workers), bool)
    if in_owner is not None:
        remote[np.arange(n), in_owner] = False
    needed = np.zeros((n, n_workers), bool)  # some output on p already needs row k
    load = np.zeros(n_workers, np.int64)
    owner = np.empty(n, np.int32)
    for rows, outputs in _column_groups(colptr, rowidx):
        cost = (~needed[rows] & remote[rows]).sum(axis=0).astype(np.float64)
        placed = 0
        while placed < outputs.shape[0]:
            cost[load >= high] = np.inf
            p = int(np.lexsort((load, cost))[0])
            take = min(outputs.shape[0] - placed, high - int(load[p]))
            owner[outputs[placed:placed + take]] = p
            load[p] += take
            needed[rows, p] = True
            placed += take
            cost[p] = np.inf
    return owner


def hypergraph(net, n_workers: int, *, imbalance: float = DEFAULT_IMBALANCE) -> np.ndarray:
    """Communication-minimising owners for a PackedNetwork (see the module notes)."""
    _check(net.n_neurons, n_workers)
    if not 0 <= imbalance < 1:
        raise ValueError(f"imbalance must be in [0, 1), got {imbalance}")
    owners = np.empty((net.n_layers, net.n_neurons), np.int32)
    in_owner = None
    for l in range(net.n_layers):
        colptr, rowidx, _, _ = net.layer_csc(l)
        owners[l] = in_owner = _layer(colptr, rowidx, in_owner, n_workers, imbalance)
    return owners


def volume(net, owners: np.ndarray) -> dict:
    """Per layer: rows each worker sends each other (``rows[l][p][q]``), total volume, imbalance."""
    n_workers = int(owners.max()) + 1
    report = {"rows": [], "volume": [], "imbalance": []}
    for l in range(net.n_layers):
        loads = np.bincount(owners[l], minlength=n_workers)
        report["imbalance"].append(float(loads.max() / (net.n_neurons / n_workers) - 1))
        pairs = np.zeros((n_workers, n_workers), np.int64)
        if l:
            colptr, rowidx, _, _ = net.layer_csc(l)
            col_of = np.repeat(np.arange(net.n_neurons), np.diff(colptr))
            need = np.unique(rowidx.astype(np.int64) * n_workers + owners[l][col_of])  # (row, needer)
            row, dst = need // n_workers, need % n_workers
            src = owners[l - 1][row]
            remote = src != dst
            np.add.at(pairs, (src[remote], dst[remote]), 1)
        report["rows"].append(pairs.tolist())
        report["volume"].append(int(pairs.sum()))
    return report


def layer_owners(method: str, colptr: np.ndarray, rowidx: np.ndarray, in_owner: np.ndarray | None,
                 n_workers: int, *, imbalance: float = DEFAULT_IMBALANCE) -> np.ndarray:
    """One layer's owners by the named method from that layer's CSC and the previous layer's
    owners alone (None at layer 0): the same rows :func:`make_partition` gives, one at a time."""
    n = colptr.shape[0] - 1
    if method == "contiguous":
        return contiguous(n, 1, n_workers)[0]
    if method == "hypergraph":
        _check(n, n_workers)
        return _layer(colptr, rowidx, in_owner, n_workers, imbalance)
    raise ValueError(f"unknown partition method {method!r}; choose one of {METHODS}")


def make_partition(net, n_workers: int, method: str) -> np.ndarray:
    """``owners`` for a PackedNetwork by the named method."""
    if method == "contiguous":
        return contiguous(net.n_neurons, net.n_layers, n_workers)
    if method == "hypergraph":
        return hypergraph(net, n_workers)
    raise ValueError(f"unknown partition method {method!r}; choose one of {METHODS}")
