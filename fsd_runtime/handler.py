"""The Lambda entry point: ``fsd_runtime.handler.handler(event, context)``.

A thin adapter over :func:`fsd_runtime.worker.run_from_event`: validate the
event, run the worker (tree children, share from storage, channel, worker
loop, result and metrics to storage) and answer with a small JSON status.
It never raises: an asynchronous (``Event``) invoke that raises is retried
by Lambda, which would start the same worker twice; instead a failure is
logged, recorded in storage by the worker (``errors/{worker}.json``, where
the coordinator looks) and returned as ``{"ok": false, "error": ...}``.

Imports numpy, the compiled kernels and fsd_runtime only (boto3 inside the
AWS kinds the event names): this module runs inside the kernels layer.
``python -m fsd_runtime.handler`` runs it on an event read from stdin (the
``local`` invoker), logging to stderr and exiting 1 when the worker fails.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

from fsd_runtime import events, invokers
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


def _failure(stage: str, exc: BaseException, worker: int | None, started: float) -> dict:
    error = f"{type(exc).__name__}: {exc}"
    log("ERROR", f"failed during {stage}", worker=worker, error=error)
    return {"ok": False, "worker": worker, "stage": stage, "error": error,
            "seconds": time.perf_counter() - started}


def coordinate(request: Any) -> dict:
    """The coordinator mode: a whole run (partition, upload, launch the workers on this function,
    wait, gather, clean up) from ``{"coordinate": {run options}}``; see awsrun.coordinate."""
    from fsd_runtime.awsrun import coordinate as run  # boto3: only in this mode

    return run(request)


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
    except events.EventError as exc:
        return _failure("event validation", exc, None, started)
    budget = remaining_seconds(context)
    log("INFO", "worker starting", run=parsed.run_id, worker=parsed.worker_id,
        workers=parsed.n_workers, request_id=request_id(context), remaining_seconds=budget)
    if budget is not None and budget < parsed.receive_timeout:
        log("WARNING", "less time left than one receive timeout", worker=parsed.worker_id,
            remaining_seconds=budget, receive_timeout=parsed.receive_timeout)
    try:
        run_from_event(parsed)
    except Exception as exc:  # recorded in storage by run_from_event; answered, not raised
        return _failure("run", exc, parsed.worker_id, started)
    seconds = time.perf_counter() - started
    log("INFO", "worker done", run=parsed.run_id, worker=parsed.worker_id, seconds=seconds)
    return {"ok": True, "worker": parsed.worker_id, "seconds": seconds}


def main() -> int:
    """``python -m fsd_runtime.handler``: the event JSON on stdin; stdout stays the caller's."""
    answer = handler(sys.stdin.buffer.read(), None)
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
