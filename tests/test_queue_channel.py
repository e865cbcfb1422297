"""QueueChannel (SNS+SQS) against the local AWS-API server: real HTTP, real retries."""
from __future__ import annotations

import itertools
import json
import time
import uuid

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fsd_kernels import codec
from fsd_runtime.aws.clients import client as aws_client
from fsd_runtime.channels import ChannelError, make_channel
from fsd_runtime.channels.queue import (MAX_BATCH_ENTRIES, QueueChannel, QueueConfig, QueueResources,
                                        pack_batches, queue_name)


def chunks_for(source: int, target: int, *, run: str, layer: int = 0, rows: int = 3, images: int = 50,
               seed: int = 0, max_bytes: int | None = None) -> list[bytes]:
    """Real codec chunks of a random block ``source`` sends ``target``."""
    rng = np.random.default_rng([seed, source, target, layer])
    dense = rng.random((rows, images), dtype=np.float32) * (rng.random((rows, images)) < 0.3)
    neurons, imgs = np.nonzero(dense)
    return codec.encode(neurons.astype(np.int32), imgs.astype(np.int32), dense[neurons, imgs],
                        n_images=images, layer=layer, source=source, target=target,
                        run_id=run.encode()[:16], max_bytes=max_bytes)


def header_key(chunk: bytes) -> tuple:
    h = codec.decode_header(chunk)
    return (*h.key, h.chunk)


def receive_all(channel: QueueChannel, expected: int, step: int = 0, timeout: float = 10.0) -> list[bytes]:
    """What the worker loop does: receive until ``expected`` distinct chunks are in, dropping duplicates."""
    seen: dict[tuple, bytes] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < expected and time.monotonic() < deadline:
        for chunk in channel.receive(step, timeout=min(2.0, deadline - time.monotonic())):
            seen.setdefault(header_key(chunk), chunk)
    return sorted(seen.values())


@pytest.fixture
def run(aws, aws_settings):
    """Create a run's queues for ``n`` workers; tear down at the end."""
    made = []

    def make(n_workers: int, **options) -> tuple[dict, list[QueueChannel]]:
        run_id = f"r{uuid.uuid4().hex[:12]}"
        base = {"kind": "queue", "prefix": f"q{uuid.uuid4().hex[:6]}", "aws": aws_settings.to_dict(), **options}
        config = QueueChannel.create_run(base, run_id, n_workers)
        channels = [make_channel(config, w, n_workers, run_id) for w in range(n_workers)]
        made.append((config, run_id, n_workers, channels))
        aws.requests.clear()                                    # count what the channels do
        return config, channels

    yield make
    for config, run_id, n_workers, channels in made:
        for channel in channels:
            channel.close()
        QueueChannel.delete_run(config, run_id, n_workers)


