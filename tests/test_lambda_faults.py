"""Lambda's failure modes, injected through the local AWS-API server and the handler:

* an event inside a deployed function may name only this deployment's AWS kinds, within its limits;
* a worker checks its run exists before it starts any tree child;
* a worker invoked twice (async invokes are at-least-once): the duplicate leaves, results bit-identical;
* Invoke throttled (TooManyRequestsException): backoff, then a clear error;
* a worker running out of Lambda time: a clear error naming worker and layer before the limit.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest

from fsd_runtime.aws import deploy
from fsd_runtime import events as ev
from fsd_runtime import launch, model, partition
from fsd_runtime import worker as worker_module
from fsd_runtime.aws.clients import client
from fsd_runtime.coordinator import run_distributed
from fsd_runtime.aws.handler import ENV_BUCKET, ENV_DEPLOYMENT, ENV_MAX_FANOUT, ENV_MAX_WORKERS, handler
from fsd_runtime.plan import build_shares
from fsd_runtime.aws.s3storage import S3Storage
from fsd_runtime.storage import LocalStorage, StorageError
from fsd_runtime.worker import ThreadLauncher, run_from_event

LAYER = b"PK\x05\x06" + bytes(18)


@pytest.fixture(scope="module")
def small():
    ds = model.synthetic(128, 6, 40, seed=3)
    return ds, ds.network.pack()


@pytest.fixture
def bucket(aws_settings):
    name = f"fsd-faults-{uuid.uuid4().hex[:10]}"
    client("s3", aws_settings).create_bucket(Bucket=name)
    return name


def _deployed_event(**changes) -> dict:
    event = ev.WorkerEvent(
        run_id="r1", worker_id=0, n_workers=4, fanout=2,
        storage={"kind": "s3", "bucket": "fsd-x-b", "aws": {"region": "us-east-1"}}, prefix="runs/r1",
        channel={"kind": "queue", "prefix": "fsd-x", "aws": {"region": "us-east-1"}},
        launcher={"kind": "lambda", "function": "fsd-x", "aws": {"region": "us-east-1"}}).to_dict()
    event.update(changes)
    return event


def test_handler_and_deploy_agree_on_the_environment_names():
    assert (ENV_DEPLOYMENT, ENV_BUCKET, ENV_MAX_WORKERS, ENV_MAX_FANOUT) == (
        deploy.ENV_DEPLOYMENT, deploy.ENV_BUCKET, deploy.ENV_MAX_WORKERS, deploy.ENV_MAX_FANOUT)
    env = deploy.function_environment(deploy.DeploySettings(name="fsd-x"), "fsd-x-b")
    assert env[ENV_DEPLOYMENT] == "fsd-x" and env[ENV_BUCKET] == "fsd-x-b"


@pytest.mark.parametrize("change, what", [
    ({"n_workers": 9}, "9 workers exceed"),
    ({"fanout": 5}, "fan-out 5 exceeds"),
    ({"launcher": {"kind": "process"}}, "launcher must be this function"),
    ({"launcher": {"kind": "rie", "endpoints": ["http://127.0.0.1:9"]}}, "launcher must be this function"),
    ({"launcher": {"kind": "lambda", "function": "someone-else"}}, "launcher must be this function"),
    ({"storage": {"kind": "local", "root": "/tmp"}}, "storage must be"),
    ({"storage": {"kind": "s3", "bucket": "other-bucket"}}, "storage must be"),
    ({"channel": {"kind": "local", "dir": "/tmp"}}, "channel must be"),
    ({"channel": {"kind": "queue", "prefix": "fsd"}}, "prefix must be"),
    ({"channel": {"kind": "object", "bucket": "other-bucket"}}, "bucket must be"),
    ({"channel": {"kind": "queue", "prefix": "fsd-x", "aws": {"endpoint_url": "http://10.0.0.1"}}},
     "endpoint"),
    ({"storage": {"kind": "s3", "bucket": "fsd-x-b", "aws": {"profile": "admin"}}}, "profile"),
])
def test_inside_a_deployment_events_name_only_its_own_aws_kinds(monkeypatch, aws_settings, change, what):
    for key, value in {ENV_DEPLOYMENT: "fsd-x", ENV_BUCKET: "fsd-x-b", ENV_MAX_WORKERS: "8",
                       ENV_MAX_FANOUT: "4", "AWS_LAMBDA_FUNCTION_NAME": "fsd-x"}.items():
        monkeypatch.setenv(key, value)
    answer = handler(_deployed_event(**change), None)
    assert answer["ok"] is False and answer["stage"] == "event validation", answer
    assert what in answer["error"] and "fsd-x" in answer["error"]
    # the event as the deployment makes it passes validation (and fails later: there is no run)
    answer = handler(_deployed_event(), None)
    assert answer["ok"] is False and answer["stage"] == "run" and "no share" in answer["error"]


def test_any_event_has_hard_caps():
    for change in ({"n_workers": 100_000, "worker_id": 0}, {"fanout": 1000}):
        with pytest.raises(ev.EventError):
            ev.parse(_deployed_event(**change))


class _Recorder(launch.Launcher):
    def __init__(self):
        self.launched = []

    def launch(self, events):
        self.launched.extend(e.worker_id for e in events)


def test_a_worker_of_a_missing_run_starts_no_children(tmp_path):
    event = _deployed_event(storage={"kind": "local", "root": str(tmp_path)}, fanout=3, n_workers=40)
    recorder = _Recorder()
    with pytest.raises(StorageError, match="no share for worker 0; no children started"):
        run_from_event(event, storage=LocalStorage(str(tmp_path)), launcher=recorder)
    assert recorder.launched == []


class _TwiceLauncher(ThreadLauncher):
    """Every worker invoked twice, concurrently (what at-least-once async invokes can do)."""

    answers: list = []

    def launch(self, events):
        for event in events:
            for _ in range(2):
                def target(event=event):
                    try:
                        _TwiceLauncher.answers.append((event.worker_id, run_from_event(event, launcher=self)))
                    except BaseException as exc:
                        self._errors[event.worker_id] = f"{type(exc).__name__}: {exc}"
                thread = threading.Thread(target=target, daemon=True)
                thread.start()
                self._threads.append(thread)


@pytest.mark.parametrize("channel_kind", ["object", "local"])
def test_duplicate_invocations_leave_and_results_stay_bit_identical(aws_settings, bucket, small, channel_kind):
    from fsd_kernels import infer

    ds, net = small
    launch.register_launcher("twice", lambda config: _TwiceLauncher(config))
    _TwiceLauncher.answers = []
    store = S3Storage(bucket, aws_settings)
    channel = ({"kind": "object", "bucket": bucket, "aws": aws_settings.to_dict(), "create_bucket": False}
               if channel_kind == "object" else {"kind": "local"})
    result = run_distributed(net, ds.images.arrays, 4, partition="contiguous", channel=channel,
                             launcher={"kind": "twice"}, storage=store, receive_timeout=30)
    want = infer(*ds.images.arrays, net)
    for got, expected in zip(result.activations[:3], want[:3]):
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
    time.sleep(0.2)
    by_worker = {}
    for worker, answer in _TwiceLauncher.answers:
        by_worker.setdefault(worker, []).append(answer)
    assert sorted(by_worker) == [0, 1, 2, 3]
    for worker, answers in by_worker.items():  # exactly one ran, the duplicate left with None
        assert len(answers) == 2 and sum(a is None for a in answers) == 1, (worker, answers)
    assert store.list("runs") == []  # the run's objects (claims too) are gone


@pytest.fixture
def function(aws_settings):
    settings = deploy.DeploySettings(name=f"fsd-th-{uuid.uuid4().hex[:6]}", topics=1)
    deploy.deploy(settings, aws_settings, LAYER)
    yield settings.name
    deploy.teardown(settings, aws_settings)


def test_throttled_invoke_backs_off_then_fails_clearly(aws, aws_settings, function):
    from fsd_runtime.aws.invokers import LambdaInvoker

    event = ev.parse(_deployed_event(launcher={"kind": "lambda", "function": function}))
    config = {"kind": "lambda", "function": function, "aws": aws_settings.to_dict()}
    invoker = LambdaInvoker(config)
    aws.throttle("Invoke", 3)
    invoker.launch([event])  # accepted on the 4th attempt
    assert invoker._call.retries["Invoke"] == 3 and aws.requests["Invoke"] == 4
    few = LambdaInvoker({**config, "aws": {**aws_settings.to_dict(), "max_attempts": 3}})
    aws.throttle("Invoke", 10)
    started = time.monotonic()
    with pytest.raises(launch.LaunchError, match=r"worker 0.*TooManyRequestsException.*3 attempts|"
                                                 r"worker 0.*3 attempts.*TooManyRequests"):
        few.launch([event])
    assert time.monotonic() - started < 5


class _Context:
    aws_request_id = "req-1"

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def test_worker_out_of_lambda_time_fails_clearly_before_the_limit(aws_settings, bucket, small):
    """Worker 1 never starts, receive_timeout is 60 s, but the invocation has 3 s left: worker 0
    fails naming itself and layer 1, records it, and answers before Lambda's limit."""
    ds, net = small
    store = S3Storage(bucket, aws_settings)
    shares = build_shares(net, *ds.images.arrays, partition.contiguous(128, 6, 2))
    prefix = "runs/late"
    for share in shares:
        store.put(ev.share_key(prefix, share.worker), share.to_bytes())
    event = ev.WorkerEvent(run_id="late", worker_id=0, n_workers=2, fanout=2, storage=store.config(),
                           prefix=prefix, launcher={"kind": "thread"}, launch_children=False,
                           channel={"kind": "object", "bucket": bucket, "aws": aws_settings.to_dict(),
                                    "create_bucket": False},
                           receive_timeout=60, run_timeout=900).to_dict()
    context = _Context(3.0)
    answer = handler(event, context)
    left = context.get_remaining_time_in_millis() / 1000
    assert answer["ok"] is False and left > 0, (answer, left)
    assert "worker 0, layer 1" in answer["error"] and "time is up" in answer["error"]
    record = json.loads(store.get(ev.error_key(prefix, 0)))
    assert record["worker"] == 0 and record["layer"] == 1
    store.delete_prefix(prefix)


