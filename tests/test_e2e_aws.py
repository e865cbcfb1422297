"""The whole AWS path against the local AWS-API server: the handler in local processes and under
aws-lambda-rie, both channels, S3 as the run store; results bit-identical to the serial kernels.

The default suite runs a few hundred of the official images (fast); ``FSD_SLOW_TESTS=1`` adds the
full 10,000 with their 337 golden categories.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import pytest

import fsd_kernels
from fsd_runtime import cli, coordinator
from fsd_runtime.aws import deploy
from fsd_runtime.aws.clients import AwsSettings, client
from fsd_runtime.aws.run import AwsRun, RunOptions
from fsd_runtime.aws.invokers import RieUnavailable, rie_binary
from fsd_runtime.channels.queue import QueueResources

IMAGES = 240


@pytest.fixture(scope="module")
def deployment(aws_server):
    """A storage-and-topics deployment (what the local and RIE invokers need)."""
    settings = AwsSettings(region="us-east-1", endpoint_url=aws_server.endpoint_url)
    name = f"fsd-e2e-{uuid.uuid4().hex[:6]}"
    deploy.deploy(deploy.DeploySettings(name=name, topics=2, lambda_function=False), settings)
    yield name, settings
    deploy.teardown(deploy.DeploySettings(name=name, topics=2), settings)


def _aws_run(deployment, channel: str, invoker: str, workers: int) -> AwsRun:
    name, settings = deployment
    return AwsRun(RunOptions(channel=channel, invoker=invoker, deployment=name,
                             aws=AwsSettings(region="us-east-1", endpoint_url=settings.endpoint_url)), workers)


def _subset(official, start: int, stop: int):
    """Images start..stop-1 and the golden categories among them (re-based to 0)."""
    images = official.images.rows(start, stop)
    gold = official.categories[(official.categories >= start) & (official.categories < stop)] - start
    return images, gold


def _run(aws_run: AwsRun, net, images, workers: int, **kw) -> coordinator.RunResult:
    with aws_run:
        return coordinator.run_distributed(
            net, images.arrays, workers, partition="contiguous", channel=aws_run.channel_config(),
            launcher=aws_run.launcher_config(), storage=aws_run.storage, receive_timeout=60,
            run_timeout=kw.pop("run_timeout", 240), **kw)


def _assert_bit_identical(result, net, images, gold):
    serial = fsd_kernels.infer(*images.arrays, net)
    np.testing.assert_array_equal(result.categories, gold)
    np.testing.assert_array_equal(result.activations.indptr, serial.indptr)
    np.testing.assert_array_equal(result.activations.indices, serial.indices)
    assert result.activations.data.tobytes() == serial.data.tobytes()


def _leftovers(deployment) -> dict:
    """Run-scoped resources still there: run queues (``NAME_RUN_WORKER``), subscriptions to the
    deployment's topics, and any object in the bucket."""
    name, settings = deployment
    names = deploy.names_for(deploy.DeploySettings(name=name), settings)
    objects = client("s3", settings).list_objects_v2(Bucket=names.bucket).get("Contents", [])
    queues = client("sqs", settings).list_queues(QueueNamePrefix=f"{name}_").get("QueueUrls", [])
    topics = set(QueueResources(deploy.queue_config(names, settings)).existing_topics())
    subscriptions = [s["Endpoint"] for s in client("sns", settings).list_subscriptions().get("Subscriptions", [])
                     if s["TopicArn"] in topics]
    return {"objects": [o["Key"] for o in objects], "queues": queues, "subscriptions": subscriptions}


def test_object_channel_through_the_handler_is_bit_identical(deployment, official, official_packed):
    images, gold = _subset(official, 0, IMAGES)
    result = _run(_aws_run(deployment, "object", "local", 3), official_packed, images, 3)
    _assert_bit_identical(result, official_packed, images, gold)
    assert result.traffic["channel_requests"]["s3_put_requests"] > 0
    assert _leftovers(deployment) == {"objects": [], "queues": [], "subscriptions": []}


def test_two_concurrent_queue_runs_do_not_see_each_other(deployment, official, official_packed):
    """Same topics, same bucket, at the same time: each run gets exactly its own messages
    (with 2 workers every message has one target, so received == sent per run)."""
    parts = [_subset(official, 0, IMAGES), _subset(official, IMAGES, 2 * IMAGES)]
    results: dict[int, object] = {}

    def run(index: int) -> None:
        try:
            results[index] = _run(_aws_run(deployment, "queue", "local", 2), official_packed,
                                  parts[index][0], 2)
        except Exception as exc:  # reported below with the run's index
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for index, (images, gold) in enumerate(parts):
        result = results[index]
        assert not isinstance(result, Exception), f"run {index}: {result}"
        _assert_bit_identical(result, official_packed, images, gold)
        counts = result.traffic["channel_requests"]
        assert counts["messages_received"] == counts["messages_sent"] > 0
    assert results[0].run_id != results[1].run_id
    assert _leftovers(deployment) == {"objects": [], "queues": [], "subscriptions": []}