# -- packing --------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 1000), max_size=60), st.integers(1000, 3000))
def test_pack_batches_respects_limits_and_is_near_optimal(sizes, limit):
    batches = pack_batches(sizes, limit)
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(sizes)))
    assert all(len(b) <= MAX_BATCH_ENTRIES and sum(sizes[i] for i in b) <= limit for b in batches)
    # First fit: any two batches that are not full by count hold more than ``limit`` together
    # (every item of the later one did not fit the earlier), so there are at most 2 x the size
    # bound + 1 of them, plus the batches that are full by count.
    size_bound = -(-sum(sizes) // limit)
    count_full = sum(len(b) == MAX_BATCH_ENTRIES for b in batches)
    assert count_full <= len(sizes) // MAX_BATCH_ENTRIES
    assert len(batches) - count_full <= 2 * size_bound + 1


def test_pack_batches_refuses_an_oversized_message():
    with pytest.raises(ChannelError, match="exceeds"):
        pack_batches([10, 5000], 4096)


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown fields"):
        QueueConfig.parse({"kind": "queue", "topicz": 3})
    with pytest.raises(ValueError, match="max_message_bytes"):
        QueueConfig.parse({"kind": "queue", "max_message_bytes": 2 * 1024 * 1024})
    with pytest.raises(ValueError, match="lacks the run's resources"):
        QueueChannel.from_config({"kind": "queue"}, 0, 2, "run")


# -- round trips ---------------------------------------------------------------------------------

def test_every_chunk_reaches_exactly_its_targets(run, aws):
    config, channels = run(3, topics=2)
    sent = {w: [] for w in range(3)}
    for source, channel in enumerate(channels):
        outgoing = []
        for target in range(3):
            if target != source:
                for chunk in chunks_for(source, target, run="a"):
                    outgoing.append((target, chunk))
                    sent[target].append(chunk)
        channel.send(0, outgoing)
    for w, channel in enumerate(channels):
        assert receive_all(channel, len(sent[w])) == sorted(sent[w])
        assert channel.receive(0, timeout=0.2) == []
    # 3 workers x 1 batch each: one PublishBatch per worker, spread over both topics
    assert aws.requests["PublishBatch"] == 3
    assert sum(c.counts["sns_publish_calls"] for c in channels) == 3
    assert len(config["topic_arns"]) == 2 and len(config["queue_urls"]) == 3


def test_a_chunk_several_targets_need_is_published_once(run, aws):
    _, channels = run(4)
    shared = chunks_for(0, 1, run="b")[0]
    channels[0].send(5, [(1, shared), (2, shared), (3, shared)])
    assert channels[0].counts["messages_sent"] == 1 and aws.requests["PublishBatch"] == 1
    for w in (1, 2, 3):
        assert receive_all(channels[w], 1, step=5) == [shared]
    assert channels[0].receive(5, timeout=0.2) == []


def test_batches_never_exceed_ten_entries_or_the_size_limit(run, aws):
    _, channels = run(2)
    outgoing = [(1, c) for layer in range(23) for c in chunks_for(0, 1, run="c", layer=layer, rows=40,
                                                                   images=300, max_bytes=60_000)]
    sizes = [len(codec.to_text(c)) for _, c in outgoing]
    channels[0].send(0, outgoing)
    expected = pack_batches([s + 50 for s in sizes], channels[0].config.max_message_bytes)
    assert aws.requests["PublishBatch"] == channels[0].counts["sns_publish_calls"] >= len(outgoing) / 10
    assert len(expected) - 1 <= aws.requests["PublishBatch"] <= len(expected) + 1
    # billed requests follow the 64 KiB rule
    assert channels[0].counts["sns_billed_requests"] >= channels[0].counts["bytes_sent"] / 65536
    assert receive_all(channels[1], len(outgoing)) == sorted(c for _, c in outgoing)


def test_a_big_block_is_split_to_the_channel_limit_and_reassembled(run):
    _, channels = run(2)
    rng = np.random.default_rng(7)
    dense = rng.random((200, 1000), dtype=np.float32)
    neurons, images = np.nonzero(dense)
    chunks = codec.encode(neurons.astype(np.int32), images.astype(np.int32), dense[neurons, images],
                          n_images=1000, source=0, target=1, max_bytes=channels[0].max_chunk_bytes)
    assert len(chunks) >= 3 and all(len(c) <= channels[0].max_chunk_bytes for c in chunks)
    channels[0].send(0, [(1, c) for c in chunks])
    assembler = codec.Assembler()
    messages = [m for c in receive_all(channels[1], len(chunks)) if (m := assembler.add(c)) is not None]
    assert len(messages) == 1
    np.testing.assert_array_equal(messages[0].values.view(np.uint32), dense[neurons, images].view(np.uint32))
    with pytest.raises(ChannelError, match="max_chunk_bytes"):
        channels[0].send(0, [(1, b"x" * (channels[0].max_chunk_bytes + 1))])


def test_message_size_limit_up_to_one_mib_is_configurable(run):
    config, channels = run(2, max_message_bytes=200_000)
    assert channels[0].max_chunk_bytes < 200_000 * 4 // 5
    assert QueueConfig.parse(config).max_message_bytes == 200_000


# -- faults --------------------------------------------------------------------------------------

def test_duplicated_and_reordered_deliveries_lose_nothing(run, aws):
    _, channels = run(2)
    chunks = [c for layer in range(6) for c in chunks_for(0, 1, run="d", layer=layer)]
    channels[0].send(0, [(1, c) for c in chunks])
    aws.mangle_receives(5)
    got = []
    deadline = time.monotonic() + 10
    while len(set(got)) < len(chunks) and time.monotonic() < deadline:
        got.extend(channels[1].receive(0, timeout=2))
    assert len(got) > len(chunks)                          # duplicates did arrive ...
    assert sorted(set(got)) == sorted(chunks)              # ... and dedup by header recovers the set
    assert len({header_key(c) for c in got}) == len(chunks)


def test_throttling_is_retried_with_backoff(run, aws):
    _, channels = run(2)
    chunk = chunks_for(0, 1, run="e")[0]
    aws.throttle("PublishBatch", 2)
    aws.throttle("ReceiveMessage", 3)
    channels[0].send(0, [(1, chunk)])
    assert receive_all(channels[1], 1) == [chunk]
    assert channels[0].call.retries["PublishBatch"] == 2
    assert channels[1].call.retries["ReceiveMessage"] == 3
    assert aws.requests["PublishBatch"] == 3
    # every attempt is priced: three publishes of one 64 KiB unit; receives: the three throttled
    # attempts beside the calls made (each billed at least one unit)
    assert channels[0].counts["sns_publish_calls"] == 1 and channels[0].counts["sns_billed_requests"] == 3
    received = channels[1].counts
    assert received["sqs_billed_requests"] == received["sqs_receive_calls"] + 3


def test_throttling_that_never_ends_is_a_channel_error(aws, aws_settings, run):
    config, _ = run(2)
    config = {**config, "aws": {**config["aws"], "max_attempts": 3}}
    channel = make_channel(config, 0, 2, "stuck")
    aws.throttle("PublishBatch", 100)
    with pytest.raises(ChannelError, match="PublishBatch still failing after 3 attempts"):
        channel.send(0, [(1, b"payload")])
    assert aws.requests["PublishBatch"] == 3
    channel.close()


def test_an_unreachable_endpoint_is_retried_then_a_channel_error():
    import socket

    from fsd_runtime.aws.clients import AwsSettings, Caller

    with socket.socket() as probe:                      # a free port on 127.0.0.1 nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = AwsSettings(region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=3,
                           backoff_base=0.001)
    call = Caller(settings)
    with pytest.raises(ChannelError, match="ListTopics still failing after 3 attempts"):
        call("ListTopics", aws_client("sns", settings).list_topics)
    assert call.attempts["ListTopics"] == 3 and call.retries["ListTopics"] == 2
    with pytest.raises(ValueError, match="region"):
        AwsSettings.from_dict({"region": 5})


