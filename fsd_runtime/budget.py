"""A worker's budgets: the memory it holds (and the batch size that fits a memory budget), and
timeouts derived from the work. Formulas and their constants: ``docs/runtime.md`` ("Worker
memory and timeouts").

Imports nothing beyond the standard library (the coordinator calls it while planning; the worker reports its estimate).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass


#: Bytes of one activation (float32).
FLOAT_BYTES = 4
#: A worker process before its share and buffers: the interpreter, numpy, the kernels and the
#: codec, the channel. Measured on 2026-12-07: 187 MB with the numba JIT kernels (this machine,
#: x86_64); the AOT native module of the Lambda layer needs about 140 MB less.
WORKER_OVERHEAD_MB = 200.0


class MemoryBudgetError(ValueError):
    """Even one image per batch does not fit a worker's memory budget (raised before launch)."""


@dataclass(frozen=True)
class Footprint:
    """What sizes one worker's memory (see :func:`footprint`)."""

    worker: int
    share_bytes: int   # the share's arrays (weights, plans, inputs), held for the whole run
    in_rows: int       # rows of the input buffer: most input slots of a layer + status rows
    out_rows: int      # rows of a batch's output buffer: most outputs of a layer + 2 status rows
    last_rows: int     # outputs of the last layer (the result's rows)
    n_images: int      # image columns over all batches (active + saturated images)
    map_bytes: int     # one layer's slot maps: 8 (N + 2) bytes per peer it receives from


def status_rows(worker: int, n_workers: int) -> int:
    """Status rows of a worker's input block: the root (worker 0) holds every worker's two, the
    others the root's verdict."""
    return 2 * n_workers if worker == 0 else 2


def footprint(share) -> Footprint:
    """The memory terms of a ``plan.WorkerShare`` (one read by layers: its model's recorded sizes)."""
    known = getattr(getattr(share, "reader", None), "footprint", None)
    if known is not None:
        return known
    arrays = [share.keeps_saturated, share.x_indptr, share.x_slots, share.x_data, share.active, share.saturated]
    for name in ("out_neurons", "in_neurons", "colptr", "rowidx", "vals", "bias", "local_slots", "local_pos"):
        arrays += getattr(share, name)
    nbytes = sum(a.nbytes for a in arrays)
    nbytes += sum(a.nbytes for per in share.recv_slots for a in per)
    nbytes += sum(a.nbytes for per in share.send_pos for a in per)
    sources = max((sum(1 for s, r in enumerate(per) if s != share.worker and r.shape[0]) for per in share.recv_slots),
                  default=0)
    sources += 1 if share.worker != 0 else share.n_workers - 1  # status: from the root / to the root
    most_in = max((a.shape[0] for a in share.in_neurons), default=0)
    most_out = max((a.shape[0] for a in share.out_neurons), default=0)
    return Footprint(worker=share.worker, share_bytes=int(nbytes),
                     in_rows=most_in + status_rows(share.worker, share.n_workers), out_rows=most_out + 2,
                     last_rows=share.out_neurons[-1].shape[0] if share.out_neurons else 0,
                     n_images=int(share.active.shape[0] + share.saturated.shape[0]),
                     map_bytes=8 * (share.n_neurons + 2) * min(sources, share.n_workers))


def peak_bytes(fp: Footprint, batch: int | None, overhead_mb: float = WORKER_OVERHEAD_MB) -> int:
    """A worker's peak memory with batches of ``batch`` images (None: all in one):

        overhead + share + maps + max(run, end)
        run = 4 (in_rows x batch + out_rows x images) + 16 x images   (input buffer, shared by the
              batches; one output buffer per batch; ids and per-column tops/gaps)
        end = 4 x 2 x last_rows x images      (the result and its packed bytes; the batches'
              output buffers are freed as the result is filled, the input buffer before)
    """
    base, rest, end = _terms(fp, overhead_mb)
    b = fp.n_images if batch is None else min(batch, fp.n_images)
    return base + max(FLOAT_BYTES * fp.in_rows * max(b, 1) + rest, end)


