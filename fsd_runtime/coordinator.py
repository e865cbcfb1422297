"""The coordinator: partition, store the shares, launch the tree, wait, gather, clean up.

Used by the CLI and the AWS handler alike: what differs is only the
storage, channel and launcher configs. Every run gets a fresh run id, its
own storage prefix and its own channel resources, all removed at the end,
also after a failure. A run fails (``RunError``, naming worker and layer)
as soon as a worker reports an error, a launched process dies, or the run
timeout passes; the launcher then stops whatever still runs.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fsd_kernels import _validate
from fsd_kernels.infer import Activations
from fsd_kernels.network import check_packed
from fsd_runtime import events as ev
from fsd_runtime import liveness
from fsd_runtime import metrics as mx
from fsd_runtime.channels import channel_class
from fsd_runtime.launch import ProcessLauncher, make_launcher, tree_depth
from fsd_runtime.partition import make_partition
from fsd_runtime.plan import build_shares, initial_status
from fsd_runtime.prepared import PreparedError
from fsd_runtime.storage import LocalStorage, Storage, StorageError, unpack_arrays


class RunError(RuntimeError):
    """A distributed run failed; the message names the failing workers and layers."""


class PreparedRunError(RunError, PreparedError):
    """A run failed because a worker found a file of its prepared model bad (changed or corrupted
    after prepare, or malformed: ``prepared.ModelFileError``): the model's data, not the run.
    Both a RunError and a PreparedError (the CLI exits 2)."""


@dataclass
class RunResult:
    activations: Activations
    metrics: list[dict]
    timings: dict
    traffic: dict
    run_id: str
    partition: str
    n_workers: int
    metrics_paths: dict = field(default_factory=dict)
    #: Per layer and worker pair: rows, nonzeros and bytes sent (``metrics.merge_pairs``).
    pairs: list[dict] = field(default_factory=list)
    #: Why ``metrics_dir`` could not be written (None: written, or not asked for).
    metrics_error: str | None = None
    #: Every worker's metrics as it wrote them (peak RSS, times, channel counters, chunk log).
    worker_metrics: list[dict] = field(default_factory=list)
    #: Where the prepared model the workers read is (a directory, or the store's ``models/...``).
    model: str | None = None

    @property
    def categories(self) -> np.ndarray:
        return self.activations.categories


def _coordinator_launcher(config: dict):
    """The coordinator's own launcher: local processes get their own process groups (no orphans)."""
    launcher = make_launcher(config)
    if isinstance(launcher, ProcessLauncher):  # also the AWS 'local' invoker, a ProcessLauncher
        launcher.own_group = True
    return launcher


#: Seconds between two looks at the workers' beacons (a dead worker is reported within this).
LIVENESS_SECONDS = 0.25


def _worker_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1].split(".")[0])


