"""A model prepared once: partitioned, planned and stored per worker, reused by any number of runs.

``prepare(source, out, P)`` reads (or generates) the network one layer at a time, partitions that
layer given the previous layer's owners (:func:`fsd_runtime.partition.layer_owners`), plans it for
every worker (:func:`fsd_runtime.plan.plan_layer`) and appends each worker's part to that worker's
current segment; segments are written out whenever the buffered parts reach ``segment_bytes``. So
at most one layer of the network, its plans and one segment's worth of parts are in memory,
whatever the number of layers. A run then loads only ``model.json`` and ``layer0.npz`` (each
worker's layer-0 input neurons) besides its images: it writes each worker a small *inputs* share
(the images restricted to that worker's layer-0 rows), and each worker reads its own segments.

Layout under a store prefix (a local directory is a store with no prefix)::

    model.json                      metadata; written last, so it marks a complete model
    layer0.npz                      every worker's layer-0 input neurons (flat + pointers)
    workers/{w}/seg-{s:05d}.npz     worker w's weights and plans of segment s's layers

``model.json`` records the sha256 of every other file's bytes (``layer0_sha256``,
``segment_sha256[w][s]``) and of its own content (``model_sha256``: canonical JSON of all but
its timings and that field), checked when the model is opened and when each file is read, before
any parsing: a file changed or corrupted after ``prepare`` is refused, naming it. (A model whose
digests were recomputed after an edit passes: the digests catch accidents, not a user's own
deliberate changes.) Every archive is an npz read without pickle and checked before use: a
segment's meta must match ``model.json``, its weights and biases must be finite, and the share a
worker assembles goes through the same index checks as any worker share (``fsd_runtime.plan``).
``network_hash`` (sha256 of every layer's CSC weights and bias, N, L and ymax) lets a run
refuse a model prepared from another network.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fsd_runtime import events as ev
from fsd_runtime.plan import (LayerPlan, WorkerShare, _check, _flatten, _split, check_inputs, check_layer,
                              check_link, plan_layer)
from fsd_runtime.storage import LocalStorage, Storage, StorageError, make_storage, pack_arrays, unpack_arrays

FORMAT = "fsd-inference prepared model"
#: 2: model.json records the sha256 of every file and of itself (version 1 did not; refused)
VERSION = 2
MODEL_KEY = "model.json"
LAYER0_KEY = "layer0.npz"
#: Buffered worker parts (all workers together) that close a segment; one layer at least.
DEFAULT_SEGMENT_BYTES = 64 * 2**20
#: A model.json larger than this is refused unread (it holds a few numbers per layer).
MAX_MODEL_JSON_BYTES = 2**24
#: Where a run on a shared store (S3) puts a prepared model it uploads, for later runs to reuse.
MODELS_PREFIX = "models"
_SEGMENT_VERSION = 1
_INPUTS_VERSION = 1
_SINGLE = ("out_neurons", "in_neurons", "colptr", "rowidx", "vals", "bias", "local_slots", "local_pos")
_SINGLE_DTYPES = (np.int32, np.int32, np.int64, np.int32, np.float32, np.float32, np.int64, np.int64)


class PreparedError(ValueError):
    """A prepared model is missing, incomplete or malformed, or is not the one a run asks for
    (other worker count, partition or network); the message says which, in one line."""


class ModelFileError(StorageError):
    """A file of a prepared model a worker reads (model.json, one of its segments) is not what
    ``prepare`` wrote (its sha256 differs from model.json's) or is malformed: the model's data is
    bad, not the run. The worker's error record says so (``bad_model_file``) and the coordinator
    raises a :class:`PreparedError` (``coordinator.PreparedRunError``; CLI: exit 2)."""


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()


def meta_digest(meta: dict) -> str:
    """sha256 (hex) of a model.json's content but its ``timings`` and this digest itself
    (``model_sha256``): canonical JSON (sorted keys, no spaces), so any change to what a run
    uses (ymax, per-layer flags, sizes, the file digests...) changes it."""
    core = {k: v for k, v in meta.items() if k not in ("timings", "model_sha256")}
    return sha256_hex(json.dumps(core, sort_keys=True, separators=(",", ":")).encode())


# --- networks as layer streams, in the packed (CSC) form the plans take ---

@dataclass(frozen=True)
class _CscStream:
    name: str
    n_neurons: int
    n_layers: int
    ymax: np.float32
    layers: object  # () -> iterator of (colptr, rowidx, vals, bias, keeps_saturated)


def _packed_stream(net) -> _CscStream:
    def layers():
        for l in range(net.n_layers):
            yield (*net.layer_csc(l), bool(net.keeps_saturated[l]))

    return _CscStream("packed network", int(net.n_neurons), int(net.n_layers), np.float32(net.ymax), layers)


def _csc_stream(stream, keeps: bool = True) -> _CscStream:
    """A model.LayerStream packed layer by layer exactly as ``fsd_kernels.pack`` packs a network
    (``keeps``: with each layer's keeps_saturated, which runs a kernel; else None)."""
    from fsd_kernels import _validate
    from fsd_kernels.network import csr_to_csc

    if keeps:
        from fsd_kernels.network import keeps_saturated

    n = int(stream.n_neurons)
    ymax = _validate.ymax(stream.ymax)

    def layers():
        count = 0
        for l, (w, bias) in enumerate(stream.layers()):
            if l >= stream.n_layers:
                raise PreparedError(f"{stream.name}: more than the {stream.n_layers} layers it announced")
            indptr, indices, data = _validate.csr(f"layer {l} weights", *w.arrays, (n, n))
            bias = np.broadcast_to(np.float32(bias), (n,)) if np.ndim(bias) == 0 else bias
            bias = _validate.vector(f"layer {l} bias", bias, n)
            colptr, rows, vals = csr_to_csc(indptr, indices, data, n)
            yield colptr, rows, vals, bias, bool(keeps_saturated(colptr, rows, vals, bias, ymax)) if keeps else None
            count += 1
        if count != stream.n_layers:
            raise PreparedError(f"{stream.name}: {count} layers, not the {stream.n_layers} it announced")

    return _CscStream(stream.name, n, int(stream.n_layers), ymax, layers)


def parse_source(text: str):
    """``"embedded"`` or ``"synthetic:NxL[:SEED]"`` as a layer stream; None for anything else."""
    from fsd_runtime import model

    if text == "embedded":
        return model.embedded()
    if text.startswith("synthetic:"):
        parts = text.split(":")
        try:
            n, layers = (int(x) for x in parts[1].lower().split("x"))
            seed = int(parts[2]) if len(parts) == 3 else 0
            if len(parts) > 3:
                raise ValueError
        except ValueError:
            raise PreparedError(f"expected synthetic:NxL[:SEED], e.g. synthetic:4096x120:0, got {text!r}") from None
        return model.stream_synthetic(n, layers, seed)
    return None


def network_stream(source, bias: float | None = None, keeps: bool = True) -> _CscStream:
    """The network ``source`` names, one packed layer at a time. ``source``: a directory of
    official layer files or an .npz network file (read a layer at a time), ``"embedded"``,
    ``"synthetic:NxL[:SEED]"`` (generated a layer at a time), a ``model.LayerStream``, or a
    network already in memory (``model.Network``, ``model.Dataset``, ``fsd_kernels.PackedNetwork``)."""
    from fsd_kernels import PackedNetwork
    from fsd_runtime import model

    if isinstance(source, str):
        parsed = parse_source(source)
        if parsed is not None:
            source = parsed
    if bias is not None and not isinstance(source, (str, os.PathLike)):
        raise PreparedError("bias applies to network directories only")
    name = "network"
    if isinstance(source, model.Dataset):
        source, name = source.network, source.name
    if isinstance(source, PackedNetwork):
        return _packed_stream(source)
    if isinstance(source, (str, os.PathLike)):
        return _csc_stream(model.stream_network(os.fspath(source), bias), keeps)
    if isinstance(source, model.Network):
        net = source
        source = model.LayerStream(name, net.n_neurons, net.n_layers, net.ymax,
                                   lambda: zip(net.layers, net.biases))
    if isinstance(source, model.LayerStream):
        return _csc_stream(source, keeps)
    raise TypeError(f"a network source must be a path, 'embedded', 'synthetic:NxL[:SEED]', a LayerStream, "
                    f"a Network or a PackedNetwork, got {type(source).__name__}")


def _hash_layer(h, colptr, rowidx, vals, bias) -> None:
    for a, dtype in ((colptr, np.int64), (rowidx, np.int32), (vals, np.float32), (bias, np.float32)):
        h.update(np.ascontiguousarray(a, dtype).tobytes())


def _hash_end(h, n: int, n_layers: int, ymax) -> str:
    h.update(np.array([n, n_layers], np.int64).tobytes() + np.float32(ymax).tobytes())
    return h.hexdigest()


def network_hash(source, bias: float | None = None) -> str:
    """sha256 (hex) of a network's content, read one layer at a time (a ``PackedNetwork`` too):
    equal for the same weights, biases and ymax in any of the formats."""
    stream = network_stream(source, bias, keeps=False)
    h = hashlib.sha256(b"fsd-network-v1")
    count = 0
    for colptr, rowidx, vals, b, _ in stream.layers():
        _hash_layer(h, colptr, rowidx, vals, b)
        count += 1
    return _hash_end(h, stream.n_neurons, count, stream.ymax)


# --- preparing ---

@dataclass(frozen=True)
class PreparedModel:
    """A complete prepared model: where it is and its metadata (``model.json``)."""

    storage: Storage
    prefix: str
    meta: dict

    def key(self, rest: str) -> str:
        return f"{self.prefix}/{rest}" if self.prefix else rest

    @property
    def n_workers(self) -> int:
        return self.meta["n_workers"]

    @property
    def n_neurons(self) -> int:
        return self.meta["n_neurons"]

    @property
    def n_layers(self) -> int:
        return self.meta["n_layers"]

    @property
    def partition(self) -> str:
        return self.meta["partition"]

    @property
    def network_hash(self) -> str:
        return self.meta["network_hash"]

    @property
    def ymax(self) -> np.float32:
        return np.float32(self.meta["ymax"])

    def location(self) -> dict:
        """What a worker event carries to find the model (``WorkerEvent.model``)."""
        return {"storage": self.storage.config(), "prefix": self.prefix}

    def where(self) -> str:
        root = getattr(self.storage, "root", None)
        base = root if root else f"{self.storage.config().get('kind')} store"
        return f"{base}/{self.prefix}" if self.prefix else base


def segment_key(worker: int, segment: int) -> str:
    return f"workers/{worker}/seg-{segment:05d}.npz"


def _segment_bytes(worker: int, n_workers: int, n_neurons: int, first: int, plans: list[LayerPlan]) -> bytes:
    arrays = {"version": np.int64(_SEGMENT_VERSION),
              "meta": np.array([worker, n_workers, n_neurons, first, len(plans)], np.int64)}
    for name in _SINGLE:
        arrays[name], arrays[name + "_ptr"] = _flatten([getattr(p, name) for p in plans])
    for name in ("recv_slots", "send_pos"):
        arrays[name], arrays[name + "_ptr"] = _flatten([a for p in plans for a in getattr(p, name)])
    return pack_arrays(arrays)


def _plan_bytes(plan: LayerPlan) -> int:
    return sum(getattr(plan, name).nbytes for name in _SINGLE) + \
        sum(a.nbytes for name in ("recv_slots", "send_pos") for a in getattr(plan, name))


def _target(out) -> tuple[Storage, str, str | None, str | None]:
    """(store, prefix, directory this call creates, empty directory it fills) of ``prepare``'s ``out``."""
    if isinstance(out, PreparedModel):
        out = (out.storage, out.prefix)
    if isinstance(out, Storage):
        out = (out, "")
    if isinstance(out, tuple):
        storage, prefix = out
        if storage.list(prefix) if prefix else (storage.exists(MODEL_KEY) or storage.list("workers")):
            raise PreparedError(f"{prefix or 'the store'} already holds objects; prepare into an empty prefix")
        return storage, prefix, None, None
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory, a Storage or (Storage, prefix), got {type(out).__name__}")
    path = os.path.abspath(os.fspath(out))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise PreparedError(f"{path}: exists and is not an empty directory; prepare into a new one")
    created = None if os.path.isdir(path) else path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise PreparedError(f"{path}: cannot create the directory ({exc.strerror or exc})") from None
    return LocalStorage(path), "", created, None if created else path


def prepare(source, out, n_workers: int, *, partition: str = "hypergraph", bias: float | None = None,
            segment_bytes: int = DEFAULT_SEGMENT_BYTES, progress=None) -> dict:
    """Prepare ``source`` (see :func:`network_stream`) for runs on ``n_workers`` workers into
    ``out`` (a new or empty directory, a Storage, or (Storage, prefix)), streaming one layer at a
    time. Returns the model's metadata (what ``model.json`` holds), with ``timings`` in seconds
    (``read_s``, ``partition_s``, ``plan_s``, ``write_s``, ``total_s``) and ``bytes`` written.
    On any failure what was written is removed again."""
    from fsd_runtime.partition import METHODS, layer_owners

    started = time.perf_counter()
    say = progress or (lambda message: None)
    if partition not in METHODS:
        raise PreparedError(f"unknown partition method {partition!r}; choose one of {METHODS}")
    if isinstance(n_workers, bool) or not isinstance(n_workers, (int, np.integer)) or n_workers < 1:
        raise PreparedError(f"n_workers must be a positive integer, got {n_workers!r}")
    if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, (int, np.integer)) or segment_bytes < 1:
        raise PreparedError(f"segment_bytes must be a positive integer, got {segment_bytes!r}")
    n_workers = int(n_workers)
    stream = network_stream(source, bias)
    n = stream.n_neurons
    if n_workers > n:
        raise PreparedError(f"{n_workers} workers for {n} neurons: each worker needs a neuron")
    storage, prefix, created, local = _target(out)
    model = PreparedModel(storage, prefix, {})
    timings = dict.fromkeys(("read_s", "partition_s", "plan_s", "write_s"), 0.0)
    try:
        h = hashlib.sha256(b"fsd-network-v1")
        buffers: list[list[LayerPlan]] = [[] for _ in range(n_workers)]
        buffered, first, segments, keeps, written = 0, 0, [], [], 0
        layer0, owners_prev, nnz, most_edges = None, None, 0, 0
        # per worker, what sizes its memory (budget.Footprint, without the run's inputs)
        # and what a run downloads (stored_bytes: its segment objects)
        sizes = [dict.fromkeys(_SIZE_FIELDS + ("stored_bytes",), 0)
                 for _ in range(n_workers)]
        digests: list[list[str]] = [[] for _ in range(n_workers)]  # sha256 of each worker's segments

        def flush():
            nonlocal buffered, first, written
            tick = time.perf_counter()
            count = len(buffers[0])
            for p in range(n_workers):
                data = _segment_bytes(p, n_workers, n, first, buffers[p])
                storage.put(model.key(segment_key(p, len(segments))), data)
                digests[p].append(sha256_hex(data))
                written += len(data)
                sizes[p]["stored_bytes"] += len(data)
                buffers[p] = []
            segments.append([first, count])
            first, buffered = first + count, 0
            timings["write_s"] += time.perf_counter() - tick

        tick = time.perf_counter()
        l = -1
        for l, (colptr, rowidx, vals, b, keep) in enumerate(stream.layers()):
            timings["read_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            _hash_layer(h, colptr, rowidx, vals, b)
            owners = layer_owners(partition, colptr, rowidx, owners_prev, n_workers)
            timings["partition_s"] += time.perf_counter() - tick
            tick = time.perf_counter()
            plans = plan_layer(l, (colptr, rowidx, vals, b), owners, owners_prev, n_workers)
            if l == 0:
                layer0 = [plan.in_neurons for plan in plans]
            for p in range(n_workers):
                buffers[p].append(plans[p])
                size = _plan_bytes(plans[p])
                buffered += size
                sizes[p]["share_bytes"] += size
                sizes[p]["most_in"] = max(sizes[p]["most_in"], int(plans[p].in_neurons.shape[0]))
                sizes[p]["most_out"] = max(sizes[p]["most_out"], int(plans[p].out_neurons.shape[0]))
                sizes[p]["last_rows"] = int(plans[p].out_neurons.shape[0])
                sizes[p]["sources"] = max(sizes[p]["sources"], sum(
                    1 for s, r in enumerate(plans[p].recv_slots) if s != p and r.shape[0]))
            keeps.append(keep)
            nnz += int(rowidx.shape[0])
            most_edges = max(most_edges, int(rowidx.shape[0]))
            owners_prev = owners
            del plans, colptr, rowidx, vals, b
            timings["plan_s"] += time.perf_counter() - tick
            if buffered >= segment_bytes:
                flush()
            if (l + 1) % 100 == 0:
                say(f"prepared {l + 1} of {stream.n_layers} layers")
            tick = time.perf_counter()
        if l < 0:
            raise PreparedError(f"{stream.name}: the network has no layers")
        if buffers[0]:
            flush()
        tick = time.perf_counter()
        flat, ptr = _flatten(layer0)
        data = pack_arrays({"version": np.int64(VERSION), "in_neurons": flat, "ptr": ptr})
        storage.put(model.key(LAYER0_KEY), data)
        written += len(data)
        meta = {
            "format": FORMAT, "version": VERSION, "name": stream.name, "n_neurons": n,
            "n_layers": l + 1, "n_workers": n_workers, "partition": partition,
            "ymax": float(stream.ymax), "keeps_saturated": keeps, "nnz": nnz, "most_edges": most_edges,
            "worker_sizes": sizes,
            "network_hash": _hash_end(h, n, l + 1, stream.ymax), "segments": segments,
            "layer0_sha256": sha256_hex(data), "segment_sha256": digests,
        }
        meta["model_sha256"] = meta_digest(meta)
        timings["write_s"] += time.perf_counter() - tick
        timings["total_s"] = time.perf_counter() - started
        meta["timings"] = timings
        text = json.dumps(meta).encode()
        meta["bytes"] = written + len(text)
        storage.put(model.key(MODEL_KEY), text)  # last: a model.json means a complete model
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        elif local:  # an empty directory of the user's: empty again
            for name in os.listdir(local):
                path = os.path.join(local, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        else:
            for key in storage.list(prefix) if prefix else storage.list("workers") + \
                    [k for k in (LAYER0_KEY, MODEL_KEY) if storage.exists(k)]:
                storage.delete(key)
        raise
    say(f"prepared {l + 1} layers of {n} neurons for {n_workers} workers in {timings['total_s']:.1f} s")
    return meta


# --- opening and checking ---

def _meta_error(where: str, what: str) -> PreparedError:
    return PreparedError(f"{where}: not a usable prepared model ({what})")


#: model.json's per-worker sizes (``worker_sizes``): what a run's ``budget.Footprint`` needs
#: (models prepared since also record ``stored_bytes``, their segment objects' bytes).
_SIZE_FIELDS = ("share_bytes", "most_in", "most_out", "last_rows", "sources")


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _check_meta(meta, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _meta_error(where, "model.json is not one")
    version = meta.get("version")
    if type(version) is int and version < VERSION:
        raise _meta_error(where, f"format version {version}, made by an older fsd-inference without the file "
                                 f"digests this code checks (version {VERSION}); prepare the model again")
    if version != VERSION:
        raise _meta_error(where, f"version {version!r}, this code reads {VERSION}")
    digest = meta.get("model_sha256")
    if not _is_sha256(digest) or not _is_sha256(meta.get("layer0_sha256")):
        raise _meta_error(where, "model.json lacks its sha256 digests (model_sha256, layer0_sha256); "
                                 "prepare the model again")
    if digest != meta_digest(meta):
        raise _meta_error(where, f"{MODEL_KEY} does not match its model_sha256: it was changed or corrupted "
                                 "after prepare; prepare the model again")

    def integer(name, low, high):
        v = meta.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _meta_error(where, f"{name} must be an integer in {low}..{high}, got {v!r}")
        return v

    n = integer("n_neurons", 1, np.iinfo(np.int32).max)
    L = integer("n_layers", 1, 10**7)
    integer("n_workers", 1, min(n, ev.MAX_WORKERS))
    integer("nnz", 0, 2**62)
    if not isinstance(meta.get("partition"), str):
        raise _meta_error(where, "no partition method")
    ymax = meta.get("ymax")
    if isinstance(ymax, bool) or not isinstance(ymax, (int, float)) or not (math.isfinite(ymax) and ymax > 0):
        raise _meta_error(where, f"ymax must be a finite positive number, got {ymax!r}")
    keeps = meta.get("keeps_saturated")
    if not isinstance(keeps, list) or len(keeps) != L or not all(isinstance(k, bool) for k in keeps):
        raise _meta_error(where, f"keeps_saturated must be {L} true/false values")
    if not _is_sha256(meta.get("network_hash")):
        raise _meta_error(where, "network_hash must be 64 hex digits")
    segments, expect = meta.get("segments"), 0
    if not isinstance(segments, list) or not segments:
        raise _meta_error(where, "no segments")
    for seg in segments:
        if not (isinstance(seg, list) and len(seg) == 2 and all(type(x) is int for x in seg)
                and seg[0] == expect and seg[1] >= 1):
            raise _meta_error(where, "segments must be [first layer, layers] pairs covering every layer in order")
        expect += seg[1]
    if expect != L:
        raise _meta_error(where, f"segments cover {expect} layers, not {L}")
    digests = meta.get("segment_sha256")
    if not (isinstance(digests, list) and len(digests) == meta["n_workers"] and all(
            isinstance(d, list) and len(d) == len(segments) and all(map(_is_sha256, d)) for d in digests)):
        raise _meta_error(where, f"segment_sha256 must be {meta['n_workers']} lists of {len(segments)} sha256 digests")
    # optional (older models lack them), checked where present: runs size memory and timeouts by them
    if "name" in meta and not isinstance(meta["name"], str):
        raise _meta_error(where, f"name must be text, got {meta['name']!r}")
    if "most_edges" in meta:
        integer("most_edges", 0, 2**62)
    sizes = meta.get("worker_sizes")
    if sizes is not None and not (
            isinstance(sizes, list) and len(sizes) == meta["n_workers"]
            and all(isinstance(size, dict) and set(size) - {"stored_bytes"} == set(_SIZE_FIELDS)
                    and all(type(v) is int and 0 <= v <= 2**62 for v in size.values()) for size in sizes)):
        raise _meta_error(where, f"worker_sizes must be {meta['n_workers']} objects of non-negative "
                                 f"integers {', '.join(_SIZE_FIELDS)}")
    return meta


def open_model(where, prefix: str = "") -> PreparedModel:
    """The prepared model at ``where``: a directory, a Storage (with ``prefix``) or a
    PreparedModel; :class:`PreparedError` if there is none, or an incomplete or malformed one."""
    if isinstance(where, PreparedModel):
        return where
    if isinstance(where, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(where))
        if not os.path.isdir(path):
            raise PreparedError(f"{path}: no such prepared model directory (make one with `fsd-inference prepare`)")
        where = LocalStorage(path, create=False)
    if not isinstance(where, Storage):
        raise TypeError(f"a prepared model is a directory, a Storage or a PreparedModel, got {type(where).__name__}")
    model = PreparedModel(where, prefix, {})
    label = model.where()
    key = model.key(MODEL_KEY)
    if not where.exists(key):
        raise PreparedError(f"{label}: not a prepared model (no {MODEL_KEY}: made by `fsd-inference prepare`? "
                            "an interrupted prepare leaves none)")
    text = where.get(key)
    if len(text) > MAX_MODEL_JSON_BYTES:
        raise _meta_error(label, f"{MODEL_KEY} has {len(text)} bytes")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting beyond the parser's depth
        raise _meta_error(label, f"{MODEL_KEY} is not JSON: {exc}") from None
    return PreparedModel(where, prefix, _check_meta(meta, label))


def check_model(model: PreparedModel, *, n_workers: int | None = None, partition: str | None = None,
                network_hash: str | None = None, n_neurons: int | None = None) -> None:
    """Refuse a model that is not the one a run asks for, in one line naming what differs."""
    label = model.where()
    if n_workers is not None and n_workers != model.n_workers:
        raise PreparedError(f"{label} is prepared for {model.n_workers} workers, the run asks for {n_workers} "
                            f"(prepare it again with --workers {n_workers})")
    if partition is not None and partition != model.partition:
        raise PreparedError(f"{label} is partitioned by {model.partition}, the run asks for {partition}")
    if n_neurons is not None and n_neurons != model.n_neurons:
        raise PreparedError(f"{label} is a network of {model.n_neurons} neurons, the run's has {n_neurons}")
    if network_hash is not None and network_hash != model.network_hash:
        raise PreparedError(f"{label} was prepared from another network (hash {model.network_hash[:12]}, "
                            f"the run's is {network_hash[:12]})")


def layer0_inputs(model: PreparedModel) -> list[np.ndarray]:
    """Every worker's layer-0 input neurons (ascending, checked; the file's sha256 first)."""
    data = model.storage.get(model.key(LAYER0_KEY))
    if sha256_hex(data) != model.meta["layer0_sha256"]:
        raise _meta_error(model.where(), f"{LAYER0_KEY} does not match model.json's layer0_sha256: it was "
                                         "changed or corrupted after prepare; prepare the model again")
    z = unpack_arrays(data, f"{model.where()}/{LAYER0_KEY}")
    try:
        parts = _split(z["in_neurons"], z["ptr"], np.int32)
    except KeyError as exc:
        raise _meta_error(model.where(), f"{LAYER0_KEY} lacks {exc}") from None
    if len(parts) != model.n_workers or any(
            a.size and (a[0] < 0 or a[-1] >= model.n_neurons or np.any(np.diff(a) <= 0)) for a in parts):
        raise _meta_error(model.where(), f"{LAYER0_KEY} does not hold {model.n_workers} ascending neuron sets")
    return parts


# --- a run's inputs shares, and a worker's share assembled from its segments ---

def inputs_share(model: PreparedModel, worker: int, in_neurons0: np.ndarray, images, active, saturated) -> bytes:
    """The per-run part of worker ``worker``'s share: the images restricted to its layer-0 rows."""
    from fsd_runtime.plan import input_rows

    indptr, indices, data = images
    x_indptr, x_slots, x_data = input_rows(indptr, indices, data, in_neurons0, model.n_neurons)
    return pack_arrays({
        "inputs_version": np.int64(_INPUTS_VERSION),
        "meta": np.array([worker, model.n_workers, model.n_neurons, indptr.shape[0] - 1], np.int64),
        "network_hash": np.frombuffer(bytes.fromhex(model.network_hash), np.uint8),
        "x_indptr": x_indptr, "x_slots": x_slots, "x_data": x_data,
        "active": np.asarray(active, np.int64), "saturated": np.asarray(saturated, np.int64)})


def _parse_segment(model: PreparedModel, worker: int, index: int, data: bytes) -> dict:
    """Segment ``index`` of worker ``worker`` as per-layer lists: its bytes' sha256 checked against
    model.json's before anything is parsed, then its meta against ``model`` and its weights and
    biases finite (as a serial run's network must be). Anything amiss: :class:`ModelFileError`."""
    first, count = (int(v) for v in model.meta["segments"][index])
    key = model.key(segment_key(worker, index))
    if sha256_hex(data) != model.meta["segment_sha256"][worker][index]:
        raise ModelFileError(f"prepared model segment {model.where()}/{segment_key(worker, index)} does not "
                             "match model.json's segment_sha256: it was changed or corrupted after prepare; "
                             "prepare the model again")
    try:
        z = unpack_arrays(data, f"prepared model segment {key}")
    except StorageError as exc:
        raise ModelFileError(str(exc)) from None
    try:
        if int(z["version"]) != _SEGMENT_VERSION:
            raise ModelFileError(f"prepared model segment {key}: version {int(z['version'])} is not {_SEGMENT_VERSION}")
        meta = [int(v) for v in z["meta"]]
        if meta != [worker, model.n_workers, model.n_neurons, first, count]:
            raise ModelFileError(f"prepared model segment {key} is of another worker, model or layer range")
        lists = {name: _split(z[name], z[name + "_ptr"], dtype) for name, dtype in zip(_SINGLE, _SINGLE_DTYPES)}
        P = model.n_workers
        for name in ("recv_slots", "send_pos"):
            flat = _split(z[name], z[name + "_ptr"], np.int64)
            if len(flat) != count * P:
                raise ModelFileError(f"prepared model segment {key}: {name} has {len(flat)} parts, not {count}x{P}")
            lists[name] = [flat[l * P:(l + 1) * P] for l in range(count)]
    except ModelFileError:
        raise
    except (StorageError, KeyError, IndexError, TypeError) as exc:  # StorageError: a pointer array amiss
        raise ModelFileError(f"prepared model segment {key} is malformed ({type(exc).__name__}: {exc})") from None
    if any(len(v) != count for v in lists.values()):
        raise ModelFileError(f"prepared model segment {key} does not hold {count} layers")
    for name, what in (("vals", "weights"), ("bias", "bias")):
        for at, part in enumerate(lists[name]):
            if not np.all(np.isfinite(part)):
                raise ModelFileError(f"prepared model segment {key}: layer {first + at} {what} values must be finite")
    return lists


def _load_segment(model: PreparedModel, worker: int, index: int) -> dict:
    return _parse_segment(model, worker, index, model.storage.get(model.key(segment_key(worker, index))))


class SegmentReader:
    """A worker's segments of a prepared model, each read when a layer of it is first needed and
    checked as it is read, at most ``keep`` held at once (a worker's memory then does not grow
    with the layers; runs that end early, all images dead or parked, never read the rest).

    The loop goes through the layers in order, touching layer l and l + 1 (its next send), so
    two held segments are never read twice. A layer's positions in the previous layer's outputs
    are checked against that layer's output count, known once it was read; a layer read without
    the one before (the layers between were idle: nothing to compute) is checked when first used.
    """

    PER_LAYER = (*_SINGLE, "recv_slots", "send_pos")

    def __init__(self, model: PreparedModel, worker: int, keep: int = 2):
        self.model, self.worker, self.keep = model, worker, max(1, int(keep))
        self.firsts = [int(first) for first, _ in model.meta["segments"]]
        self.n_layers = model.n_layers
        self.held: dict[int, dict] = {}      # segment index -> per-layer lists, least recent first
        self.out_counts: dict[int, int] = {}  # layer -> this worker's output count (layers read so far)
        self.unlinked: set[int] = set()       # layers whose positions in layer - 1 are not yet checked
        self.segments_read: list[int] = []    # in the order read
        self.bytes_read = 0
        self.footprint = None                 # a budget.Footprint, when the model records its sizes

    def layer(self, name: str, layer: int):
        index = bisect.bisect_right(self.firsts, layer) - 1
        lists = self.held.pop(index, None)
        if lists is None:
            lists = self._read(index)
        self.held[index] = lists  # most recent last
        while len(self.held) > self.keep:
            del self.held[next(iter(self.held))]
        part = lists[name][layer - self.firsts[index]]
        if layer in self.unlinked and name in ("local_pos", "send_pos"):
            if layer - 1 not in self.out_counts:
                raise StorageError(f"worker {self.worker}: layer {layer}'s plan used before layer {layer - 1} "
                                   "was read")
            at = layer - self.firsts[index]
            check_link(layer, self.out_counts[layer - 1], lists["local_pos"][at], lists["send_pos"][at])
            self.unlinked.discard(layer)
        return part

    def _read(self, index: int) -> dict:
        data = self.model.storage.get(self.model.key(segment_key(self.worker, index)))
        self.segments_read.append(index)
        self.bytes_read += len(data)
        lists = _parse_segment(self.model, self.worker, index, data)
        m = self.model
        try:
            for at in range(len(lists["out_neurons"])):
                l = self.firsts[index] + at
                prev = self.out_counts.get(l - 1) if l else 0
                check_layer(l, m.n_neurons, m.n_workers, prev, *(lists[name][at] for name in self.PER_LAYER))
                if prev is None:
                    self.unlinked.add(l)
                self.out_counts[l] = int(lists["out_neurons"][at].shape[0])
        except (IndexError, TypeError) as exc:
            raise StorageError(f"worker share is malformed ({type(exc).__name__}: {exc})") from None
        return lists

    def reads(self) -> dict:
        """What this worker read of the model: open_model's HEAD and GET of model.json, then its
        segments (``gets`` counts them all; ``segments``: their indices as read; ``bytes``)."""
        return {"gets": 2 + len(self.segments_read), "segments": list(self.segments_read), "bytes": self.bytes_read}


class _LayerList(Sequence):
    """One per-layer list of a share whose layers a :class:`SegmentReader` reads when needed."""

    def __init__(self, reader: SegmentReader, name: str):
        self.reader, self.name = reader, name

    def __len__(self) -> int:
        return self.reader.n_layers

    def __getitem__(self, layer):
        if isinstance(layer, slice):
            return [self[i] for i in range(*layer.indices(len(self)))]
        layer = int(layer)
        if layer < 0:
            layer += len(self)
        if not 0 <= layer < len(self):
            raise IndexError(f"layer {layer} of {len(self)}")
        return self.reader.layer(self.name, layer)


def _inputs_part(model: PreparedModel, inputs: bytes, worker: int) -> tuple[int, dict]:
    """(images, arrays) of worker ``worker``'s inputs share of a run of ``model``, checked to be its."""
    z = unpack_arrays(inputs, f"inputs share of worker {worker}")
    try:
        if int(z["inputs_version"]) != _INPUTS_VERSION:
            raise StorageError(f"inputs share version {int(z['inputs_version'])} is not {_INPUTS_VERSION}")
        w, n_workers, n_neurons, n_images = (int(v) for v in z["meta"])
        digest = np.asarray(z["network_hash"], np.uint8).tobytes().hex()
        x = {k: z[k] for k in ("x_indptr", "x_slots", "x_data", "active", "saturated")}
    except (KeyError, ValueError, TypeError) as exc:
        raise StorageError(f"inputs share of worker {worker} is malformed ({type(exc).__name__}: {exc})") from None
    if (w, n_workers, n_neurons) != (worker, model.n_workers, model.n_neurons) or digest != model.network_hash:
        raise StorageError(f"inputs share of worker {worker} is for another worker or another prepared model")
    return n_images, dict(
        x_indptr=np.ascontiguousarray(x["x_indptr"], np.int64), x_slots=np.ascontiguousarray(x["x_slots"], np.int32),
        x_data=np.ascontiguousarray(x["x_data"], np.float32), active=np.ascontiguousarray(x["active"], np.int64),
        saturated=np.ascontiguousarray(x["saturated"], np.int64))


def load_worker_share(model: PreparedModel, inputs: bytes, worker: int) -> WorkerShare:
    """Worker ``worker``'s whole share: its segments of ``model`` and its run's ``inputs`` share,
    checked as any share is (a malformed one raises StorageError, a ValueError)."""
    n_images, x = _inputs_part(model, inputs, worker)
    lists: dict[str, list] = {name: [] for name in SegmentReader.PER_LAYER}
    for index in range(len(model.meta["segments"])):
        for name, part in _load_segment(model, worker, index).items():
            lists[name].extend(part)
    share = WorkerShare(
        worker=worker, n_workers=model.n_workers, n_neurons=model.n_neurons, n_images=n_images, ymax=model.ymax,
        keeps_saturated=np.asarray(model.meta["keeps_saturated"], np.bool_), **x, **lists)
    try:
        return _check(share)
    except (IndexError, TypeError) as exc:
        raise StorageError(f"worker share is malformed ({type(exc).__name__}: {exc})") from None


def open_worker_share(model: PreparedModel, inputs: bytes, worker: int, keep: int = 2) -> WorkerShare:
    """Worker ``worker``'s share for a run, its layers read from its segments as the run needs
    them (:class:`SegmentReader`; ``share.reader`` tells what was read). Its memory footprint
    comes from the model's recorded sizes; a model without them is read whole
    (:func:`load_worker_share`), as is one of a single segment."""
    sizes = model.meta.get("worker_sizes")
    if not isinstance(sizes, list) or len(sizes) != model.n_workers or len(model.meta["segments"]) < 2:
        return load_worker_share(model, inputs, worker)
    n_images, x = _inputs_part(model, inputs, worker)
    reader = SegmentReader(model, worker, keep)
    share = WorkerShare(
        worker=worker, n_workers=model.n_workers, n_neurons=model.n_neurons, n_images=n_images, ymax=model.ymax,
        keeps_saturated=np.asarray(model.meta["keeps_saturated"], np.bool_), **x,
        **{name: _LayerList(reader, name) for name in SegmentReader.PER_LAYER}, reader=reader)
    if share.keeps_saturated.shape != (model.n_layers,) or not 0 <= worker < model.n_workers:
        raise StorageError("worker share: bad worker or per-layer flags")
    try:
        check_inputs(share)  # reads the first segment: layer 0's input slots
    except (IndexError, TypeError) as exc:
        raise StorageError(f"worker share is malformed ({type(exc).__name__}: {exc})") from None
    inputs = sum(a.nbytes for a in (share.x_indptr, share.x_slots, share.x_data, share.active, share.saturated,
                                    share.keeps_saturated))
    reader.footprint = _recorded_footprint(model, worker, inputs, int(share.active.shape[0] + share.saturated.shape[0]))
    return share


def _recorded_footprint(model: PreparedModel, worker: int, inputs_bytes: int, n_images: int):
    """Worker ``worker``'s ``budget.Footprint`` from its model's recorded sizes (``worker_sizes``)
    and its run's inputs share (``inputs_bytes``: its arrays and the per-layer flags)."""
    from fsd_runtime import budget

    size = model.meta["worker_sizes"][worker]
    sources = int(size["sources"]) + (1 if worker != 0 else model.n_workers - 1)
    return budget.Footprint(
        worker=worker, share_bytes=int(size["share_bytes"]) + inputs_bytes,
        in_rows=int(size["most_in"]) + budget.status_rows(worker, model.n_workers),
        out_rows=int(size["most_out"]) + 2, last_rows=int(size["last_rows"]), n_images=n_images,
        map_bytes=8 * (model.n_neurons + 2) * min(sources, model.n_workers))


def footprints(model: "PreparedModel", indptr: np.ndarray, indices: np.ndarray,
               in0: list[np.ndarray] | None = None) -> list | None:
    """Every worker's ``budget.Footprint`` for a run of the images (CSR ``indptr``, ``indices``):
    the network part from the model's metadata, the inputs part counted exactly (the images'
    nonzeros in the worker's layer-0 input rows, as ``inputs_share`` keeps them; ``in0``: those rows,
    if the caller has read them already); None for a model prepared without the sizes."""
    sizes = model.meta.get("worker_sizes")
    if not isinstance(sizes, list) or len(sizes) != model.n_workers:
        return None
    n_rows = int(indptr.shape[0]) - 1
    n_images = int(np.count_nonzero(np.diff(indptr)))  # active + saturated: empty images are neither
    per_neuron = np.bincount(np.asarray(indices, np.int64), minlength=model.n_neurons)
    in0 = layer0_inputs(model) if in0 is None else in0
    # x_slots (int32) and x_data (float32) per kept nonzero, x_indptr, the images' status, and
    # the per-layer saturation flags (bool)
    fixed = 8 * (n_rows + 1) + 8 * n_images + len(model.meta["keeps_saturated"])
    return [_recorded_footprint(model, w, fixed + 8 * int(per_neuron[in0[w]].sum()), n_images)
            for w in range(model.n_workers)]


def load_share(storage: Storage, event) -> WorkerShare:
    """The share of the worker of ``event`` (a WorkerEvent): whole from the run's store, or, with
    ``event.model``, its run's inputs share and its segments of the prepared model."""
    key = ev.share_key(event.prefix, event.worker_id)
    if event.model is None:
        with storage.open(key) as stored:  # parsed as read: not held beside its arrays
            return WorkerShare.from_bytes(stored)
    data = storage.get(key)
    location = event.model
    config = location.get("storage")
    model_storage = storage if config is None or config == storage.config() else make_storage(config)
    try:
        model = open_model(model_storage, location.get("prefix", ""))
    except PreparedError as exc:
        raise ModelFileError(str(exc)) from None
    return open_worker_share(model, data, event.worker_id)


def worker_reads(model: PreparedModel) -> int:
    """The store reads each worker's :func:`load_share` makes of ``model`` (besides its inputs
    share): ``open_model``'s HEAD and GET of model.json, one GET a segment. S3 bills a HEAD as a
    GET, so a priced run counts them all as GETs."""
    return 2 + len(model.meta["segments"])


def worker_bytes(model: PreparedModel) -> list[int] | None:
    """Each worker's bytes of its segments, what its run downloads besides its inputs share: the
    objects' sizes as prepared, or for a model prepared before they were recorded, its plans'
    array bytes (a little less: no archive headers); None for a model without sizes."""
    sizes = model.meta.get("worker_sizes")
    if not isinstance(sizes, list) or len(sizes) != model.n_workers:
        return None
    return [int(size.get("stored_bytes", size["share_bytes"])) for size in sizes]


# --- a prepared model on a shared store, uploaded once ---

def model_digest(meta: dict) -> str:
    """A name for a prepared model's content (its metadata but the timings and sizes)."""
    core = {k: v for k, v in meta.items() if k not in ("timings", "bytes")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:32]


def publish(model: PreparedModel, storage: Storage, progress=None) -> tuple[PreparedModel, bool]:
    """``model`` on ``storage`` under ``models/{digest}``: uploaded unless a complete copy is
    there already (then reused). Returns (the model there, whether it was uploaded now)."""
    say = progress or (lambda message: None)
    target = PreparedModel(storage, f"{MODELS_PREFIX}/{model_digest(model.meta)}", model.meta)
    if storage.exists(target.key(MODEL_KEY)):
        try:
            there = open_model(storage, target.prefix)
            if model_digest(there.meta) == model_digest(model.meta):
                say(f"reusing the prepared model at {target.prefix}")
                return there, False
        except (PreparedError, StorageError):
            pass  # a broken copy: upload over it
    digests = {LAYER0_KEY: model.meta["layer0_sha256"]}
    digests.update((segment_key(w, s), digest) for w, worker in enumerate(model.meta["segment_sha256"])
                   for s, digest in enumerate(worker))
    say(f"uploading the prepared model ({len(digests) + 1} objects) to {target.prefix}")
    for key, digest in digests.items():  # checked as copied: a damaged file is not uploaded for runs to reuse
        data = model.storage.get(model.key(key))
        if sha256_hex(data) != digest:
            raise _meta_error(model.where(), f"{key} does not match its sha256 in model.json: it was changed or "
                                             "corrupted after prepare; prepare the model again")
        storage.put(target.key(key), data)
    storage.put(target.key(MODEL_KEY), model.storage.get(model.key(MODEL_KEY)))  # last: complete
    return open_model(storage, target.prefix), True