def _terms(fp: Footprint, overhead_mb: float) -> tuple[int, int, int]:
    """(overhead + share + maps, the run's bytes but the input buffer, the end's bytes)."""
    n = fp.n_images
    base = int(overhead_mb * 2**20) + fp.share_bytes + fp.map_bytes
    return base, FLOAT_BYTES * fp.out_rows * n + 16 * n, FLOAT_BYTES * 2 * fp.last_rows * n


def largest_batch(fp: Footprint, budget_mb: float, overhead_mb: float = WORKER_OVERHEAD_MB) -> int:
    """The most images per batch whose :func:`peak_bytes` fits ``budget_mb`` (at most all
    images; at least 1); :class:`MemoryBudgetError` if one image does not fit."""
    budget = int(budget_mb * 2**20)
    if peak_bytes(fp, 1, overhead_mb) > budget:
        raise MemoryBudgetError(
            f"worker {fp.worker} needs about {peak_bytes(fp, 1, overhead_mb) / 2**20:.0f} MB even with one image "
            f"per batch (its share {fp.share_bytes / 2**20:.0f} MB, outputs of {fp.n_images} images "
            f"{FLOAT_BYTES * fp.out_rows * fp.n_images / 2**20:.0f} MB, {overhead_mb:.0f} MB for the process), more "
            f"than its {budget_mb:g} MB: use more workers, fewer images a run, or a larger worker memory")
    base, rest, _ = _terms(fp, overhead_mb)  # peak = base + max(4 in_rows b + rest, end), end fits
    b = (budget - base - rest) // (FLOAT_BYTES * fp.in_rows)
    b = max(1, min(fp.n_images, b))
    return int(b)


def batch_size_for(shares, budget_mb: float, overhead_mb: float = WORKER_OVERHEAD_MB) -> int | None:
    """The batch size every worker uses (batches are the same on every worker): the largest that
    fits the budget on all of them; None when all images fit in one batch."""
    fps = [s if isinstance(s, Footprint) else footprint(s) for s in shares]
    n = max((fp.n_images for fp in fps), default=0)
    b = min((largest_batch(fp, budget_mb, overhead_mb) for fp in fps), default=n)
    return None if b >= n else b


def default_worker_memory_mb(n_workers: int, launcher_kind: str | None) -> float | None:
    """The memory budget of a worker when none is given: on one machine (process, fork and thread
    launchers) the memory available now shared by the workers (each fresh process with its own
    ``WORKER_OVERHEAD_MB``; forked workers and threads share one); None elsewhere (the AWS run
    passes its function's memory)."""
    if launcher_kind not in ("process", "fork", "thread"):
        return None
    available = available_bytes()
    if available is None:
        return None
    available /= 2**20
    if launcher_kind == "process":  # every worker its own interpreter and kernels
        return available / n_workers
    # forked workers share their parent's pages of the interpreter and kernels
    # (copy-on-write), threads their process: that overhead is there once
    return max(available - WORKER_OVERHEAD_MB, 0.0) / n_workers + WORKER_OVERHEAD_MB