def _wait(storage: Storage, prefix: str, n_workers: int, launcher, timeout: float,
          record: liveness.RunRecord | None = None) -> None:
    """Until every worker has a result; raise RunError on the first error record, dead launched
    process, or (local worker processes) worker whose process ended without a result."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    next_look = 0.0
    while True:
        dead = {}
        if record is not None and time.monotonic() >= next_look:
            dead = record.dead_workers()  # before the listing: a result is stored before its worker exits
            next_look = time.monotonic() + LIVENESS_SECONDS
        keys = storage.list(prefix)  # one listing a poll: on S3 each LIST is billed
        errors = [k for k in keys if k.startswith(f"{prefix}/errors/")]
        results = {_worker_of(k) for k in keys if k.startswith(f"{prefix}/results/")}
        dead = {w: layer for w, layer in dead.items() if w not in results}
        failed = launcher.failures()
        if errors or failed or dead:
            time.sleep(0.2)  # let the workers that noticed the same failure report too
            if record is not None:  # a peer's error is often the echo of a death: look again
                results = {_worker_of(k) for k in storage.list(f"{prefix}/results")}
                dead = {w: layer for w, layer in record.dead_workers().items() if w not in results}
            message, bad_model = _failure_message(storage, prefix, launcher, record, dead)
            raise (PreparedRunError if bad_model else RunError)(message)
        if len(results) == n_workers:
            return
        if time.monotonic() > deadline:
            missing = sorted(set(range(n_workers)) - results)
            raise RunError(f"workers {missing} did not finish within {timeout} s")
        time.sleep(delay)
        delay = min(delay * 1.5, getattr(storage, "poll_seconds", 0.05))  # S3: LISTs are billed


def _failure_message(storage: Storage, prefix: str, launcher, record=None, dead=None) -> tuple[str, bool]:
    """One line per failed worker, each starting "worker W": the workers that died first (how
    their process ended, at which layer, the last line of their stderr), then the error records
    of the others; and whether a worker found a file of its prepared model bad."""
    dead = dead or {}
    lines: dict[int | str, str] = {}
    bad_model = False
    for key in storage.list(f"{prefix}/errors"):
        try:
            error = json.loads(storage.get(key))
            worker, text = int(error["worker"]), str(error["error"])
        except (ValueError, KeyError, TypeError, RecursionError, StorageError):
            lines[key] = f"{key}: unreadable error record"
            continue
        bad_model = bad_model or error.get("bad_model_file") is True
        if text.startswith("WorkerError: "):  # its message names worker and layer already
            text = text[len("WorkerError: "):]
        lines[worker] = text if text.startswith(f"worker {worker}") else f"worker {worker}: {text}"
    recorded = set(lines)
    for worker, layer in dead.items():
        if worker not in lines:
            where = "during start-up" if layer < 0 else f"at layer {layer}"
            lines[worker] = f"worker {worker}: died {where}: its process ended without a result or an error record"
    for worker, reason in launcher.failures().items():
        if worker not in lines:
            lines[worker] = f"worker {worker}: {reason}"
    silent = set(lines) - recorded  # failed without a word: what they last said, if anything
    if record is not None:
        for worker in silent:
            said = record.worker_stderr(worker)
            if said and said not in lines[worker]:
                lines[worker] += f" (its last stderr line: {said})"
    order = sorted(lines, key=lambda k: (isinstance(k, str), k not in silent, str(k).zfill(12)))
    return "distributed run failed:\n  " + "\n  ".join(lines[k] for k in order), bad_model


def _metrics_record(storage: Storage, prefix: str, worker: int) -> dict:
    """A worker's metrics record, or a RunError naming it (the store may hold anything)."""
    try:
        record = json.loads(storage.get(ev.metrics_key(prefix, worker)))
    except (ValueError, RecursionError, StorageError) as exc:
        raise RunError(f"worker {worker}: unreadable metrics record ({exc})") from None
    if not isinstance(record, dict):
        raise RunError(f"worker {worker}: metrics record is not a JSON object")
    problem = _metrics_problem(record)
    if problem:
        raise RunError(f"worker {worker}: malformed metrics record: {problem}")
    return record


def _count(value, low: int = 0) -> bool:
    """Whether ``value`` is an integer >= ``low`` (``_validate.integer``'s rule, as a test)."""
    try:
        _validate.integer("count", value, low)
    except ValueError:
        return False
    return True


