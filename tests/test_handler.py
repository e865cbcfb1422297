"""The Lambda handler: bad events get a clear answer (never an exception), failures are recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fsd_runtime import events
from fsd_runtime.aws.handler import handler
from fsd_runtime.storage import LocalStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _event(tmp_path, **changes) -> dict:
    event = events.WorkerEvent(
        run_id="run1", worker_id=0, n_workers=1, fanout=2,
        storage={"kind": "local", "root": str(tmp_path)}, prefix="runs/run1",
        channel={"kind": "local", "dir": str(tmp_path)}, launcher={"kind": "local"},
        receive_timeout=5.0, run_timeout=30.0, launch_children=False).to_dict()
    event.update(changes)
    return event


@pytest.mark.parametrize("change, field", [
    ({"worker_id": 5}, "worker_id"),
    ({"n_workers": 0}, "n_workers"),
    ({"run_id": "../etc"}, "run_id"),
    ({"prefix": "/abs/../x"}, "prefix"),
    ({"storage": "s3://bucket"}, "storage"),
    ({"receive_timeout": -1}, "receive_timeout"),
    ({"version": 99}, "version"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_event_is_answered_with_the_field(tmp_path, change, field):
    answer = handler(_event(tmp_path, **change), None)
    assert answer["ok"] is False and answer["stage"] == "event validation"
    assert answer["error"].startswith("EventError") and field in answer["error"]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"{}", None, 42,
                                 "[" * 100_000 + "]" * 100_000])  # nested past the parser's depth
def test_malformed_payloads_are_answered(raw):
    answer = handler(raw, None)
    assert answer["ok"] is False and answer["worker"] is None
    assert "EventError" in answer["error"]


def test_worker_failure_is_answered_and_recorded_for_the_coordinator(tmp_path):
    answer = handler(_event(tmp_path), None)  # valid event, but no share was ever stored
    assert answer["ok"] is False and answer["stage"] == "run" and answer["worker"] == 0
    assert "no stored object" in answer["error"]
    record = json.loads(LocalStorage(str(tmp_path)).get(events.error_key("runs/run1", 0)))
    assert record["worker"] == 0 and "StorageError" in record["error"]


def test_context_budget_is_read_and_logged(tmp_path, capsys):
    class Context:
        aws_request_id = "req-123"

        def get_remaining_time_in_millis(self):
            return 2500

    handler(_event(tmp_path), Context())
    logs = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    start = next(r for r in logs if r["message"] == "worker starting")
    assert start["request_id"] == "req-123" and start["remaining_seconds"] == 2.5
    assert any(r["level"] == "WARNING" and r["remaining_seconds"] == 2.5 for r in logs)


def test_module_entry_point_exit_status_and_clean_stdout():
    done = subprocess.run([sys.executable, "-m", "fsd_runtime.aws.handler"], input=b'{"run_id": 1}',
                          capture_output=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and done.stdout == b""
    record = json.loads(done.stderr.decode().strip().splitlines()[-1])
    assert record["level"] == "ERROR" and "EventError" in record["error"]


#: Records which modules were on the stack when scipy was first imported.
_WATCH_SCIPY = """
import json, sys, traceback
class Watch:
    importers = None
    def find_spec(self, name, path=None, target=None):
        if name == "scipy" and Watch.importers is None:
            Watch.importers = [f.filename for f in traceback.extract_stack()]
        return None
sys.meta_path.insert(0, Watch())
import fsd_runtime.aws.handler, fsd_kernels
print(json.dumps({"boto3": "boto3" in sys.modules, "numba": "numba" in sys.modules,
                  "backend": fsd_kernels.backend, "scipy_importers": Watch.importers}))
"""


def test_handler_imports_neither_scipy_nor_boto3():
    done = subprocess.run([sys.executable, "-c", _WATCH_SCIPY], capture_output=True, cwd=ROOT,
                          timeout=120, check=True)
    loaded = json.loads(done.stdout)
    assert not loaded["boto3"]
    assert not loaded["numba"] or loaded["backend"] == "jit"  # native kernels never need numba
    if loaded["scipy_importers"] is not None:  # only numba itself may pull scipy in (JIT backend)
        first_non_import = [f for f in loaded["scipy_importers"] if "importlib" not in f and "<frozen" not in f]
        assert any(os.sep + "numba" + os.sep in f for f in first_non_import), first_non_import


@pytest.mark.parametrize("request_, message", [
    ({"workers": 2, "channel": "queue", "weights": "/etc"}, "may not set: ['weights']"),
    ({"workers": 2, "channel": "local"}, "(queue or object)"),
    ({"workers": "two", "channel": "queue"}, "not valid run options"),
    ({"workers": 2, "channel": "queue", "images": [1]}, "number or a string"),
    ({"channel": "queue"}, "needs 'workers'"),
    ("--workers 2", "must be an object"),
])
def test_bad_coordinate_requests_are_answered(request_, message):
    answer = handler({"coordinate": request_}, None)
    assert answer["ok"] is False and answer["stage"] == "coordinate" and message in answer["error"]


def test_coordinate_event_takes_no_other_fields():
    answer = handler({"coordinate": {"workers": 2, "channel": "queue"}, "worker_id": 0}, None)
    assert answer["ok"] is False and "no other fields" in answer["error"]