def available_bytes() -> int | None:
    """The memory available now (MemAvailable of /proc/meminfo), bytes; None without it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- timeouts from the work ---

#: Seconds per (stored weight x image) of a layer on one core, kernel, block assembly and codec
#: together: about 10x what the kernels take on this machine, for a loaded one.
SECONDS_PER_EDGE = 5e-9
#: The receive timeout never goes below this (the former fixed default), nor the run's below
#: RUN_FLOOR_S.
RECEIVE_FLOOR_S = 60.0
RUN_FLOOR_S = 900.0
#: Start-up allowance per level of the launch tree (an Invoke, a cold start, the share download).
STARTUP_SECONDS_PER_LEVEL = 5.0
#: CPU seconds a fresh local worker process takes to import numpy and load the kernels (measured
#: 2-3 s; the fork launcher's children skip it).
PROCESS_START_S = 4.0


@dataclass(frozen=True)
class Timeouts:
    receive: float
    run: float
    layer_s: float      # the estimate of one layer's time on the slowest worker
    startup_s: float    # the start-up allowance


def timeouts(*, layers: int, neurons: int, edges_per_layer: int, images: int, workers: int, depth: int,
             cores: int | None, fresh_processes: bool) -> Timeouts:
    """Default receive and run timeouts for a run (explicit ones win; see docs/runtime.md):

        layer_s   = SECONDS_PER_EDGE x images x (edges_per_layer + 2 neurons) / workers x contention
                    contention = max(1, workers / cores) on one machine (cores None: 1, e.g. Lambda)
        receive   = max(RECEIVE_FLOOR_S, ceil(8 layer_s))    (a slow peer may be a layer behind, and
                    the status a hop more: 2 layers, with a margin of 4)
        startup_s = STARTUP_SECONDS_PER_LEVEL x depth (+ PROCESS_START_S x workers / cores for
                    fresh local processes)
        run       = max(RUN_FLOOR_S, ceil(2 (startup_s + 2 layers x layer_s) + receive))
                    (both at most a day, an event's limit)
    """
    contention = max(1.0, workers / cores) if cores else 1.0
    layer_s = SECONDS_PER_EDGE * images * (edges_per_layer + 2 * neurons) / workers * contention
    receive = max(RECEIVE_FLOOR_S, float(math.ceil(8 * layer_s)))
    startup = STARTUP_SECONDS_PER_LEVEL * depth
    if fresh_processes:
        startup += PROCESS_START_S * workers / (cores or 1)
    run = max(RUN_FLOOR_S, float(math.ceil(2 * (startup + 2 * layers * layer_s) + receive)))
    cap = 86400.0  # an event's timeouts are at most a day
    return Timeouts(receive=min(receive, cap), run=min(run, cap), layer_s=layer_s, startup_s=startup)


def run_timeouts(net, n_images: int, n_workers: int, depth: int, launcher_kind: str | None) -> Timeouts:
    """:func:`timeouts` for a PackedNetwork run on ``n_workers`` workers launched by ``launcher_kind``."""
    edges = max((int(net.layer_csc(l)[0][-1]) for l in range(net.n_layers)), default=0)
    local = launcher_kind in ("process", "fork", "thread")
    return timeouts(layers=net.n_layers, neurons=net.n_neurons, edges_per_layer=edges, images=n_images,
                    workers=n_workers, depth=depth, cores=(os.cpu_count() or 1) if local else None,
                    fresh_processes=launcher_kind == "process")


def model_timeouts(meta: dict, n_images: int, depth: int, launcher_kind: str | None) -> Timeouts:
    """:func:`timeouts` for a run of a prepared model (``fsd_runtime.prepared``; its metadata)."""
    layers, n_workers = int(meta["n_layers"]), int(meta["n_workers"])
    edges = int(meta.get("most_edges") or math.ceil(int(meta["nnz"]) / max(layers, 1)))
    local = launcher_kind in ("process", "fork", "thread")
    return timeouts(layers=layers, neurons=int(meta["n_neurons"]), edges_per_layer=edges, images=n_images,
                    workers=n_workers, depth=depth, cores=(os.cpu_count() or 1) if local else None,
                    fresh_processes=launcher_kind == "process")


# --- what a worker reports ---

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_kb() -> int | None:
    """This process's resident set now (VmRSS, kB; None without /proc)."""
    return _status_kb("VmRSS")


def smaps_kb() -> dict:
    """``{"pss_kb", "uss_kb"}`` of this process now, from /proc/self/smaps_rollup (empty without
    it): PSS splits pages shared with a fork parent between the sharers; USS counts private pages only."""
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1])
    except OSError:
        return out
    if "Pss" in fields:
        out["pss_kb"] = fields["Pss"]
    if "Private_Clean" in fields and "Private_Dirty" in fields:
        out["uss_kb"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return out