def _real(value) -> bool:
    """A finite number a float can hold (JSON integers have no bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _metrics_problem(record: dict) -> str | None:
    """What is wrong with the fields the coordinator reads from a metrics record (None: nothing;
    the per-layer table is checked by ``metrics.merge``)."""
    times = record.get("times")
    if not isinstance(times, dict) or not all(_real(times.get(k)) for k in ("ready", "finished", "cpu_s")
                                              if k in times or k != "cpu_s"):
        return "'times' needs finite 'ready' and 'finished' (and 'cpu_s', if there)"
    if "batches" in record and not _count(record["batches"], 1):
        return "'batches' must be a positive integer"
    requests = record.get("requests", {})
    if not isinstance(requests, dict) or not all(isinstance(k, str) and _count(v) for k, v in requests.items()):
        return "'requests' must map names to counts"
    reads = record.get("model_reads")
    if reads is not None and not (isinstance(reads, dict) and _count(reads.get("gets")) and _count(reads.get("bytes"))):
        return "'model_reads' needs counts 'gets' and 'bytes'"
    return None


def _gather(storage: Storage, prefix: str, n_workers: int, n_images: int, n_neurons: int, ymax):
    """Final activations (CSR) from every worker's result, checked: results come from outside.

    Built from nonzeros only, so memory follows nnz, not images x neurons.
    """
    owned = np.zeros(n_neurons, np.int64)
    keys, values, saturated_sets = [], [], []
    for w in range(n_workers):
        z = unpack_arrays(storage.get(ev.result_key(prefix, w)), f"result of worker {w}")
        try:
            neurons, active, rows, saturated = z["neurons"], z["active"], z["rows"], z["saturated"]
        except KeyError as exc:
            raise RunError(f"result of worker {w} lacks {exc}") from None
        if rows.shape != (neurons.shape[0], active.shape[0]) or rows.dtype != np.float32 \
                or any(a.size and (a.min() < 0 or a.max() >= hi)
                       for a, hi in ((neurons, n_neurons), (active, n_images), (saturated, n_images))):
            raise RunError(f"result of worker {w} is malformed")
        owned[neurons] += 1
        r, c = np.nonzero(rows)
        keys.append(active[c].astype(np.int64) * n_neurons + neurons[r])
        values.append(rows[r, c])
        saturated_sets.append(np.sort(saturated))
    if not np.all(owned == 1):
        raise RunError("worker results do not cover every output neuron exactly once")
    saturated = saturated_sets[0]
    if any(not np.array_equal(s, saturated) for s in saturated_sets[1:]):
        raise RunError("workers disagree on which images are saturated")
    keys.append((saturated[:, None] * n_neurons + np.arange(n_neurons)).ravel())
    values.append(np.full(keys[-1].shape[0], ymax, np.float32))
    keys, values = np.concatenate(keys), np.concatenate(values)
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if keys.size > 1 and np.any(np.diff(keys) == 0):
        raise RunError("worker results give some activation twice")
    indptr = np.zeros(n_images + 1, np.int64)
    np.cumsum(np.bincount(keys // n_neurons, minlength=n_images), out=indptr[1:])
    return Activations(indptr, (keys % n_neurons).astype(np.int32), values, n_neurons)


def _fit_batches(footprints, n_workers: int, batch_size, worker_memory_mb, launcher_kind, say):
    """(batch size, memory budget) of a run from every worker's ``budget.Footprint`` (None: not
    known, no batching): an explicit batch size wins (said if it exceeds the budget); else the
    largest that fits the budget (``budget.batch_size_for``)."""
    from fsd_runtime import budget

    if worker_memory_mb is None:
        worker_memory_mb = budget.default_worker_memory_mb(n_workers, launcher_kind)
    if worker_memory_mb is None or footprints is None:
        return batch_size, worker_memory_mb
    if batch_size is not None:
        need = max(budget.peak_bytes(fp, batch_size) for fp in footprints) / 2**20
        if need > worker_memory_mb:
            say(f"batches of {batch_size} images need about {need:.0f} MB a worker, more than its "
                f"{worker_memory_mb:.0f} MB (the batch size given wins)")
        return batch_size, worker_memory_mb
    batch_size = budget.batch_size_for(footprints, worker_memory_mb)
    if batch_size is not None:
        say(f"batches of {batch_size} images fit {worker_memory_mb:.0f} MB a worker")
    return batch_size, worker_memory_mb


def _checked_images(images, n_neurons: int):
    """The images as validated CSR arrays in kernel dtypes: what ``fsd_kernels.infer`` refuses
    (bad pointers, indices out of range, unsorted or repeated in a row, non-finite or beyond
    float32 values) is refused here too, before anything is partitioned or launched."""
    if not isinstance(images, (tuple, list)) or len(images) != 3:
        raise ValueError("images must be CSR arrays (indptr, indices, data)")
    indptr = _validate.as_array("images indptr", images[0], np.int64)
    if indptr.shape[0] < 1:
        raise ValueError("images indptr must have at least one entry")
    return _validate.csr("images", indptr, images[1], images[2], (indptr.shape[0] - 1, n_neurons))


def run_distributed(net, images, n_workers: int | None = None, *, partition: str | None = None,
                    channel: dict | None = None, launcher: dict | None = None,
                    storage: Storage | None = None, fanout: int = 2, batch_size: int | None = None,
                    receive_timeout: float | None = None, run_timeout: float | None = None,
                    metrics_dir: str | None = None, owners: np.ndarray | None = None,
                    progress=None, worker_memory_mb: float | None = None, prepared=None,
                    park_saturated: bool = True) -> RunResult:
    """Run ``images`` (CSR arrays: indptr, indices, data) through ``net`` (a PackedNetwork) on
    ``n_workers`` workers; results are bit-identical to ``fsd_kernels.infer``. ``progress``
    (optional) is called with one line per stage.

    ``receive_timeout``/``run_timeout`` None: derived from the work (``budget.run_timeouts``).
    ``worker_memory_mb``: each worker's memory budget (None: on one machine, the memory available
    shared by the workers); without ``batch_size``, images are batched to fit it
    (``budget.batch_size_for``; ``budget.MemoryBudgetError`` before launch if one image does not).

    ``prepared``: a prepared model (a directory from :func:`fsd_runtime.prepared.prepare`, or a
    ``PreparedModel``) to run instead of partitioning and planning ``net`` here. This coordinator
    then reads only the model's metadata and layer-0 rows besides the images; ``net`` may be
    None, and if given must be the network the model was prepared from (same content hash).
    ``n_workers`` (default: the model's) and ``partition`` must match the model's. Local runs
    read the workers' segments where they are; a run on another store (S3) uploads the model to
    ``models/{digest}`` of that store once, and later runs reuse it.

    ``park_saturated`` False: images whose outputs are all ymax are computed and sent every
    layer instead of parked (same bits; to measure what parking saves, see docs/runtime.md).
    """
    from fsd_runtime import budget

    say = progress or (lambda message: None)
    n_workers = None if n_workers is None else _validate.integer("n_workers", n_workers, 1)
    fanout = _validate.integer("fan-out", fanout, 1)
    batch_size = None if batch_size is None else _validate.integer("batch_size", batch_size, 1)
    launcher_kind = (launcher or {"kind": "process"}).get("kind")
    launcher_config = dict(launcher or {"kind": "process"})
    if net is not None:
        check_packed(net)  # its derived fields (saturation flags) drive the workers' parking
    model = None
    if prepared is not None:
        from fsd_runtime import prepared as prep

        if owners is not None:
            raise ValueError("owners do not apply to a prepared model (it holds its own partition)")
        model = prep.open_model(prepared)
        prep.check_model(model, n_workers=n_workers, partition=partition)
        if net is not None:
            prep.check_model(model, network_hash=prep.network_hash(net))
        n_workers, partition = model.n_workers, model.partition
    elif net is None or n_workers is None:
        raise ValueError("a run needs a network and a worker count, or a prepared model")
    partition = partition or "hypergraph"
    images = _checked_images(images, model.n_neurons if model is not None else net.n_neurons)
    depth = tree_depth(n_workers, fanout)  # validates the tree before anything is created
    if receive_timeout is None or run_timeout is None:
        if model is None:
            auto = budget.run_timeouts(net, images[0].shape[0] - 1, n_workers, depth, launcher_kind)
        else:
            auto = budget.model_timeouts(model.meta, images[0].shape[0] - 1, depth, launcher_kind)
        receive_timeout = auto.receive if receive_timeout is None else receive_timeout
        run_timeout = auto.run if run_timeout is None else run_timeout
    channel = dict(channel or {"kind": "local"})
    if channel.get("kind") == "local" and "connect_timeout" not in channel:
        # a peer still starting is waited for as long as the run may take (start-up skew is no
        # failure; a peer that dies meanwhile is found by the liveness checks)
        channel["connect_timeout"] = min(float(run_timeout), 3600.0)
    aws = channel.get("kind") not in (None, "local") or storage is not None
    for line in liveness.sweep(aws=aws):  # leftovers of runs whose coordinator died
        say(line)
    indptr, indices, data = images
    n_neurons = model.n_neurons if model is not None else net.n_neurons
    ymax = model.ymax if model is not None else net.ymax
    timings = {}
    start = time.perf_counter()
    if model is None and owners is None:
        say(f"partitioning {net.n_layers} layers over {n_workers} workers ({partition})")
        owners = make_partition(net, n_workers, partition)
    timings["partition_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if model is None:
        say(f"planning the workers' shares (partitioned in {timings['partition_s']:.1f} s)")
        shares = build_shares(net, indptr, indices, data, owners, n_workers)
        fps = [budget.footprint(share) for share in shares]
    else:
        in0 = prep.layer0_inputs(model)  # read once: the footprints and the inputs shares need it
        fps = prep.footprints(model, indptr, indices, in0)
    batch_size, worker_memory_mb = _fit_batches(fps, n_workers, batch_size, worker_memory_mb, launcher_kind, say)
    run_id = uuid.uuid4().hex[:16]
    prefix = f"runs/{run_id}"
    coordinator_launcher = _coordinator_launcher(launcher_config)  # a bad config fails before any resource
    kind = channel_class(channel)
    record = liveness.RunRecord(run_id)
    run_channel = None
    try:
        storage = storage or LocalStorage(record.store_dir)
        record.update(storage=storage.config(), prefix=prefix, n_workers=n_workers)
        if isinstance(coordinator_launcher, ProcessLauncher):
            coordinator_launcher.env.update(record.env())
            coordinator_launcher.stderr_for = liveness.open_worker_stderr  # its own file from its start
        if model is None:
            say(f"storing {n_workers} shares (planned in {time.perf_counter() - start:.1f} s)")
            for share in shares:
                with liveness.signals_deferred():  # an upload cut off may still be stored after the clean-up
                    storage.put(ev.share_key(prefix, share.worker), share.to_bytes())
        else:
            if not isinstance(storage, LocalStorage) and model.storage.config() != storage.config():
                # workers elsewhere (Lambda) read the model from the run's store: put it there once
                model, uploaded = prep.publish(model, storage, say)
                timings["model_uploaded"] = uploaded
            say(f"storing {n_workers} inputs shares of the prepared model in {model.where()}")
            active, saturated = initial_status(indptr, data, n_neurons, ymax)
            for w in range(n_workers):
                share = prep.inputs_share(model, w, in0[w], (indptr, indices, data), active, saturated)
                with liveness.signals_deferred():  # (as above)
                    storage.put(ev.share_key(prefix, w), share)
        timings["plan_upload_s"] = time.perf_counter() - start
        record.update(channel=channel)  # what `clean` deletes by name if this dies part-way
        run_channel = kind.create_run(channel, run_id, n_workers)
        record.update(channel=run_channel, paths=[run_channel["dir"]] if isinstance(run_channel.get("dir"), str)
                      and os.path.basename(run_channel["dir"]).startswith("fsd-") else [])
        say(f"launching {n_workers} workers ({channel.get('kind')} channel)")
        event = ev.WorkerEvent(run_id=run_id, worker_id=0, n_workers=n_workers, fanout=fanout,
                               storage=storage.config(), prefix=prefix, channel=run_channel,
                               launcher=launcher_config, receive_timeout=receive_timeout,
                               run_timeout=run_timeout, batch_size=batch_size,
                               worker_memory_mb=worker_memory_mb, park_saturated=park_saturated,
                               model=model.location() if model is not None else None)
        launched = time.time()
        start = time.perf_counter()
        coordinator_launcher.launch([event])
        _wait(storage, prefix, n_workers, coordinator_launcher, run_timeout, record)
        timings["launch_to_done_s"] = time.perf_counter() - start
        worker_metrics = [_metrics_record(storage, prefix, w) for w in range(n_workers)]
        activations = _gather(storage, prefix, n_workers, indptr.shape[0] - 1, n_neurons, ymax)
    finally:
        with liveness.signals_deferred():
            try:
                coordinator_launcher.close()
                if run_channel is not None:
                    kind.delete_run(run_channel, run_id, n_workers)
                if storage is not None:
                    storage.delete_prefix(prefix)
            finally:
                record.close()  # the local store, the socket directory and the record itself
    times = [m["times"] for m in worker_metrics]
    timings["startup_s"] = max(t["ready"] for t in times) - launched
    timings["run_s"] = max(t["finished"] for t in times) - max(t["ready"] for t in times)
    if launcher_config.get("kind") != "thread":  # threads share one process clock
        timings["workers_cpu_s"] = sum(t.get("cpu_s", 0.0) for t in times)
    try:  # the per-layer tables come from outside too: what is wrong in them fails the run, said so
        rows = mx.merge(worker_metrics)
        pairs = mx.merge_pairs(worker_metrics)
        total = {k: int(v) for k, v in mx.totals(rows).items() if k in ("messages_sent", "chunks_sent", "bytes_sent")}
        per_round = mx.messages_per_round(rows)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise RunError(f"malformed worker metrics: {type(exc).__name__}: {exc}") from None
    traffic = {"messages": total["messages_sent"], "chunks": total["chunks_sent"],
               "bytes": total["bytes_sent"], "requests": total["chunks_sent"], "messages_per_round": per_round}
    if model is not None:  # each worker's store reads of the model (model.json, its segments) and their bytes
        reads = [m.get("model_reads") for m in worker_metrics]
        if all(isinstance(r, dict) for r in reads):  # as read: segments are read as the run needs them
            traffic["model_gets_per_worker"] = [int(r["gets"]) for r in reads]
            traffic["model_bytes_per_worker"] = [int(r["bytes"]) for r in reads]
        else:  # read whole at start-up
            traffic["model_gets_per_worker"] = [prep.worker_reads(model)] * n_workers
            model_bytes = prep.worker_bytes(model)
            if model_bytes is not None:
                traffic["model_bytes_per_worker"] = model_bytes
    traffic["channel_requests"] = dict(sum((Counter(m.get("requests", {})) for m in worker_metrics), Counter()))
    traffic["batches"] = max(int(m.get("batches") or 1) for m in worker_metrics)  # the same on every worker
    result = RunResult(activations, rows, timings, traffic, run_id, partition, n_workers)
    result.pairs = pairs
    result.worker_metrics = worker_metrics
    result.model = None if model is None else (model.storage.root if isinstance(model.storage, LocalStorage)
                                               else f"s3:{model.prefix}" if model.storage.config().get("kind") == "s3"
                                               else model.where())
    if metrics_dir:
        try:
            result.metrics_paths = mx.write(rows, metrics_dir, {"timings": timings, "traffic": traffic},
                                            result.pairs)
        except OSError as exc:  # the result stands; the caller says what was not written
            result.metrics_error = f"cannot write metrics to {metrics_dir}: {exc}"
    return result
