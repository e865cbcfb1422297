"""The channel-agnostic worker: one worker's share of every layer, for every batch of images.

``run_from_event(event)`` is the whole life of a worker and what every
entry point calls (``python -m fsd_runtime.worker`` with the event JSON on
stdin, the thread launcher, the Lambda handler): parse the event, start
the tree children, load the share from storage, build the channel and a
:class:`WorkerLoop` (its buffers allocated at start-up), run it, write the
result and metrics; on failure write an error record naming worker and
layer, then re-raise.

This module imports numpy, the compiled kernels and the codec only: never
numba, scipy or boto3 (those live behind the kinds the configs name).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fsd_runtime import events as ev
from fsd_runtime import liveness
from fsd_runtime.channels import Channel, ChannelError, make_channel
from fsd_runtime.launch import LaunchError, Launcher, ProcessLauncher, launch_children, make_launcher
from fsd_runtime.metrics import LayerMetrics
from fsd_runtime.plan import WorkerShare
from fsd_runtime.prepared import ModelFileError, load_share
from fsd_runtime.storage import Storage, StorageError, make_storage, pack_arrays


#: Status rows (neuron ids N + ZERO_FLAG, N + YMAX_FLAG, value 1.0): a worker's message *up* to
#: the root marks the images whose rows this worker owns are all zero / all ymax; the root's
#: message *down* marks the images whose rows are all zero / all ymax on every worker.
ZERO_FLAG = 0
YMAX_FLAG = 1
#: The worker that combines every worker's status and sends the verdict down (see ``WorkerLoop``).
ROOT = 0
#: Send plans built at start-up; those of later layers are built when first used.
EAGER_PLAN_LAYERS = 32
_EMPTY = np.zeros(0, np.int64)


def status_up(layer: int, n_layers: int) -> bool:
    """Whether, at step ``layer`` (the rows for ``layer``, sent after computing ``layer - 1``),
    every worker but the root sends the root its status of ``layer - 1``'s outputs. That status
    is applied before ``layer + 1``, so only while ``layer + 1`` exists."""
    return 1 <= layer <= n_layers - 2


def status_down(layer: int, n_layers: int) -> bool:
    """Whether, at step ``layer``, the root sends every worker the global status of ``layer - 2``'s
    outputs (combined from the statuses that came up at step ``layer - 1``)."""
    return 2 <= layer <= n_layers - 1


def message_peers(share: "WorkerShare", layer: int) -> tuple[list[int], list[int]]:
    """(targets, sources) of worker ``share.worker``'s messages at step ``layer`` >= 1: the peers
    whose rows it needs or who need its rows (the plan), plus the status exchange with the root.
    Sender and receiver derive the same pairs from the same plan, so nobody waits for a message
    that never comes (a message is sent, possibly without nonzeros, whenever images are active)."""
    me, P, L = share.worker, share.n_workers, share.n_layers
    targets = {t for t in range(P) if t != me and share.send_pos[layer][t].shape[0]}
    sources = {s for s in range(P) if s != me and share.recv_slots[layer][s].shape[0]}
    if me != ROOT:
        if status_up(layer, L):
            targets.add(ROOT)
        if status_down(layer, L):
            sources.add(ROOT)
    else:
        others = set(range(P)) - {ROOT}
        if status_up(layer, L):
            sources |= others
        if status_down(layer, L):
            targets |= others
    return sorted(targets), sorted(sources)


#: The codec's run id field holds 16 bytes; run ids may be longer, so it carries a digest.
WIRE_RUN_ID_BYTES = 16


def wire_run_id(run_id: str) -> bytes:
    """The codec's run id field for a run id."""
    return hashlib.blake2b(run_id.encode(), digest_size=WIRE_RUN_ID_BYTES).digest()


class WorkerError(RuntimeError):
    """A worker failed at a known layer (a peer's message never came, or came malformed)."""

    def __init__(self, worker: int, layer: int, message: str):
        super().__init__(f"worker {worker}, layer {layer}: {message}")
        self.worker = worker
        self.layer = layer


@dataclass
class WorkerResult:
    """One worker's final activations: its output rows of the last layer over ``active`` images,
    plus ``saturated`` images whose every final activation is ymax (not materialised)."""

    worker: int
    neurons: np.ndarray     # int32 global ids of the last layer's outputs this worker owns
    active: np.ndarray      # int64 image ids, one per column of ``rows``
    rows: np.ndarray        # float32 [len(neurons), len(active)]
    saturated: np.ndarray   # int64 image ids
    metrics: dict

    def to_bytes(self) -> bytes:
        return pack_arrays({"worker": np.int64(self.worker), "neurons": self.neurons,
                            "active": self.active, "rows": self.rows, "saturated": self.saturated})


#: The two buffers of a batch (see ``_Batch.buffer``).
INPUTS, OUTPUTS = 0, 1


