"""The Lambda entry point: ``fsd_runtime.aws.handler.handler(event, context)``.

A thin adapter over :func:`fsd_runtime.worker.run_from_event`: validate the
event, run the worker (tree children, share from storage, channel, worker
loop, result and metrics to storage) and answer with a small JSON status.
It never raises: an asynchronous (``Event``) invoke that raises is retried
by Lambda, which would start the same worker twice; instead a failure is
logged, recorded in storage by the worker (``errors/{worker}.json``, where
the coordinator looks) and returned as ``{"ok": false, "error": ...}``.

Imports numpy, the compiled kernels and fsd_runtime only (boto3 inside the
AWS kinds the event names): this module runs inside the kernels layer.
``python -m fsd_runtime.aws.handler`` runs it on an event read from stdin (the
``local`` invoker), logging to stderr and exiting 1 when the worker fails.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from fsd_runtime import events
from fsd_runtime.aws import invokers
from fsd_runtime.worker import run_from_event

invokers.register()


def log(level: str, message: str, **fields: Any) -> None:
    """One JSON line on stderr: CloudWatch keeps it as one searchable record, and a local
    worker's log never mixes with the coordinator's stdout (``--json``)."""
    print(json.dumps({"level": level, "message": message, **fields}, default=str),
          file=sys.stderr, flush=True)


def request_id(context: Any) -> str | None:
    """Lambda's request id, when there is a Lambda context."""
    return getattr(context, "aws_request_id", None)


def remaining_seconds(context: Any) -> float | None:
    """Seconds before Lambda stops this invocation, when there is a Lambda context."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return remaining() / 1000.0 if callable(remaining) else None


#: Set by ``deploy`` in the function's environment (fsd_runtime.aws.deploy.function_environment).
ENV_DEPLOYMENT, ENV_BUCKET, ENV_MAX_WORKERS, ENV_MAX_FANOUT = (
    "FSD_DEPLOYMENT", "FSD_BUCKET", "FSD_MAX_WORKERS", "FSD_MAX_FANOUT")
#: Optional: the one AWS endpoint events may name inside the function (none on real Lambda).
ENV_ENDPOINT = "FSD_ENDPOINT_URL"
_AWS_CHANNELS = ("queue", "object")


def deployment_limits(environ=None) -> dict | None:
    """The deployment's limits when running as a deployed function, else None (local, RIE)."""
    environ = os.environ if environ is None else environ
    if not environ.get(ENV_DEPLOYMENT):
        return None
    try:
        return {"deployment": environ[ENV_DEPLOYMENT], "bucket": environ.get(ENV_BUCKET, ""),
                "max_workers": int(environ.get(ENV_MAX_WORKERS, "1")),
                "max_fanout": int(environ.get(ENV_MAX_FANOUT, "1")),
                "function": environ.get("AWS_LAMBDA_FUNCTION_NAME", environ[ENV_DEPLOYMENT]),
                "endpoint_url": environ.get(ENV_ENDPOINT) or None}
    except ValueError:
        raise events.EventError("the function's FSD_MAX_* environment is not a number") from None


def check_deployed_event(event: events.WorkerEvent, limits: dict) -> None:
    """Inside a deployed function an event may only name AWS kinds of this very deployment:
    its function as launcher, its bucket as store (and object channel), its topics' prefix,
    the deployment's endpoint (none: the region's), and at most its workers and fan-out."""
    def refuse(what: str):
        raise events.EventError(f"inside deployment {limits['deployment']!r}: {what}")

    if event.n_workers > limits["max_workers"]:
        refuse(f"{event.n_workers} workers exceed the deployment's limit of {limits['max_workers']}")
    if event.fanout > limits["max_fanout"]:
        refuse(f"fan-out {event.fanout} exceeds the deployment's limit of {limits['max_fanout']}")
    launcher, storage, channel = event.launcher, event.storage, event.channel
    if launcher.get("kind") != "lambda" or launcher.get("function") != limits["function"]:
        refuse(f"launcher must be this function ({limits['function']!r}), got {launcher.get('kind')!r} "
               f"{launcher.get('function')!r}")
    if storage.get("kind") != "s3" or storage.get("bucket") != limits["bucket"]:
        refuse(f"storage must be the deployment's bucket {limits['bucket']!r}")
    model_storage = (event.model or {}).get("storage")
    if model_storage is not None and (model_storage.get("kind") != "s3" or model_storage.get("bucket") != limits["bucket"]):
        refuse(f"a prepared model must be in the deployment's bucket {limits['bucket']!r}")
    if channel.get("kind") not in _AWS_CHANNELS:
        refuse(f"channel must be one of {_AWS_CHANNELS}, got {channel.get('kind')!r}")
    if channel.get("kind") == "queue" and channel.get("prefix") != limits["deployment"]:
        refuse(f"queue channel prefix must be {limits['deployment']!r}, got {channel.get('prefix')!r}")
    if channel.get("kind") == "object" and channel.get("bucket") != limits["bucket"]:
        refuse(f"object channel bucket must be {limits['bucket']!r}, got {channel.get('bucket')!r}")
    for name, config in (("launcher", launcher), ("storage", storage), ("channel", channel),
                         ("model storage", model_storage or {})):
        settings = config.get("aws") or {}
        if not isinstance(settings, dict):
            refuse(f"{name} 'aws' must be an object")
        if settings.get("endpoint_url") not in (None, limits["endpoint_url"]) or settings.get("profile"):
            refuse(f"{name} may not name an endpoint or profile of its own, got "
                   f"{settings.get('endpoint_url')!r} / {settings.get('profile')!r}")