def test_failed_batch_entries_are_resent_with_their_payload(run, aws):
    _, channels = run(2)
    chunks = [c for layer in range(5) for c in chunks_for(0, 1, run="f", layer=layer)]
    aws.fail_batch_entries(times=1, first=3)
    channels[0].send(0, [(1, c) for c in chunks])
    assert channels[0].counts["sns_entries_resent"] == 3
    assert aws.requests["PublishBatch"] == 2
    assert receive_all(channels[1], len(chunks)) == sorted(chunks)


def test_foreign_messages_are_skipped_and_a_malformed_chunk_is_a_clear_error(run, aws_settings):
    config, channels = run(2)
    sqs = aws_client("sqs", aws_settings)
    queue = config["queue_urls"][1]
    attributes = lambda run_id, targets: {  # noqa: E731
        "run": {"DataType": "String", "StringValue": run_id},
        "target": {"DataType": "String.Array", "StringValue": json.dumps(targets)}}
    sqs.send_message(QueueUrl=queue, MessageBody="no attributes at all")
    sqs.send_message(QueueUrl=queue, MessageBody="other run", MessageAttributes=attributes("other", ["1"]))
    sqs.send_message(QueueUrl=queue, MessageBody="other target", MessageAttributes=attributes(
        channels[1].run_id, ["0"]))
    sqs.send_message(QueueUrl=queue, MessageBody="nested target", MessageAttributes={
        "run": {"DataType": "String", "StringValue": channels[1].run_id},
        "target": {"DataType": "String.Array", "StringValue": "[" * 50_000 + "]" * 50_000}})
    sqs.send_message(QueueUrl=queue, MessageBody=".probe 0")
    assert channels[1].receive(0, timeout=1) == []
    assert channels[1].counts["foreign_skipped"] == 4 and channels[1].counts["probes_skipped"] == 1
    sqs.send_message(QueueUrl=queue, MessageBody="not base85 ~~~ {",
                     MessageAttributes=attributes(channels[1].run_id, ["1"]))
    with pytest.raises(ChannelError, match="not an encoded chunk"):
        channels[1].receive(0, timeout=2)


def test_a_run_starts_only_once_every_subscription_delivers(aws, aws_settings):
    config = QueueConfig.parse({"kind": "queue", "prefix": f"p{uuid.uuid4().hex[:6]}", "topics": 2,
                                "aws": aws_settings.to_dict()})
    resources = QueueResources(config)
    try:
        aws.swallow_publishes(2)                     # the first probe of each topic goes nowhere
        made = resources.create_run("probed", 3, probe_resend=1)
        assert aws.requests["PublishBatch"] == 4     # 2 swallowed, 2 sent again
        channel = QueueChannel(made, 0, 3, "probed")
        assert channel.receive(0, timeout=0.2) == [] # the probes were consumed by create_run
        channel.close()
        aws.swallow_publishes(100)
        with pytest.raises(ChannelError, match="still not delivering"):
            resources.create_run("never", 2, probe_timeout=2, probe_resend=1)
    finally:
        resources.delete_run("probed", 3)
        resources.delete_run("never", 2)