def test_cli_queue_run_reports_golden_traffic_and_cost(deployment, capsys):
    name, settings = deployment
    code = cli.main(["run", "--workers", "2", "--channel", "queue", "--images", "120", "--partition",
                     "contiguous", "--deployment", name, "--endpoint-url", settings.endpoint_url,
                     "--region", "us-east-1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["golden_match"] is True
    assert out["channel"] == "queue" and out["invoker"] == "local" and out["workers"] == 2
    cost = out["cost"]
    assert cost["usd"] == pytest.approx(sum(cost["parts"].values())) and cost["usd"] > 0
    assert cost["billed_requests"]["sns"] == out["traffic"]["channel_requests"]["sns_billed_requests"]
    assert cost["duration"].startswith("modelled") and cost["memory_mb"] == 2048
    low, high = cost["range"]["optimistic"], cost["range"]["seed-measured"]
    assert low["usd"] == cost["usd"] < high["usd"] and low["slowest_worker_s"] < high["slowest_worker_s"]
    terms = cost["duration_terms"]["optimistic"]["seconds"]
    assert terms["share_download_s"] > 0 and terms["launch_skew_s"] > 0 and terms["compute_s"] > 0
    assert set(cost["sources"]["duration_terms"]) == set(terms)
    assert _leftovers(deployment) == {"objects": [], "queues": [], "subscriptions": []}
    code = cli.main(["run", "--workers", "2", "--channel", "queue", "--images", "120", "--partition",
                     "contiguous", "--deployment", name, "--endpoint-url", settings.endpoint_url,
                     "--region", "us-east-1", "--json", "--memory-mb", "884"])
    half = json.loads(capsys.readouterr().out)["cost"]
    assert code == 0 and half["memory_mb"] == 884 and "0.500" in half["sources"]["memory_mb"]


def test_cli_without_a_deployment_says_how_to_make_one(aws_settings, capsys):
    code = cli.main(["run", "--workers", "2", "--channel", "object", "--images", "10",
                     "--deployment", "never-deployed", "--endpoint-url", aws_settings.endpoint_url])
    assert code == 2 and "fsd-inference deploy --no-lambda" in capsys.readouterr().err


def test_handler_coordinator_mode_runs_a_whole_run(deployment):
    from fsd_runtime.aws.handler import handler

    name, _ = deployment  # the server's endpoint reaches boto3 through AWS_ENDPOINT_URL, as on Lambda
    answer = handler({"coordinate": {"workers": 2, "channel": "object", "images": 120, "invoker": "local",
                                     "partition": "contiguous", "deployment": name}}, None)
    assert answer["ok"] is True, answer
    result = answer["result"]
    assert result["golden_match"] is True and result["images"] == 120 and result["cost"]["usd"] > 0
    assert _leftovers(deployment) == {"objects": [], "queues": [], "subscriptions": []}


def test_rie_end_to_end_is_bit_identical(deployment, official, official_packed):
    pytest.importorskip("awslambdaric")
    try:
        rie_binary()
    except RieUnavailable as exc:
        pytest.skip(f"aws-lambda-rie cannot be obtained here: {exc}")
    images, gold = _subset(official, 0, IMAGES)
    result = _run(_aws_run(deployment, "queue", "rie", 2), official_packed, images, 2)
    _assert_bit_identical(result, official_packed, images, gold)
    assert _leftovers(deployment) == {"objects": [], "queues": [], "subscriptions": []}


def test_worker_that_never_starts_fails_within_timeout_and_cleans_up(aws_settings, official, official_packed):
    """moto accepts the Event invoke (202) but has no Lambda runtime: the worker never runs."""
    settings = deploy.DeploySettings(name=f"fsd-gone-{uuid.uuid4().hex[:6]}", topics=1)
    deploy.deploy(settings, aws_settings, b"PK\x05\x06" + bytes(18))
    lambda_deployment = (settings.name, aws_settings)
    try:
        images, _ = _subset(official, 0, 20)
        started = time.monotonic()
        with pytest.raises(coordinator.RunError, match=r"did not finish within 3"):
            _run(_aws_run(lambda_deployment, "queue", "lambda", 2), official_packed, images, 2,
                 run_timeout=3)
        assert time.monotonic() - started < 60
        assert _leftovers(lambda_deployment) == {"objects": [], "queues": [], "subscriptions": []}
    finally:
        deploy.teardown(settings, aws_settings)


@pytest.mark.skipif(not os.environ.get("FSD_SLOW_TESTS"), reason="the full 10k run: set FSD_SLOW_TESTS=1")
@pytest.mark.parametrize("channel", ["queue", "object"])
def test_full_official_10k_reproduces_the_337_golden_categories(deployment, official, official_packed, channel):
    result = _run(_aws_run(deployment, channel, "local", 8), official_packed, official.images, 8)
    assert len(official.categories) == 337
    _assert_bit_identical(result, official_packed, official.images, official.categories)