def test_killed_coordinator_leaves_nothing_after_cleanup(aws_settings, capsys):
    """What a coordinator killed mid-run leaves (run queues, their subscriptions, run objects) is
    removed by ``fsd-inference cleanup``; a worker still polling its queue then fails at once; a
    deployment whose name extends ours keeps everything."""
    from fsd_runtime import cli
    from fsd_runtime.channels.base import ChannelError
    from fsd_runtime.channels.queue import QueueChannel, QueueResources

    name = f"fsd-k{uuid.uuid4().hex[:6]}"
    mine, other = (deploy.DeploySettings(name=n, topics=2, lambda_function=False) for n in (name, f"{name}-x"))
    for settings in (mine, other):
        deploy.deploy(settings, aws_settings)
    try:
        names = {s.name: deploy.names_for(s, aws_settings) for s in (mine, other)}
        runs = {}
        for settings in (mine, other):
            runs[settings.name] = QueueResources(deploy.queue_config(names[settings.name], aws_settings)) \
                .create_run("dead", 2, probe_timeout=30).to_dict()
            store = S3Storage(names[settings.name].bucket, aws_settings)
            for key in ("runs/dead/shares/0.npz", "runs/dead/claims/0", "fsd-runs/dead/s00000001/w00000/p000"):
                store.put(key, b"x")
        sqs, sns = client("sqs", aws_settings), client("sns", aws_settings)

        def leftovers(n: str) -> dict:
            subs = [s for t in names[n].topic_arns()
                    for s in sns.list_subscriptions_by_topic(TopicArn=t)["Subscriptions"]]
            return {"queues": len(sqs.list_queues(QueueNamePrefix=f"{n}_").get("QueueUrls", [])),
                    "subscriptions": len(subs),
                    "objects": len(S3Storage(names[n].bucket, aws_settings).list("runs")
                                   + S3Storage(names[n].bucket, aws_settings).list("fsd-runs"))}

        before = {"queues": 2, "subscriptions": 4, "objects": 3}
        assert leftovers(name) == before and leftovers(other.name) == before
        assert deploy.cleanup(mine, aws_settings, older_than_s=3600) == []  # too young: maybe running
        assert deploy.sweep_stale_queues(names[name], aws_settings) == []
        worker = QueueChannel.from_config(runs[name], 0, 2, "dead")
        where = ["--deployment", name, "--endpoint-url", aws_settings.endpoint_url, "--region", "us-east-1",
                 "--topics", "2"]
        assert cli.main(["cleanup", *where]) == 0
        out = capsys.readouterr().out
        assert f"deleted leftover run queue {name}_dead_0" in out and "3 leftover run objects" in out
        assert leftovers(name) == {"queues": 0, "subscriptions": 0, "objects": 0}
        assert leftovers(other.name) == before  # the prefix-sharing deployment is untouched
        started = time.monotonic()
        with pytest.raises(ChannelError):
            worker.receive(0, 20)  # its queue is gone: the worker fails now, not at its timeout
        assert time.monotonic() - started < 5
        worker.close()
        assert cli.main(["cleanup", *where]) == 0 and capsys.readouterr().out == "nothing to delete\n"
    finally:
        for settings in (mine, other):
            deploy.teardown(settings, aws_settings)


