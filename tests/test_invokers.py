"""Invokers: Lambda Event invokes, local handler processes, and AWS's RIE + awslambdaric pool."""
from __future__ import annotations

import http.client
import json
import time
import uuid

import pytest

from fsd_runtime import events
from fsd_runtime.aws import deploy, invokers
from fsd_runtime.launch import LaunchError, make_launcher

invokers.register()


def _event(tmp_path, worker: int = 0, n_workers: int = 1) -> events.WorkerEvent:
    """A valid event whose worker fails fast: its share was never stored."""
    return events.WorkerEvent(
        run_id="inv", worker_id=worker, n_workers=n_workers, fanout=2,
        storage={"kind": "local", "root": str(tmp_path)}, prefix="runs/inv",
        channel={"kind": "local", "dir": str(tmp_path)}, launcher={"kind": "local"},
        receive_timeout=5.0, run_timeout=30.0, launch_children=False)


def _wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("url", ["http://10.0.0.1:8080", "https://127.0.0.1:8080", "http://127.0.0.1",
                                 "http://example.com:80", "ftp://127.0.0.1:21", 8080, "http://127.0.0.1:x"])
def test_rie_endpoints_must_be_loopback(url):
    with pytest.raises(LaunchError):
        invokers.RieInvoker({"kind": "rie", "endpoints": [url]})


@pytest.mark.parametrize("status, body, expected", [
    (200, b'{"ok": true, "worker": 0}', None),
    (200, b'{"errorType": "ValueError", "errorMessage": "boom", "requestId": "r"}', "ValueError: boom"),
    (200, b'{"ok": false, "error": "EventError: bad"}', "EventError: bad"),
    (200, b"<html>", "not JSON"),
    (502, b"gateway", "HTTP 502"),
])
def test_rie_answers_map_to_lambda_failures(status, body, expected):
    failure = invokers.rie_failure(status, body)
    assert failure is None if expected is None else expected in failure


def test_unknown_launcher_configs_are_clear_errors():
    with pytest.raises(LaunchError, match="function"):
        make_launcher({"kind": "lambda"})
    with pytest.raises(LaunchError, match="endpoints"):
        make_launcher({"kind": "rie", "endpoints": []})


def test_local_invoker_runs_the_handler_and_reports_its_failure(tmp_path):
    launcher = make_launcher({"kind": "local"})
    assert isinstance(launcher, invokers.LocalInvoker)
    launcher.own_group = True
    try:
        launcher.launch([_event(tmp_path)])
        failures = _wait_for(launcher.failures, 60)
        assert failures == {0: "process exited with status 1"}
        assert (tmp_path / "runs" / "inv" / "errors" / "0.json").exists()  # written by the worker
    finally:
        launcher.close()


def test_lambda_invoker_sends_event_invokes(aws_settings, tmp_path):
    settings = deploy.DeploySettings(name=f"fsd-{uuid.uuid4().hex[:8]}", topics=1)
    deploy.deploy(settings, aws_settings, b"PK\x05\x06" + bytes(18))
    try:
        launcher = make_launcher({"kind": "lambda", "function": settings.name, "aws": aws_settings.to_dict()})
        launcher.launch([_event(tmp_path, w, 3) for w in range(3)])  # accepted: 202 each
        assert launcher.invocations == 3
        missing = make_launcher({"kind": "lambda", "function": "no-such-function", "aws": aws_settings.to_dict()})
        with pytest.raises(LaunchError, match="no-such-function"):
            missing.launch([_event(tmp_path)])
    finally:
        deploy.teardown(settings, aws_settings)


@pytest.fixture(scope="module")
def rie_binary():
    try:
        return invokers.rie_binary()
    except invokers.RieUnavailable as exc:
        pytest.skip(f"aws-lambda-rie cannot be obtained here: {exc}")


def test_rie_pool_runs_the_handler_under_awslambdaric(rie_binary, tmp_path):
    pytest.importorskip("awslambdaric")
    with invokers.RiePool(2, binary=rie_binary) as pool:
        assert all(url.startswith("http://127.0.0.1:") for url in pool.endpoints)
        host, port = pool.endpoints[0][len("http://"):].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request("POST", invokers.RIE_INVOKE_PATH, body=b'{"bogus": 1}')
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["ok"] is False and "EventError" in answer["error"]

        launcher = make_launcher(pool.launcher_config())
        started = time.monotonic()
        launcher.launch([_event(tmp_path, 1, 2)])  # returns once accepted, like an Event invoke
        assert time.monotonic() - started < 5
        failures = _wait_for(launcher.failures, 60)
        assert list(failures) == [1] and "no stored object" in failures[1], pool.logs()
        runtimes = [child for proc in pool._procs for child in invokers._children(proc.pid)]
        assert len(runtimes) == 2  # one awslambdaric per RIE, in process groups of their own
    time.sleep(0.2)
    assert all(_state(pid) in (None, "Z") for pid in runtimes)  # killed (a zombie until reaped)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_an_rie_pool_whose_process_is_killed_leaves_what_the_next_sweep_removes(rie_binary, tmp_path):
    """A coordinator SIGKILLed with an RIE pool (`run --invoker rie`): its RIEs (and any runtime
    they started: RIE may start one only at the first invoke) end with it, and its log directory
    is a dead run's record for `clean`."""
    import os
    import subprocess
    import sys

    from fsd_runtime import liveness

    pytest.importorskip("awslambdaric")
    script = ("import os, sys\n"
              "from fsd_runtime.aws import invokers\n"
              "pool = invokers.RiePool(2, binary=sys.argv[1]).start()\n"
              "pids = [p.pid for p in pool._procs]\n"
              "pids += [c for p in pool._procs for c in invokers._children(p.pid)]\n"
              "print(*pids, flush=True)\n"
              "os.kill(os.getpid(), 9)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", script, rie_binary], env=env, capture_output=True, text=True,
                          timeout=60)
    pids = [int(p) for p in done.stdout.split()]
    try:
        assert done.returncode == -9 and len(pids) >= 2, done
        assert _wait_for(lambda: all(_state(pid) in (None, "Z") for pid in pids), 10), "RIEs outlived their pool"
    finally:
        for pid in pids:
            if _state(pid) not in (None, "Z"):
                os.kill(pid, 9)
    assert len(liveness.sweep(str(tmp_path))) == 1 and os.listdir(tmp_path) == []
