"""The worker event: everything one worker needs to start, as a JSON-serialisable dict.

The same event drives a local process, a thread, an aws-lambda-rie container
and a real Lambda invocation: a worker reads its share of the model from
``storage`` at :func:`share_key`, talks to the others through ``channel``,
starts its tree children through ``launcher`` and writes its result,
metrics and (on failure) error under the run's keys. Every field is
checked by :func:`parse`; a bad event raises :class:`EventError`.

Storage keys of a run (all under ``prefix``)::

    {prefix}/shares/{worker}.npz     the worker's share (fsd_runtime.plan)
    {prefix}/results/{worker}.npz    its final activations
    {prefix}/metrics/{worker}.json   its per-layer metrics
    {prefix}/errors/{worker}.json    written instead of a result when it fails
    {prefix}/claims/{worker}         created (create-only) by the one invocation that runs the worker
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

#: The event layout this code reads and writes.
EVENT_VERSION = 1
#: Hard caps on any event (a deployment's own limits, held to inside Lambda, are lower).
MAX_WORKERS = 10_000
MAX_FANOUT = 64
MAX_BATCH_SIZE = 10**9
#: Run ids become file names, S3 keys and SNS attribute values: keep them plain.
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: A relative storage key prefix: plain segments joined by '/' (checked for '..' separately).
_PREFIX = re.compile(r"^[A-Za-z0-9_.=-]{1,128}(/[A-Za-z0-9_.=-]{1,128}){0,8}$")


class EventError(ValueError):
    """A worker event is malformed; the message names the field."""


@dataclass(frozen=True)
class WorkerEvent:
    """One worker's orders. ``to_dict``/``parse`` round-trip it through JSON."""

    run_id: str
    worker_id: int
    n_workers: int
    #: Children per worker in the launch tree (see fsd_runtime.launch.tree_children).
    fanout: int
    #: Storage config, e.g. ``{"kind": "local", "root": "/tmp/run"}`` or ``{"kind": "s3", ...}``.
    storage: dict
    #: Key prefix of this run in ``storage`` (shares, results, metrics, errors live under it).
    prefix: str
    #: Channel config, ``{"kind": "local" | "queue" | "object", ...}`` (fsd_runtime.channels).
    channel: dict
    #: Launcher config for starting this worker's children, ``{"kind": "process" | "thread" | "lambda" | "rie", ...}``.
    launcher: dict
    #: Seconds to wait for an expected message before failing the run (names worker and layer).
    receive_timeout: float = 60.0
    #: Seconds the whole worker may take.
    run_timeout: float = 900.0
    #: Images per pipelined batch (None: all of the worker's images in one batch).
    batch_size: int | None = None
    #: The memory budget a worker was planned under, MB (None: none); the batch size above fits
    #: it (``fsd_runtime.budget``). Reported in the worker's metrics.
    worker_memory_mb: float | None = None
    #: Start this worker's tree children (False when the coordinator starts every worker itself).
    launch_children: bool = True
    #: Park images once every output is ymax and the next layers keep that (they then cost no
    #: traffic or compute; exact). False computes and sends them every layer, as the paper's
    #: system does: to measure what parking saves.
    park_saturated: bool = True
    version: int = EVENT_VERSION
    #: Where this run's prepared model is (fsd_runtime.prepared): ``{"storage": config, "prefix":
    #: str}`` (storage default: the run's); None: the run's shares are whole.
    model: dict | None = None
    #: Free-form settings for adapters (ignored by the worker loop).
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def for_worker(self, worker_id: int) -> "WorkerEvent":
        """The same run's event for another worker (a tree child)."""
        return dataclasses.replace(self, worker_id=_worker("worker_id", worker_id, self.n_workers))


def share_key(prefix: str, worker: int) -> str:
    return f"{prefix}/shares/{worker}.npz"


def result_key(prefix: str, worker: int) -> str:
    return f"{prefix}/results/{worker}.npz"


def metrics_key(prefix: str, worker: int) -> str:
    return f"{prefix}/metrics/{worker}.json"


def claim_key(prefix: str, worker: int) -> str:
    return f"{prefix}/claims/{worker}"