def test_a_run_whose_set_up_fails_part_way_leaves_no_queue_or_subscription(aws, aws_settings):
    """create_run failing (or interrupted) after some queues and subscriptions exist: its
    caller has no config to delete them with, so create_run deletes them itself."""
    prefix = f"pf{uuid.uuid4().hex[:6]}"
    config = QueueConfig.parse({"kind": "queue", "prefix": prefix, "topics": 2, "aws": aws_settings.to_dict()})
    resources = QueueResources(config)
    aws.swallow_publishes(100)  # every subscription made, none delivers
    with pytest.raises(ChannelError, match="still not delivering"):
        resources.create_run("halfway", 2, probe_timeout=1, probe_resend=0.5)
    aws.faults.clear()
    sqs, sns = aws_client("sqs", aws_settings), aws_client("sns", aws_settings)
    assert sqs.list_queues(QueueNamePrefix=f"{prefix}_").get("QueueUrls", []) == []
    queues = {f":{queue_name(prefix, 'halfway', w)}" for w in range(2)}
    assert not [s for s in sns.list_subscriptions()["Subscriptions"] if any(s["Endpoint"].endswith(q) for q in queues)]


def test_receive_times_out_empty_and_in_time(run):
    _, channels = run(2)
    start = time.monotonic()
    assert channels[1].receive(0, timeout=1.0) == []
    assert 0.9 <= time.monotonic() - start < 3.0
    start = time.monotonic()
    assert channels[1].receive(0, timeout=0.3) == []          # one short poll
    assert time.monotonic() - start < 0.5


# -- runs ----------------------------------------------------------------------------------------

def test_two_concurrent_runs_on_the_same_topics_do_not_see_each_other(run):
    config_a, run_a = run(2, prefix="shared")
    config_b, run_b = run(2, prefix="shared")
    assert config_a["topic_arns"] == config_b["topic_arns"]
    a, b = chunks_for(0, 1, run="A"), chunks_for(0, 1, run="B", seed=1)
    run_a[0].send(0, [(1, c) for c in a])
    run_b[0].send(0, [(1, c) for c in b])
    assert receive_all(run_a[1], len(a)) == sorted(a)
    assert receive_all(run_b[1], len(b)) == sorted(b)
    assert run_a[1].receive(0, timeout=0.3) == [] and run_b[1].receive(0, timeout=0.3) == []


def test_deleting_messages_is_an_option_that_costs_one_call_per_receive(run, aws):
    _, channels = run(2, delete_messages=True)
    chunks = chunks_for(0, 1, run="g")
    channels[0].send(0, [(1, c) for c in chunks])
    assert receive_all(channels[1], len(chunks)) == sorted(chunks)
    non_empty = channels[1].counts["sqs_receive_calls"] - (aws.requests["ReceiveMessage"]
                                                           - channels[1].counts["sqs_receive_calls"])
    assert aws.requests["DeleteMessageBatch"] == channels[1].counts["sqs_delete_calls"] >= 1
    assert non_empty >= 1


def test_delete_run_removes_queues_and_subscriptions_and_is_idempotent(aws, aws_settings):
    base = {"kind": "queue", "prefix": f"td{uuid.uuid4().hex[:6]}", "topics": 2, "aws": aws_settings.to_dict()}
    config = QueueChannel.create_run(base, "gone", 3)
    again = QueueChannel.create_run(base, "gone", 3)            # idempotent set-up
    assert again["queue_urls"] == config["queue_urls"] and again["topic_arns"] == config["topic_arns"]
    sns = aws_client("sns", aws_settings)
    sqs = aws_client("sqs", aws_settings)
    subscribed = lambda: sum(len(sns.list_subscriptions_by_topic(TopicArn=t)["Subscriptions"])
                             for t in config["topic_arns"])
    assert subscribed() == 2 * 3
    QueueChannel.delete_run(base, "gone", 3)                    # from the user's config alone
    QueueChannel.delete_run(config, "gone", 3)                  # twice: nothing left to do, no error
    assert subscribed() == 0
    names = [u.rsplit("/", 1)[-1] for u in sqs.list_queues().get("QueueUrls", [])]
    assert not any(n == queue_name(base["prefix"], "gone", w) for n in names for w in range(3))


# -- end to end ----------------------------------------------------------------------------------

def test_official_run_over_sns_sqs_is_bit_exact_despite_duplicates_and_reordering(
        aws, aws_settings, distributed_official):
    aws.mangle_receives(40)                                     # every message twice, in reverse
    result = distributed_official({"kind": "queue", "prefix": "e2e", "aws": aws_settings.to_dict()})
    counted = result.traffic["channel_requests"]
    assert counted["sns_publish_calls"] + 4 == aws.requests["PublishBatch"]     # + one probe batch a topic
    assert counted["sqs_receive_calls"] + 3 <= aws.requests["ReceiveMessage"]  # + the probes' receives
    assert counted["messages_received"] > counted["messages_sent"]          # duplicates were delivered
    assert aws.requests["DeleteMessageBatch"] == 0                          # deletes are off by default
    assert aws.requests["DeleteQueue"] == 3 and aws.requests["Unsubscribe"] == 3 * 4