class _DyingLauncher(ThreadLauncher):
    """Worker 2 dies as it starts, leaving no record (an out-of-memory kill on Lambda)."""

    def launch(self, events):
        super().launch([e for e in events if e.worker_id != 2])


def test_a_dying_worker_fails_the_run_promptly_and_every_run_resource_goes(aws_settings, bucket, small):
    from fsd_runtime.coordinator import RunError

    ds, net = small
    launch.register_launcher("dying", lambda config: _DyingLauncher(config))
    store = S3Storage(bucket, aws_settings)
    channel = {"kind": "object", "bucket": bucket, "aws": aws_settings.to_dict(), "create_bucket": False}
    started = time.monotonic()
    with pytest.raises(RunError, match=r"layer 1: .*from worker\(s\) \[2\]") as info:
        run_distributed(net, ds.images.arrays, 4, partition="contiguous", channel=channel,
                        launcher={"kind": "dying"}, storage=store, receive_timeout=2, run_timeout=120)
    # the receive timeout plus the start-up grace of a 4-worker tree (nobody watches Lambda
    # workers), plus planning on a loaded machine: far below the run timeout
    grace = worker_module.STARTUP_SECONDS_PER_LEVEL * launch.tree_depth(4, 2)
    assert time.monotonic() - started < 2 + grace + 15 < 120
    assert "layer" in str(info.value)
    time.sleep(0.5)  # let the surviving threads finish writing
    leftover = client("s3", aws_settings).list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in leftover if not o["Key"].startswith("runs/")
            or "/errors/" not in o["Key"]] == []  # at most a late error record (expires in a day)