class _Buffer:
    """A float32 buffer allocated once at its largest size, handed out as C-contiguous
    ``[rows, columns]`` views (a fresh 20 MB array a step cost more in page faults than the
    layer's arithmetic). Views are prefixes of it: pages beyond what the run's views reach are
    never touched."""

    def __init__(self, size: int):
        self.size = size          # elements allocated when first used
        self.flat = None
        self.zero_prefix = 0      # leading elements untouched since ``prefault`` zeroed them

    def view(self, rows: int, columns: int) -> np.ndarray:
        size = rows * columns
        if self.flat is None or self.flat.shape[0] < size:
            self.flat = np.empty(max(size, self.size), np.float32)
        self.zero_prefix = 0
        return self.flat[:size].reshape(rows, columns)

    def zeros(self, rows: int, columns: int) -> np.ndarray:
        """:meth:`view` filled with zeros (free the first time if ``prefault`` zeroed that much)."""
        before, zeroed = self.flat, self.zero_prefix
        block = self.view(rows, columns)
        if rows * columns > zeroed or self.flat is not before:  # used, or grown (np.empty)
            block.fill(0.0)
        return block

    def prefault(self, elements: int) -> None:
        """Allocate the buffer and touch its first ``elements`` now (start-up), not at the first
        layer (run time): what the first layer's views take. Later layers that need more touch
        it then; their views are usually narrower (images die or park), so pages the first layer
        does not need are often never touched at all."""
        elements = min(elements, self.size)
        if self.flat is None or self.zero_prefix < elements:
            self.view(1, 1)
            self.flat[:elements].fill(0.0)
            self.zero_prefix = elements


class _Batch:
    """One batch's state, the same on every worker: live unsaturated image columns, parked images."""

    def __init__(self, active: np.ndarray, parked: np.ndarray, buffer_rows: int,
                 inputs: _Buffer | None = None):
        self.active = active      # int64 image ids, one per column of ``own``
        self.parked = parked      # int64 image ids whose activations are all ymax (not materialised)
        self.own = None           # float32 [my outputs of the last layer computed, len(active)]
        self.flags = None         # (all-my-rows-zero, all-my-rows-ymax) per active image
        self.verdict = None       # root only: (dead, saturated) image ids, to send down next step
        width = active.shape[0] + parked.shape[0]
        self.top = np.zeros(width, np.float32)   # per column: largest output of the last layer
        self.gap = np.zeros(width, np.float32)   # and largest distance below ymax (see dense_layer_tracked)
        # The input buffer is only used within one step, so the batches share one (the loop's);
        # the outputs of a batch live from its step of one layer to its step of the next.
        self._buffers = [inputs or _Buffer(buffer_rows * width), _Buffer(buffer_rows * width)]

    def buffer(self, which: int, rows: int, columns: int) -> np.ndarray:
        """A C-contiguous ``[rows, columns]`` float32 view of buffer ``which`` (``INPUTS``, shared
        by the batches, or this batch's ``OUTPUTS``): a layer's input block is assembled in one,
        its outputs go to the other, over the previous outputs, which the input block has copied
        by then."""
        return self._buffers[which].view(rows, columns)

    def zeros(self, which: int, rows: int, columns: int) -> np.ndarray:
        """:meth:`buffer` filled with zeros (free where ``prefault`` zeroed it and nothing used it since)."""
        return self._buffers[which].zeros(rows, columns)

    def prefault(self, in_rows: int, out_rows: int) -> None:
        """Allocate both buffers and touch what the first layer's blocks take: ``in_rows`` and
        ``out_rows`` rows of this batch's columns (see :meth:`_Buffer.prefault`)."""
        width = self.active.shape[0] + self.parked.shape[0]
        self._buffers[INPUTS].prefault(in_rows * width)
        self._buffers[OUTPUTS].prefault(out_rows * width)

    def release(self) -> None:
        """Drop this batch's output buffer (its outputs are copied into the result)."""
        self.own = None
        self._buffers[OUTPUTS] = _Buffer(0)


def split_batches(active: np.ndarray, saturated: np.ndarray, size: int | None):
    """The batches, the same on every worker: the images (active and saturated, by id) in runs of
    ``size`` (None: one batch); each batch's (active, parked) ids."""
    images = np.union1d(active, saturated)
    size = size or max(images.shape[0], 1)
    out = []
    for start in range(0, max(images.shape[0], 1), size):
        chunk = images[start:start + size]
        out.append((active[np.isin(active, chunk)], saturated[np.isin(saturated, chunk)]))
    return out


