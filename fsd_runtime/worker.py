"""The channel-agnostic worker: one worker's share of every layer, for every batch of images.

``run_from_event(event)`` is the whole life of a worker and what every
entry point calls (``python -m fsd_runtime.worker`` with the event JSON on
stdin, the thread launcher, the Lambda handler): parse the event, start
the tree children, load the share from storage, build the channel, run
:func:`run_worker`, write the result and metrics; on failure write an
error record naming worker and layer, then re-raise.

This module imports numpy, the compiled kernels and the codec only: never
numba, scipy or boto3 (those live behind the kinds the configs name).
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsd_runtime import events as ev
from fsd_runtime.channels import Channel, make_channel
from fsd_runtime.launch import Launcher, launch_children, make_launcher
from fsd_runtime.plan import WorkerShare
from fsd_runtime.storage import Storage, make_storage, pack_arrays


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


def run_worker(share: WorkerShare, channel: Channel, *, run_id: str, receive_timeout: float,
               batch_size: int | None = None) -> WorkerResult:
    """Run this worker's part of every layer for every batch (the loop lands in the next commit)."""
    raise NotImplementedError("the worker loop is being written (issue 4)")


def _write_error(storage: Storage, event: ev.WorkerEvent, exc: BaseException) -> None:
    record = {"worker": event.worker_id, "layer": getattr(exc, "layer", None),
              "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20)}
    storage.put(ev.error_key(event.prefix, event.worker_id), json.dumps(record).encode())


def run_from_event(event: Any, storage: Storage | None = None, channel: Channel | None = None,
                   launcher: Launcher | None = None) -> WorkerResult:
    """The whole life of one worker, from its event (dict, JSON or WorkerEvent).

    ``storage``, ``channel`` and ``launcher`` default to what the event's
    configs name; adapters pass ready-made ones (e.g. a shared boto3 client).
    """
    event = ev.parse(event)
    storage = storage or make_storage(event.storage)
    try:
        launch_children(event, launcher or make_launcher(event.launcher))
        share = WorkerShare.from_bytes(storage.get(ev.share_key(event.prefix, event.worker_id)))
        if share.worker != event.worker_id or share.n_workers != event.n_workers:
            raise ev.EventError(f"share of worker {share.worker}/{share.n_workers} given to "
                                f"worker {event.worker_id}/{event.n_workers}")
        own_channel = channel is None
        channel = channel or make_channel(event.channel, event.worker_id, event.n_workers, event.run_id)
        try:
            result = run_worker(share, channel, run_id=event.run_id,
                                receive_timeout=event.receive_timeout,
                                batch_size=event.batch_size)
        finally:
            if own_channel:
                channel.close()
        storage.put(ev.metrics_key(event.prefix, event.worker_id), json.dumps(result.metrics).encode())
        storage.put(ev.result_key(event.prefix, event.worker_id), result.to_bytes())
        return result
    except BaseException as exc:
        _write_error(storage, event, exc)
        raise


def main() -> int:
    """``python -m fsd_runtime.worker``: the event JSON on stdin; exit status 1 on failure."""
    raw = sys.stdin.buffer.read()
    try:
        run_from_event(raw)
    except Exception as exc:
        print(f"fsd_runtime.worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