def error_key(prefix: str, worker: int) -> str:
    return f"{prefix}/errors/{worker}.json"


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"event field {name!r} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise EventError(f"event field {name!r} must be in {low}..{high}, got {value}")
    return value


def _worker(name: str, value: Any, n_workers: int) -> int:
    return _int(name, value, 0, n_workers - 1)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise EventError(f"event field {name!r} must be seconds in (0, 86400], got {value!r}")
    return float(value)


def _config(name: str, value: Any) -> dict:
    if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
        raise EventError(f"event field {name!r} must be an object with a string 'kind', got {value!r}")
    return dict(value)


def _text(name: str, value: Any, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.match(value) or ".." in value:
        raise EventError(f"event field {name!r} must match {pattern.pattern} (no '..'), got {value!r}")
    return value


def parse(event: Any) -> WorkerEvent:
    """Validate a decoded event (dict), a JSON string or a WorkerEvent; raise EventError if bad."""
    if isinstance(event, WorkerEvent):
        event = event.to_dict()
    if isinstance(event, (str, bytes)):
        try:
            event = json.loads(event)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting beyond the parser's depth
            raise EventError(f"event is not valid JSON: {exc}") from None
    if not isinstance(event, Mapping):
        raise EventError(f"event must be a JSON object, got {type(event).__name__}")
    known = {f.name for f in dataclasses.fields(WorkerEvent)}
    unknown = sorted(set(event) - known)
    if unknown:
        raise EventError(f"event has unknown fields {unknown}")
    required = [f.name for f in dataclasses.fields(WorkerEvent)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in event]
    if missing:
        raise EventError(f"event lacks fields {missing}")
    version = event.get("version", EVENT_VERSION)
    if version != EVENT_VERSION:
        raise EventError(f"event version {version!r} is not supported (this code reads {EVENT_VERSION})")
    n_workers = _int("n_workers", event["n_workers"], 1, MAX_WORKERS)
    extra = event.get("extra", {})
    if not isinstance(extra, Mapping):
        raise EventError(f"event field 'extra' must be an object, got {extra!r}")
    batch_size = event.get("batch_size")
    if batch_size is not None:
        batch_size = _int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    worker_memory_mb = event.get("worker_memory_mb")
    if worker_memory_mb is not None and (isinstance(worker_memory_mb, bool) or not isinstance(worker_memory_mb, (int, float))
                                         or not 0 < worker_memory_mb <= 10**7):
        raise EventError(f"event field 'worker_memory_mb' must be MB in (0, 10000000], got {worker_memory_mb!r}")
    launch_children = event.get("launch_children", True)
    if not isinstance(launch_children, bool):
        raise EventError(f"event field 'launch_children' must be true or false, got {launch_children!r}")
    park_saturated = event.get("park_saturated", True)
    if not isinstance(park_saturated, bool):
        raise EventError(f"event field 'park_saturated' must be true or false, got {park_saturated!r}")
    model = event.get("model")
    if model is not None:
        if not isinstance(model, Mapping) or set(model) - {"storage", "prefix"}:
            raise EventError(f"event field 'model' must be an object with 'storage' and 'prefix', got {model!r}")
        prefix = model.get("prefix", "")
        model = {"prefix": "" if prefix == "" else _text("model prefix", prefix, _PREFIX)}
        if event["model"].get("storage") is not None:
            model["storage"] = _config("model storage", event["model"]["storage"])
    return WorkerEvent(
        run_id=_text("run_id", event["run_id"], _RUN_ID),
        worker_id=_worker("worker_id", event["worker_id"], n_workers),
        n_workers=n_workers,
        fanout=_int("fanout", event["fanout"], 1, MAX_FANOUT),
        storage=_config("storage", event["storage"]),
        prefix=_text("prefix", event["prefix"], _PREFIX),
        channel=_config("channel", event["channel"]),
        launcher=_config("launcher", event["launcher"]),
        receive_timeout=_seconds("receive_timeout", event.get("receive_timeout", 60.0)),
        run_timeout=_seconds("run_timeout", event.get("run_timeout", 900.0)),
        batch_size=batch_size,
        worker_memory_mb=None if worker_memory_mb is None else float(worker_memory_mb),
        launch_children=launch_children,
        park_saturated=park_saturated,
        extra=dict(extra),
        model=model,
    )