class WorkerLoop:
    """One worker's layers over its batches; module notes: ``docs/runtime.md`` ("worker loop").

    Per layer and batch: receive the input rows this worker lacks from the
    peers that hold them, drop images that are globally dead and park the
    globally saturated ones (what ``infer_block`` does, one layer later, so
    an image stops costing traffic and compute once its fate is known),
    compute the owned outputs with ``dense_layer`` on the assembled block,
    and immediately send the next layer's rows for this batch so they
    travel while the other batches compute.

    The per-image status goes through the root (``ROOT``), not all-to-all:
    at step l every other worker sends the root its status of layer l-1's
    outputs (on its data message to the root, or alone); the root combines
    them and sends the verdict down at step l+1 (on its data messages, or
    alone); every worker applies it before layer l+1. Applying it a layer
    late gives the same bits: a dead image's next outputs are +0 again, and
    an image saturated after l-1 is parked before l+1 only if layer l keeps
    saturation (its outputs of layer l are then all ymax, exactly what
    parking stands for). Every worker applies the same verdict at the same
    layer, so image columns agree everywhere. Messages per step:
    ``docs/runtime.md`` ("Messages per round").
    """

    def __init__(self, share: WorkerShare, channel: Channel, *, run_id: str, receive_timeout: float,
                 batch_size: int | None = None, run_timeout: float | None = None,
                 startup_grace: float | None = None, park_saturated: bool = True):
        # Imported here, not at module level: a worker starts its tree children before it pays
        # for loading the compiled kernels.
        from fsd_kernels import codec
        from fsd_kernels._backend import kernels

        self.codec, self.kernels = codec, kernels
        self.share = share
        self.channel = channel
        self.me = share.worker
        self.n_peers = share.n_workers
        self.receive_timeout = receive_timeout
        self.run_deadline = time.monotonic() + (run_timeout or float("inf"))
        self.wire_run_id = wire_run_id(run_id)
        self.metrics = LayerMetrics(share.worker, share.n_layers, share.n_workers)
        self.tracker = codec.ChunkTracker()
        self.pending: dict[tuple[int, int], list[bytes]] = {}
        self.slot_maps: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
        from fsd_runtime import budget

        self.footprint = budget.footprint(share)
        self.status_rows = budget.status_rows(self.me, self.n_peers)  # root: everyone's; others: the verdict
        # One input buffer for all batches (rows: most input slots + status rows; layer 0's
        # block and a block with parked images back fit too), an output buffer per batch.
        fp = self.footprint
        self.park_saturated = park_saturated
        if park_saturated:
            parts = split_batches(share.active, share.saturated, batch_size)
        else:  # saturated inputs are computed like any other image
            parts = split_batches(np.union1d(share.active, share.saturated), _EMPTY, batch_size)
        widest = max(a.shape[0] + p.shape[0] for a, p in parts)
        self.inputs = _Buffer(fp.in_rows * widest)
        self.batches = [_Batch(a, p, fp.out_rows, self.inputs) for a, p in parts]
        self.batch_size = widest
        first_in = share.in_neurons[0].shape[0] if share.n_layers else 0
        first_out = share.out_neurons[0].shape[0] + 2 if share.n_layers else 0  # + status rows
        for state in self.batches:
            state.prefault(first_in, first_out)
        self._peers: dict[int, tuple[list[int], list[int]]] = {}
        # Send plans of the first layers are built now (start-up); later ones when first needed:
        # runs usually end early (all images dead or parked: ~20 rounds of 120 on the challenge
        # nets), and at P = 84 building all 120 was most of a worker's start-up CPU. A share read
        # by segments: the first segment's layers only (the rest is read when the run gets there).
        eager = min(share.n_layers, EAGER_PLAN_LAYERS + 1)
        if share.reader is not None and len(share.reader.firsts) > 1:
            eager = min(eager, share.reader.firsts[1])
        self.send_plans = {layer: _send_plan(share, layer, self.peers(layer)[0]) for layer in range(1, eager)}
        #: Called with each layer as it starts (a local worker process's beacon).
        self.on_layer = None
        #: Until the first message from every peer, peers may still be starting, so that wait is
        #: not bounded by the receive timeout alone: by ``startup_grace`` seconds more, or, where
        #: the coordinator watches every worker process (``startup_grace`` None: a dead peer is its
        #: to report within a second), by the run's deadline.
        self.startup_grace = startup_grace
        self.started_up = False

    def peers(self, layer: int) -> tuple[list[int], list[int]]:
        """(targets, sources) of this worker's messages at step ``layer`` (``message_peers``, kept)."""
        found = self._peers.get(layer)
        if found is None:
            found = self._peers[layer] = message_peers(self.share, layer)
        return found

    def step(self, layer: int, batch: int) -> int:
        return layer * len(self.batches) + batch

    def run(self) -> WorkerResult:
        for layer in range(self.share.n_layers):
            if self.on_layer is not None:
                self.on_layer(layer)
            for b, state in enumerate(self.batches):
                self._layer(layer, b, state)
        last = self.share.n_layers - 1
        self.inputs.flat = None  # the run is over: the result is assembled batch by batch
        n_rows = self.share.out_neurons[last].shape[0]
        active = np.concatenate([s.active for s in self.batches])
        rows = np.empty((n_rows, active.shape[0]), np.float32)
        at = 0
        for state in self.batches:
            n = state.active.shape[0]
            if n:
                rows[:, at:at + n] = state.own[:n_rows]
            at += n
            state.release()
        metrics = self.metrics.to_dict()
        metrics["batches"] = len(self.batches)
        metrics["batch_size"] = self.batch_size
        return WorkerResult(worker=self.me, neurons=self.share.out_neurons[last], active=active, rows=rows,
                            saturated=np.concatenate([s.parked for s in self.batches]), metrics=metrics)

    def _layer(self, layer: int, b: int, state: _Batch) -> None:
        share = self.share
        if not state.active.size and (not state.parked.size or share.keeps_saturated[layer]):
            # nothing to compute, send or receive (as on every worker: they share the verdicts);
            # parked images stay parked: this layer's weights and plans are not even read
            state.verdict = None
            self.metrics.add(layer, "images_active", 0)
            return
        n_slots = share.in_neurons[layer].shape[0]
        if layer == 0:
            block = self._input_block(state)
            columns = np.arange(state.active.shape[0])
        elif state.active.size:
            block = self._receive(layer, b, state)
            columns = self._drop_finished(block, n_slots, state, layer)
        else:
            block, columns = np.zeros((n_slots, 0), np.float32), _EMPTY
            state.verdict = None  # nothing was active: no status came up
        if state.parked.size and not share.keeps_saturated[layer]:
            # parked images come back as explicit all-ymax columns after the live ones
            # (C order: the kernel takes C-contiguous blocks only)
            merged = np.empty((n_slots, columns.shape[0] + state.parked.shape[0]), np.float32)
            merged[:, :columns.shape[0]] = block[:n_slots][:, columns]
            merged[:, columns.shape[0]:] = share.ymax
            block, columns = merged, np.arange(merged.shape[1])
            state.active = np.concatenate([state.active, state.parked])
            state.parked = _EMPTY
        n = state.active.shape[0]
        self.metrics.add(layer, "images_active", n)
        out = state.buffer(OUTPUTS, share.out_neurons[layer].shape[0] + 2, n)  # + status rows
        if n:
            start, cpu = time.perf_counter(), time.thread_time()
            bad = self.kernels.dense_layer_columns(block[:n_slots], columns, share.colptr[layer],
                                                   share.rowidx[layer], share.vals[layer], share.bias[layer],
                                                   share.ymax, out, state.top, state.gap)
            if bad >= 0:
                raise WorkerError(self.me, layer, f"image {int(state.active[bad])} (0-based): a sum of Y W "
                                                  "overflowed float32 to inf/NaN; the network's weights or "
                                                  "inputs are too large for float32")
            self.metrics.add(layer, "compute_s", time.perf_counter() - start)
            self.metrics.add(layer, "compute_cpu_s", time.thread_time() - cpu)
        state.own = out
        if layer + 1 < share.n_layers and n:
            self._send(layer + 1, b, state)

    def _input_block(self, state: _Batch) -> np.ndarray:
        """Layer 0's input rows (the slots this worker needs) for the batch's images, from the share."""
        s, images = self.share, state.active
        block = state.zeros(INPUTS, s.in_neurons[0].shape[0], images.shape[0])
        if not images.shape[0]:
            return block
        starts, lengths = s.x_indptr[images], s.x_indptr[images + 1] - s.x_indptr[images]
        lo, hi = s.x_indptr[images[0]], s.x_indptr[images[-1] + 1]
        if lengths.sum() == hi - lo:
            # The (ascending) images hold every entry of their range (the others are empty,
            # the usual case): one slice, no gather.
            slots, values = s.x_slots[lo:hi], s.x_data[lo:hi]
        else:
            gather = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            slots, values = s.x_slots[gather], s.x_data[gather]
        columns = np.repeat(np.arange(images.shape[0], dtype=np.int32), lengths)
        self.kernels.coo_to_block(slots, columns, values, block)
        return block

    def _send(self, layer: int, b: int, state: _Batch) -> None:
        """Send each peer that needs rows at ``layer`` those rows, and the status exchange.

        ``state.own`` has two extra rows after the outputs, encoded like any row as neurons N and
        N+1: on a worker but the root, its status (1.0 where all its rows of an image are zero /
        ymax); on the root, the verdict it sends down (see the class notes).
        """
        own = state.own
        start, cpu = time.perf_counter(), time.thread_time()
        n_out, n = own.shape[0] - 2, own.shape[1]
        # outputs lie in [0, ymax]: a column is all zero iff its top is 0, all ymax iff its gap is 0
        zero = state.top[:n] == 0.0
        full = state.gap[:n] == 0.0
        state.flags = (zero, full)
        if self.me == ROOT:
            dead, saturated = state.verdict if state.verdict is not None else (_EMPTY, _EMPTY)
            zero, full = np.isin(state.active, dead), np.isin(state.active, saturated)
        own[n_out + ZERO_FLAG] = zero
        own[n_out + YMAX_FLAG] = full
        status_nnz = int(np.count_nonzero(zero)) + int(np.count_nonzero(full))
        plan = self.send_plans.get(layer)
        if plan is None:
            plan = self.send_plans[layer] = _send_plan(self.share, layer, self.peers(layer)[0])
        union, peers = plan
        extracted = self.codec.DenseRows(own, union, n)  # each row once, however many peers need it
        outgoing = []
        sent = np.empty((len(peers), 4), np.int64)  # per peer: rows, nnz, bytes, chunks
        status_only = 0
        for i, (target, subset, status) in enumerate(peers):
            chunks = extracted.encode_subset(subset, layer=layer, source=self.me, target=target, batch=b,
                                             run_id=self.wire_run_id, max_bytes=self.channel.max_chunk_bytes)
            n_rows = subset.positions.shape[0] - 2 * status
            sent[i] = (n_rows, sum(map(self.codec.chunk_nnz, chunks)) - status_nnz * status,
                       sum(map(len, chunks)), len(chunks))
            status_only += n_rows == 0
            outgoing += [(target, c) for c in chunks]
        self.metrics.add_sent(layer, [t for t, _, _ in peers], sent)
        self.metrics.add(layer, "status_only_sent", status_only)
        self.metrics.add(layer, "encode_s", time.perf_counter() - start)
        self.metrics.add(layer, "encode_cpu_s", time.thread_time() - cpu)
        self.metrics.log_chunks(self.step(layer, b), outgoing)
        try:
            self.channel.send(self.step(layer, b), outgoing)
        except ChannelError as exc:
            raise WorkerError(self.me, layer, f"batch {b}: send failed: {exc}") from exc

    def _slot_map(self, layer: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Per source: neuron id -> block row (-1: that source must not send it; None: a peer that
        sends nothing at this step); status rows last
        (on the root: two per worker, its own first; elsewhere: the root's verdict). Also the
        block rows peers write (received and status rows), which start as zeros."""
        cached = self.slot_maps.get(layer)
        if cached is None:
            s = self.share
            n_slots = s.in_neurons[layer].shape[0]
            maps = []
            sources = set(self.peers(layer)[1])
            for source in range(self.n_peers):
                if source not in sources:  # sends nothing at this step: no map (they grow with P x N)
                    maps.append(None)
                    continue
                m = np.full(s.n_neurons + 2, -1, np.int64)
                slots = s.recv_slots[layer][source]
                m[s.in_neurons[layer][slots]] = slots
                if self.me == ROOT or source == ROOT:
                    at = n_slots + (2 * source if self.me == ROOT else 0)
                    m[s.n_neurons + ZERO_FLAG] = at + ZERO_FLAG
                    m[s.n_neurons + YMAX_FLAG] = at + YMAX_FLAG
                maps.append(m)
            received = np.ones(n_slots + self.status_rows, np.bool_)
            received[s.local_slots[layer]] = False
            if self.me == ROOT:
                received[n_slots + 2 * ROOT:n_slots + 2 * ROOT + 2] = False  # written from its own flags
            cached = maps, np.flatnonzero(received)
            self.slot_maps = {layer: cached}
        return cached

    def _receive(self, layer: int, b: int, state: _Batch) -> np.ndarray:
        """The input block of ``layer``: own rows, every peer's rows and status rows."""
        s = self.share
        n_slots, n = s.in_neurons[layer].shape[0], state.active.shape[0]
        block = state.buffer(INPUTS, n_slots + self.status_rows, n)
        maps, received_rows = self._slot_map(layer)
        self.kernels.zero_rows(block, received_rows, n)  # decoding writes only the nonzeros
        self.kernels.copy_rows(state.own, s.local_pos[layer], block, s.local_slots[layer], n)
        if self.me == ROOT:
            zero, full = state.flags
            block[n_slots + 2 * ROOT + ZERO_FLAG] = zero
            block[n_slots + 2 * ROOT + YMAX_FLAG] = full
        missing = set(self.peers(layer)[1])
        step = self.step(layer, b)
        backlog = self.pending.pop((layer, b), [])
        if self.started_up:
            deadline = min(time.monotonic() + self.receive_timeout, self.run_deadline)
        elif self.startup_grace is not None:
            deadline = min(time.monotonic() + self.receive_timeout + self.startup_grace, self.run_deadline)
        else:
            deadline = self.run_deadline
        tally = dict.fromkeys(("chunks_received", "bytes_received", "nnz_received", "duplicates",
                               "messages_received", "rows_received", "wait_s", "decode_s", "decode_cpu_s"), 0)
        while missing:
            chunks, backlog = backlog, []
            if not chunks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = "the run's time is up" if deadline == self.run_deadline \
                        else f"within {self.receive_timeout} s" if self.started_up \
                        else f"within {self.receive_timeout} s + {self.startup_grace:g} s for start-up"
                    raise WorkerError(self.me, layer, f"batch {b}: no complete message from worker(s) "
                                                      f"{sorted(missing)} ({why})")
                start = time.perf_counter()
                try:
                    self.channel.expect(step, missing)
                    chunks = self.channel.receive(step, min(remaining, 60.0))  # the deadline may be inf
                except ChannelError as exc:
                    raise WorkerError(self.me, layer, f"batch {b}: receive failed: {exc}") from exc
                tally["wait_s"] += time.perf_counter() - start
            start, cpu = time.perf_counter(), time.thread_time()
            for chunk in chunks:
                source = self._route(chunk, layer, b, block, maps, tally)
                if source is not None:
                    missing.discard(source)
                    tally["messages_received"] += 1
                    tally["rows_received"] += s.recv_slots[layer][source].shape[0]
            tally["decode_s"] += time.perf_counter() - start
            tally["decode_cpu_s"] += time.thread_time() - cpu
        self.started_up = True
        for field, value in tally.items():
            self.metrics.add(layer, field, value)
        return block

    def _route(self, chunk: bytes, layer: int, b: int, block: np.ndarray, maps, tally: dict) -> int | None:
        """Decode a chunk of the current step into ``block``, hold an early one, drop a duplicate or
        another run's (counted in ``tally``). Returns the source whose message this chunk completed,
        else None."""
        try:
            h = self.codec.decode_header(chunk, max_bytes=self.channel.max_chunk_bytes)
        except self.codec.CodecError as exc:
            raise WorkerError(self.me, layer, f"batch {b}: malformed chunk: {exc}") from exc
        if h.run_id != self.wire_run_id:
            tally["duplicates"] += 1
            return None
        if (h.target != self.me or not 0 <= h.source < self.n_peers or h.source == self.me
                or not 1 <= h.layer < self.share.n_layers or h.batch >= len(self.batches)):
            raise WorkerError(self.me, layer, f"batch {b}: chunk from worker {h.source} for worker "
                                              f"{h.target}, layer {h.layer}, batch {h.batch} is misaddressed")
        here, theirs = self.step(layer, b), self.step(h.layer, h.batch)
        if theirs == here and maps[h.source] is None:
            raise WorkerError(self.me, layer, f"batch {b}: worker {h.source} sent a chunk, but nothing is "
                                              "expected from it at this step")
        if theirs > here:
            self.pending.setdefault((h.layer, h.batch), []).append(chunk)
            return None
        if theirs < here or not self.tracker.accept(h):
            tally["duplicates"] += 1
            return None
        if h.n_images != block.shape[1]:
            raise WorkerError(self.me, layer, f"batch {b}: worker {h.source} sent {h.n_images} image "
                                              f"columns, {block.shape[1]} are active")
        try:
            self.codec.decode_into(chunk, block, maps[h.source], header=h)
        except self.codec.CodecError as exc:
            raise WorkerError(self.me, layer, f"batch {b}: bad chunk from worker {h.source}: {exc}") from exc
        tally["chunks_received"] += 1
        tally["bytes_received"] += len(chunk)
        tally["nnz_received"] += h.nnz
        return h.source if self.tracker.complete(h.key) else None

    def _drop_finished(self, block: np.ndarray, n_slots: int, state: _Batch, layer: int) -> np.ndarray:
        """Drop the images the verdict of step ``layer`` finds dead after ``layer - 2`` and park
        those it finds saturated then, if ``layer - 1`` keeps saturation (every worker decides
        alike, from the same verdict; see the class notes). On the root, first combine every
        worker's status of ``layer - 1`` into the next verdict. Returns the block columns of the
        images left."""
        s, n = self.share, state.active.shape[0]
        if self.me == ROOT:
            verdict = state.own[-2:, :n]  # what it sent down at this step
            if status_up(layer, s.n_layers):
                status = block[n_slots:n_slots + self.status_rows]
                dead = np.all(status[ZERO_FLAG::2] == 1.0, axis=0)
                saturated = np.all(status[YMAX_FLAG::2] == 1.0, axis=0) & ~dead
                state.verdict = (state.active[dead], state.active[saturated])
            else:
                state.verdict = None
        else:
            verdict = block[n_slots:n_slots + 2]
        if not status_down(layer, s.n_layers):
            return np.arange(n)
        dead = verdict[ZERO_FLAG] == 1.0
        saturated = (verdict[YMAX_FLAG] == 1.0) & ~dead
        if not s.keeps_saturated[layer - 1] or not self.park_saturated:
            saturated[:] = False  # saturated after layer - 2, but layer - 1 may have changed that
        keep = ~(dead | saturated)
        if keep.all():
            return np.arange(keep.shape[0])
        state.parked = np.concatenate([state.parked, state.active[saturated]])
        state.active = state.active[keep]
        return np.flatnonzero(keep)


def _send_plan(share: WorkerShare, layer: int, targets: list[int]):
    """What a worker sends at ``layer`` (>= 1): the rows of its previous outputs to extract (one
    per group of twins, ascending, then the two status rows), and per target (``message_peers``)
    ``(target, codec.Subset, carries_status)``: each row it gets as the extracted row of its
    group (its rows, then the status rows if the message carries them, as their neuron ids).
    Computed once, at start-up.

    Twins are outputs with the same weight column and bias: the layer kernel computes them with
    the same float operations on the same inputs, so their rows are equal, bit for bit (the
    official nets have 32-64 distinct columns a layer). A row is extracted once for all its twins;
    each message still carries every row (a twin after the first is a copy record), byte for
    byte what extracting every row gives."""
    from fsd_kernels import codec

    n_out = share.out_neurons[layer - 1].shape[0]
    peers = targets
    wanted = np.zeros(n_out + 2, np.bool_)
    for t in peers:
        wanted[share.send_pos[layer][t]] = True
    wanted[n_out + ZERO_FLAG] = wanted[n_out + YMAX_FLAG] = True
    union = np.flatnonzero(wanted)
    twin_of = _first_twins(share, layer - 1, union[:-2])  # the status rows have no twins
    extracted = np.flatnonzero(twin_of == np.arange(union.shape[0] - 2))
    where = np.full(n_out + 2, -1, np.int64)  # row -> position of its group's row among ``extracted``
    where[union[extracted]] = np.arange(extracted.shape[0])
    where[union[:-2]] = where[union[twin_of]]
    where[n_out + ZERO_FLAG], where[n_out + YMAX_FLAG] = extracted.shape[0], extracted.shape[0] + 1
    status_rows = np.array([n_out + ZERO_FLAG, n_out + YMAX_FLAG], np.int64)
    status_neurons = np.array([share.n_neurons + ZERO_FLAG, share.n_neurons + YMAX_FLAG], np.int32)
    L = share.n_layers
    statuses, positions, neurons_of = [], [], []
    for t in peers:
        status = status_down(layer, L) if share.worker == ROOT else (t == ROOT and status_up(layer, L))
        rows, neurons = share.send_pos[layer][t], share.out_neurons[layer - 1][share.send_pos[layer][t]]
        if status:
            rows, neurons = np.concatenate([rows, status_rows]), np.concatenate([neurons, status_neurons])
        statuses.append(bool(status))
        positions.append(where[rows])
        neurons_of.append(neurons)
    subsets = list(zip(peers, codec.Subset.many(positions, neurons_of), statuses))
    return np.concatenate([union[extracted], status_rows]), subsets


def _first_twins(share: WorkerShare, layer: int, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows`` (outputs of ``layer``): the index in ``rows`` of the first one with
    the same weight column (input slots and weights) and bias."""
    colptr, rowidx, vals, bias = share.colptr[layer], share.rowidx[layer], share.vals[layer], share.bias[layer]
    first: dict[tuple, int] = {}
    return np.array([first.setdefault((rowidx[colptr[r]:colptr[r + 1]].tobytes(),
                                       vals[colptr[r]:colptr[r + 1]].tobytes(), bias[r].tobytes()), i)
                     for i, r in enumerate(rows.tolist())], np.int64)


#: Start-up allowance per level of the launch tree, for peers nobody watches (Lambda, threads):
#: an Invoke, a cold start with the layer and the share download, with room for a loaded machine.
STARTUP_SECONDS_PER_LEVEL = 5.0


def startup_grace(event: ev.WorkerEvent) -> float:
    """How much longer than the receive timeout a worker waits for its peers' first messages
    when no coordinator watches the worker processes: a peer that never started (an
    out-of-memory kill on Lambda) fails the run after this, not at the run timeout."""
    from fsd_runtime.launch import tree_depth

    return STARTUP_SECONDS_PER_LEVEL * max(1, tree_depth(event.n_workers, event.fanout))


def peak_rss_kb() -> int | None:
    """This process's peak resident set (VmHWM of /proc/self/status, kB; None where there is no
    /proc). Unlike ``ru_maxrss``, a fresh exec'd worker does not inherit its parent's peak. With
    the thread launcher every worker reports the one shared process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _own_start_rss_kb() -> int | None:
    """VmRSS when this worker started: in a forked worker, the pages it shares with its parent
    (which its VmHWM counts too)."""
    from fsd_runtime import budget

    return budget.rss_kb()


def memory_metrics(start_rss_kb: int | None, loop: "WorkerLoop", budget_mb: float | None) -> dict:
    """A worker's memory, for its metrics:

    - ``peak_rss_kb``: VmHWM, the process's peak resident set (a forked worker's counts the pages
      it shares with its parent; a thread worker's is the whole process);
    - ``start_rss_kb``: VmRSS when the worker started, and ``peak_growth_kb`` = peak - start: what
      the worker itself added at its peak (for a forked worker, its own memory);
    - ``pss_kb`` / ``uss_kb`` at the end (smaps_rollup): shared pages split between sharers / private pages;
    - ``memory_estimate_kb``: ``budget.peak_bytes`` for its share and batches (without the
      process overhead) and ``memory_budget_mb``, the budget it was planned under (None: none).
    """
    from fsd_runtime import budget

    peak = peak_rss_kb()
    out = {"peak_rss_kb": peak, "start_rss_kb": start_rss_kb,
           "peak_growth_kb": peak - start_rss_kb if peak is not None and start_rss_kb is not None else None,
           "memory_estimate_kb": budget.peak_bytes(loop.footprint, loop.batch_size, overhead_mb=0) // 1024,
           "memory_budget_mb": budget_mb}
    out.update(budget.smaps_kb())
    return out


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads); thread launchers share one process, so
    there it counts every worker's time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_error(storage: Storage, event: ev.WorkerEvent, exc: BaseException) -> None:
    record = {"worker": event.worker_id, "layer": getattr(exc, "layer", None),
              "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20),
              "bad_model_file": isinstance(exc, ModelFileError)}  # the model's data, not the run: exit 2
    try:
        storage.put(ev.error_key(event.prefix, event.worker_id), json.dumps(record).encode())
    except StorageError:  # the run's store is gone: the run ended and nobody reads the record
        pass


def run_from_event(event: Any, storage: Storage | None = None, channel: Channel | None = None,
                   launcher: Launcher | None = None) -> WorkerResult | None:
    """The whole life of one worker, from its event (dict, JSON or WorkerEvent); None when
    another invocation of the same worker claimed the run first (a duplicate: it did nothing).

    ``storage``, ``channel`` and ``launcher`` default to what the event's
    configs name; adapters pass ready-made ones (e.g. a shared boto3 client).
    """
    started = time.time()
    start_rss = _own_start_rss_kb()
    event = ev.parse(event)
    beacon = liveness.start_worker(event.worker_id)  # local worker processes of a coordinator only
    storage = storage or make_storage(event.storage)
    try:
        # Before any fan-out: the run must exist (its share is there), and this must be the one
        # invocation of this worker (async invokes are at-least-once): a duplicate leaves, harmless.
        if not storage.exists(ev.share_key(event.prefix, event.worker_id)):
            raise StorageError(f"no stored object at {ev.share_key(event.prefix, event.worker_id)}: "
                               f"run {event.run_id} has no share for worker {event.worker_id}; "
                               "no children started")
        if not storage.create(ev.claim_key(event.prefix, event.worker_id), f"{started}".encode()):
            return None
        if event.launcher.get("kind") == "fork":  # children are forked from here: load the kernels first
            import fsd_kernels.codec  # noqa: F401
            from fsd_kernels._backend import kernels  # noqa: F401
        children = launcher or make_launcher(event.launcher)
        if isinstance(children, ProcessLauncher):
            children.stderr_for = liveness.open_worker_stderr  # not into this worker's own file
        launch_children(event, children)
        own_channel = channel is None
        # the channel first: peers that are ready sooner can reach this worker while it loads
        channel = channel or make_channel(event.channel, event.worker_id, event.n_workers, event.run_id)
        try:
            import fsd_kernels.codec  # noqa: F401  (load the kernels now: start-up, not run time)
            share = load_share(storage, event)  # whole (parsed as read), or its inputs and its model's segments
            if share.worker != event.worker_id or share.n_workers != event.n_workers:
                raise ev.EventError(f"share of worker {share.worker}/{share.n_workers} given to "
                                    f"worker {event.worker_id}/{event.n_workers}")
            loop = WorkerLoop(share, channel, run_id=event.run_id, receive_timeout=event.receive_timeout,
                              run_timeout=event.run_timeout - (time.time() - started),
                              batch_size=event.batch_size, park_saturated=event.park_saturated,
                              startup_grace=None if beacon is not None else startup_grace(event))
            if beacon is not None:
                loop.on_layer = beacon.layer
            gc.freeze()  # start-up's objects are for life: collections during the run skip them
            ready, cpu = time.time(), _cpu_seconds()
            result = loop.run()
            cpu = _cpu_seconds() - cpu
        finally:
            if own_channel:
                channel.close()
        result.metrics["times"] = {"started": started, "ready": ready, "finished": time.time(), "cpu_s": cpu}
        result.metrics.update(memory_metrics(start_rss, loop, event.worker_memory_mb))
        result.metrics["requests"] = channel.requests()
        if share.reader is not None:  # a prepared model's share read by segments: what it read
            result.metrics["model_reads"] = share.reader.reads()
        storage.put(ev.metrics_key(event.prefix, event.worker_id), json.dumps(result.metrics).encode())
        storage.put(ev.result_key(event.prefix, event.worker_id), result.to_bytes())
        return result
    except BaseException as exc:
        try:
            _write_error(storage, event, exc)
        except Exception as record_failure:  # the worker's own error is the one to report
            print(f"fsd_runtime.worker: could not record the error: {record_failure}", file=sys.stderr)
        raise


class ThreadLauncher(Launcher):
    """Workers as threads of this process (tests, debugging, custom channels registered in-process)."""

    def __init__(self, config: Mapping | None = None):
        self.config = dict(config or {"kind": "thread"})
        self._threads: list[threading.Thread] = []
        self._errors: dict[int, str] = {}

    def launch(self, events: Sequence[ev.WorkerEvent]) -> None:
        for event in events:
            def target(event=event):
                try:
                    run_from_event(event, launcher=self)
                except BaseException as exc:  # recorded for the coordinator; the worker wrote its error
                    self._errors[event.worker_id] = f"{type(exc).__name__}: {exc}"
            thread = threading.Thread(target=target, name=f"fsd-worker-{event.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def failures(self) -> dict[int, str]:
        return dict(self._errors)

    def close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=0.1)


class ForkLauncher(ProcessLauncher):
    """``fork``: the coordinator starts worker 0 as a process (like ``process``); every worker then
    forks its tree children from itself, after it has imported numpy and loaded the kernels
    (``worker.run_from_event`` does that first for this kind), so no child pays for them again:
    start-up stops growing with the number of workers on one machine. Forked children stay in
    worker 0's process group, which the coordinator kills at the end. POSIX only; a child runs
    ``run_from_event`` and leaves with ``os._exit`` (status 1 on failure), never returning into
    its parent's code."""

    def launch(self, events: Sequence[ev.WorkerEvent]) -> None:
        if self.own_group:  # the coordinator: a fresh process for worker 0
            return super().launch(events)
        for event in events:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                raise LaunchError(f"cannot fork worker {event.worker_id}: {exc}") from exc
            if pid == 0:  # pragma: no cover (the child; its coverage is the run's result)
                status = 1
                try:
                    run_from_event(event, launcher=ForkLauncher(self.config))
                    status = 0
                except BaseException as exc:  # the worker wrote its error record
                    print(f"fsd_runtime.worker: {type(exc).__name__}: {exc}", file=sys.stderr)
                finally:
                    liveness.before_exit()
                    os._exit(status)
            self._pids[event.worker_id] = pid

    def __init__(self, config: Mapping | None = None, *, own_group: bool = False):
        super().__init__(config or {"kind": "fork"}, own_group=own_group)
        self._pids: dict[int, int] = {}

    def failures(self) -> dict[int, str]:
        failed = super().failures()
        for worker, pid in list(self._pids.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                del self._pids[worker]
                if status:
                    failed[worker] = f"forked process exited with status {status}"
        return failed


def main() -> int:
    """``python -m fsd_runtime.worker``: the event JSON on stdin; exit status 1 on failure."""
    raw = sys.stdin.buffer.read()
    try:
        run_from_event(raw)
    except Exception as exc:
        print(f"fsd_runtime.worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        liveness.before_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