def time_margin(budget: float) -> float:
    """Seconds kept back from Lambda's limit to write the error record and answer (10% of the
    time left, 0.5..10 s)."""
    return min(10.0, max(0.5, 0.1 * budget))


def _failure(stage: str, exc: BaseException, worker: int | None, started: float) -> dict:
    error = f"{type(exc).__name__}: {exc}"
    log("ERROR", f"failed during {stage}", worker=worker, error=error)
    return {"ok": False, "worker": worker, "stage": stage, "error": error,
            "seconds": time.perf_counter() - started}


def coordinate(request: Any) -> dict:
    """The coordinator mode: a whole run (partition, upload, launch the workers on this function,
    wait, gather, clean up) from ``{"coordinate": {run options}}``; see fsd_runtime.aws.coordinate."""
    from fsd_runtime.aws.coordinate import coordinate as run  # boto3: only in this mode

    return run(request, deployment_limits())


def handler(event: Any, context: Any) -> dict:
    """Run one worker from its event; answer ``{"ok": true, "worker", "seconds"}`` or an error.
    An event ``{"coordinate": {...}}`` runs a whole run instead and answers its JSON."""
    started = time.perf_counter()
    if isinstance(event, dict) and "coordinate" in event:
        log("INFO", "coordinating a run", request_id=request_id(context), options=event["coordinate"])
        try:
            if len(event) != 1:
                raise events.EventError(f"a coordinate event has no other fields, got {sorted(event)}")
            result = coordinate(event["coordinate"])
        except (Exception, SystemExit) as exc:  # answered, not raised (see the module notes)
            return _failure("coordinate", exc, None, started)
        return {"ok": True, "result": result, "seconds": time.perf_counter() - started}
    try:
        parsed = events.parse(event)
        limits = deployment_limits()
        if limits is not None:
            check_deployed_event(parsed, limits)
    except events.EventError as exc:
        return _failure("event validation", exc, None, started)
    budget = remaining_seconds(context)
    log("INFO", "worker starting", run=parsed.run_id, worker=parsed.worker_id,
        workers=parsed.n_workers, request_id=request_id(context), remaining_seconds=budget)
    if budget is not None:
        # Stop with a clear error (naming worker and layer, recorded for the coordinator) before
        # Lambda kills the invocation, which would leave no record at all.
        limit = budget - time_margin(budget)
        if limit <= 0:
            return _failure("start", TimeoutError(f"only {budget:.1f} s left in this invocation"),
                            parsed.worker_id, started)
        if limit < parsed.run_timeout:
            parsed = dataclasses.replace(parsed, run_timeout=limit)
        if limit < parsed.receive_timeout:
            log("WARNING", "less time left than one receive timeout", worker=parsed.worker_id,
                remaining_seconds=budget, receive_timeout=parsed.receive_timeout)
    try:
        result = run_from_event(parsed)
    except Exception as exc:  # recorded in storage by run_from_event; answered, not raised
        return _failure("run", exc, parsed.worker_id, started)
    seconds = time.perf_counter() - started
    if result is None:  # a second invocation of the same worker (at-least-once delivery)
        log("WARNING", "duplicate invocation: the worker already runs elsewhere; leaving",
            run=parsed.run_id, worker=parsed.worker_id)
        return {"ok": True, "worker": parsed.worker_id, "duplicate": True, "seconds": seconds}
    log("INFO", "worker done", run=parsed.run_id, worker=parsed.worker_id, seconds=seconds)
    return {"ok": True, "worker": parsed.worker_id, "seconds": seconds}


def main() -> int:
    """``python -m fsd_runtime.aws.handler``: the event JSON on stdin; stdout stays the caller's."""
    answer = handler(sys.stdin.buffer.read(), None)
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
