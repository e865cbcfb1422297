"""ObjectChannel (S3) against the local AWS-API server, and its object format against a naive twin."""
from __future__ import annotations

import random
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from fsd_runtime.aws.clients import client as aws_client
from fsd_runtime.channels import ChannelError, make_channel
from fsd_runtime.channels.object import (ObjectChannel, ObjectConfig, ObjectFormatError, ObjectResources,
                                         next_poll_lead, pack_object, read_index)


def naive_addressed(chunks: list[tuple[int, bytes]], reader: int) -> list[bytes]:
    """The chunks ``reader`` should get: each distinct payload once, in first-seen order."""
    distinct = list(dict.fromkeys(c for _, c in chunks))
    return [c for c in distinct if any(t == reader and p == c for t, p in chunks)]


def read_for(obj: bytes, n_workers: int, reader: int) -> list[bytes]:
    index = read_index(obj, len(obj), n_workers, reader, "test")
    return [obj[o:o + n] for o, n in index.ranges]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.binary(max_size=40)), max_size=12))))
def test_object_format_gives_each_reader_exactly_its_chunks(case):
    n_workers, chunks = case
    obj = pack_object(chunks, n_workers)
    for reader in range(n_workers):
        assert read_for(obj, n_workers, reader) == naive_addressed(chunks, reader)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_hostile_objects_raise_format_errors_only(data, cut):
    good = pack_object([(0, b"abc"), (1, b"defg"), (2, b"abc")], 3)
    for blob in (data, good[:cut], bytearray(good)):
        if isinstance(blob, bytearray) and blob:
            blob[cut % len(blob)] ^= 0x5A
        blob = bytes(blob)
        try:
            index = read_index(blob, len(blob), 3, 1, "fuzz")
        except ObjectFormatError:
            continue
        assert all(0 <= o and o + n <= len(blob) for o, n in index.ranges)


def test_a_short_head_asks_for_more_instead_of_guessing():
    obj = pack_object([(t, bytes([t]) * 10) for t in range(5)], 5)
    index = read_index(obj[:20], len(obj), 5, 3, "head")
    assert index.ranges == [] and index.size_needed > 20
    with pytest.raises(ObjectFormatError, match="workers"):
        read_index(obj, len(obj), 4, 0, "wrong run size")


def test_config_is_validated():
    with pytest.raises(ValueError, match="bucket"):
        ObjectConfig.parse({"kind": "object"})
    with pytest.raises(ValueError, match="poll"):
        ObjectConfig.parse({"kind": "object", "bucket": "fsd-test", "poll": "sometimes"})
    with pytest.raises(ValueError, match="prefix"):
        ObjectConfig.parse({"kind": "object", "bucket": "fsd-test", "prefix": "../x"})


@pytest.fixture
def run(aws, aws_settings):
    made = []

    def make(n_workers: int, bucket: str = "fsd-object-tests", run_id: str | None = None, **options):
        run_id = run_id or f"r{uuid.uuid4().hex[:12]}"
        base = {"kind": "object", "bucket": bucket, "aws": aws_settings.to_dict(), **options}
        config = ObjectChannel.create_run(base, run_id, n_workers)
        channels = [make_channel(config, w, n_workers, run_id) for w in range(n_workers)]
        made.append((config, run_id, n_workers, channels))
        return config, run_id, channels

    yield make
    for config, run_id, n_workers, channels in made:
        for channel in channels:
            channel.close()
        ObjectChannel.delete_run(config, run_id, n_workers)


def receive_all(channel: ObjectChannel, expected: int, step: int) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(20):
        if len(got) >= expected:
            break
        got.extend(channel.receive(step, timeout=2))
    return sorted(got)


def all_to_all(channels, step: int) -> dict[int, list[bytes]]:
    n = len(channels)
    sent = {w: [] for w in range(n)}
    for source, channel in enumerate(channels):
        shared = f"shared {source} {step}".encode()
        outgoing = [(t, shared) for t in range(n) if t != source]
        outgoing += [(t, f"{source}->{t} @{step}".encode() * (t + 1)) for t in range(n) if t != source]
        channel.send(step, outgoing)
        for t, c in outgoing:
            sent[t].append(c)
    return sent


@pytest.mark.parametrize("poll", ["get", "list"])
def test_round_trip_one_put_per_worker_and_step(run, aws, poll):
    _, _, channels = run(3, poll=poll)
    for step in (0, 1):
        sent = all_to_all(channels, step)
        for w, channel in enumerate(channels):
            assert receive_all(channel, len(sent[w]), step) == sorted(sent[w])
    assert aws.requests["PutObject"] == 3 * 2
    assert sum(c.counts["s3_put_requests"] for c in channels) == 6
    assert (aws.requests["ListObjects"] > 0) == (poll == "list")


def test_a_second_send_in_a_step_is_a_new_part(run):
    _, _, channels = run(2, poll="get")
    channels[0].send(4, [(1, b"first")])
    assert channels[1].receive(4, timeout=2) == [b"first"]
    channels[0].send(4, [(1, b"second")])
    assert channels[1].receive(4, timeout=2) == [b"second"]
    assert channels[1].receive(4, timeout=0.2) == []


def test_an_index_larger_than_the_probe_is_read_in_full(run, aws):
    _, _, channels = run(2, probe_bytes=16)
    payloads = [bytes([i]) * 100 for i in range(5)]
    channels[0].send(0, [(1, p) for p in payloads])
    assert sorted(channels[1].receive(0, timeout=2)) == sorted(payloads)
    assert channels[1].counts["s3_get_requests"] == 4   # probe, chunk table, target lists, own chunks


def test_throttled_puts_and_gets_are_retried(run, aws):
    _, _, channels = run(2, poll="get")
    aws.throttle("PutObject", 2)
    aws.throttle("GetObject", 2)
    channels[0].send(0, [(1, b"payload")])
    assert receive_all(channels[1], 1, 0) == [b"payload"]
    assert channels[0].call.retries["PutObject"] == 2 and channels[1].call.retries["GetObject"] == 2
    # every attempt is priced as billed: the PUT's three, and two more GETs than were answered
    assert channels[0].counts["s3_put_requests"] == aws.requests["PutObject"] == 3
    assert channels[1].counts["s3_get_requests"] == aws.requests["GetObject"]


def test_two_concurrent_runs_do_not_see_each_other(run):
    _, _, run_a = run(2)
    _, _, run_b = run(2)
    run_a[0].send(0, [(1, b"from a")])
    run_b[0].send(0, [(1, b"from b")])
    assert run_a[1].receive(0, timeout=2) == [b"from a"]
    assert run_b[1].receive(0, timeout=2) == [b"from b"]


def test_a_foreign_object_in_the_run_is_a_clear_error(run, aws_settings):
    config, run_id, channels = run(2, poll="get")
    s3 = aws_client("s3", aws_settings)
    s3.put_object(Bucket=config["bucket"], Key=f"{config['prefix']}/{run_id}/s00000000/w00000/p000",
                  Body=b"\x00" * 64)
    with pytest.raises(ObjectFormatError, match="not a channel object"):
        channels[1].receive(0, timeout=1)


def test_everything_of_a_failed_run_is_deleted_and_other_runs_survive(aws, aws_settings):
    base = {"kind": "object", "bucket": "fsd-cleanup-tests", "aws": aws_settings.to_dict()}
    s3 = aws_client("s3", aws_settings)
    keep = ObjectChannel.create_run(base, "keep", 2)
    make_channel(keep, 0, 2, "keep").send(0, [(1, b"kept")])

    def failing_run():
        config = ObjectChannel.create_run(base, "doomed", 3)
        try:
            channels = [make_channel(config, w, 3, "doomed") for w in range(3)]
            for step in range(random.randint(2, 4)):
                all_to_all(channels, step)
            raise RuntimeError("worker 2 died")
        finally:
            ObjectChannel.delete_run(config, "doomed", 3)

    with pytest.raises(RuntimeError, match="worker 2 died"):
        failing_run()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fsd-cleanup-tests").get("Contents", [])]
    assert keys and all(k.startswith("fsd-runs/keep/") for k in keys)
    ObjectChannel.delete_run(keep, "keep", 2)
    ObjectChannel.delete_run(keep, "keep", 2)                  # idempotent
    assert s3.list_objects_v2(Bucket="fsd-cleanup-tests").get("KeyCount", 0) == 0


def test_oversized_chunks_and_bad_targets_are_refused(run):
    _, _, channels = run(2, max_chunk_bytes=1024)
    with pytest.raises(ChannelError, match="max_chunk_bytes"):
        channels[0].send(0, [(1, b"x" * 1025)])
    with pytest.raises(ChannelError, match="not a worker"):
        channels[0].send(0, [(2, b"x")])


def test_official_run_over_s3_is_bit_exact_and_leaves_nothing_behind(aws, aws_settings, distributed_official):
    config = {"kind": "object", "bucket": "fsd-e2e-object", "aws": aws_settings.to_dict()}
    result = distributed_official(config)
    counted = result.traffic["channel_requests"]
    assert counted["s3_put_requests"] == aws.requests["PutObject"]
    assert counted["messages_received"] == counted["messages_sent"] == result.traffic["chunks"]
    s3 = aws_client("s3", aws_settings)
    assert s3.list_objects_v2(Bucket="fsd-e2e-object").get("KeyCount", 0) == 0


class FakeTime:
    """A clock the channel sleeps on; sends scheduled at a time happen when the clock passes it."""

    def __init__(self):
        self.now = 0.0
        self.due: list[tuple[float, object]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        for at, action in [d for d in self.due if d[0] <= self.now]:
            self.due.remove((at, action))
            action()


def awaited_scenario(channels, reader: int, awaited: list[int], arrive_s, step: int = 3):
    """Every worker but ``reader`` sends at ``step``; the ``awaited`` ones to ``reader`` (among
    others), the rest only to others. The awaited objects are PUT ``arrive_s`` (fake) seconds
    after the reader's first receive (one time, or a dict source -> time); the others at once.
    Returns the reader's chunks and the objects it should read."""
    n = len(channels)
    fake = FakeTime()
    channels[reader]._clock, channels[reader]._sleep = fake.clock, fake.sleep
    at = arrive_s if isinstance(arrive_s, dict) else dict.fromkeys(awaited, arrive_s)
    objects = {}
    for source in range(n):
        if source == reader:
            continue
        others = [t for t in range(n) if t not in (source, reader)]
        chunks = [(t, f"{source}->{t}".encode() * 3) for t in others]
        if source in awaited:
            chunks += [(reader, f"{source}->reader {i}".encode() * 40) for i in range(2)]
            objects[source] = pack_object(chunks, n)
            fake.due.append((at[source], lambda c=channels[source], ch=chunks: c.send(step, ch)))
        else:
            channels[source].send(step, chunks)
    fake.sleep(0.0)  # what is due at once is there before the first receive
    got, missing = [], set(awaited)
    while missing:
        channels[reader].expect(step, missing)
        new = channels[reader].receive(step, timeout=30)
        got += new
        missing -= {int(c.split(b"->")[0]) for c in new}
    return got, objects


SPREAD = {1: 0.02, 2: 0.3, 3: 0.3, 4: 0.9, 5: 0.0, 6: 0.481, 7: 0.2}


@pytest.mark.parametrize("poll,sentinel,awaited,arrive_s", [
    ("auto", True, [2, 4], 0.0), ("auto", True, [2, 4], 0.3), ("auto", True, [2, 4], 2.5),
    ("list", True, [2, 4], 0.3), ("auto", False, [2, 4], 0.3), ("list", False, [2, 4], 0.3),
    ("auto", True, [4], 0.3), ("auto", True, [1, 2, 3, 4, 5, 6, 7], SPREAD),
    ("list", True, [1, 2, 3, 4, 5, 6, 7], SPREAD), ("get", False, [1, 2, 3, 4, 5, 6, 7], SPREAD),
    ("auto", True, [1, 3, 5, 7], {1: 0.0, 3: 0.0, 5: 0.0, 7: 0.6})])
def test_polls_follow_the_step_schedule_and_the_billing_replay_exactly(run, aws, poll, sentinel, awaited, arrive_s):
    from fsd_runtime.aws import billing

    config, _, channels = run(8, poll=poll, sentinel=sentinel)
    cfg = ObjectConfig.parse(config)
    reader = 0
    at = {s: (arrive_s[s] if isinstance(arrive_s, dict) else arrive_s) for s in awaited}
    counts = channels[reader].counts
    replay_hint, history, lead = None, (), 0.0
    for step in range(3, 8):  # later steps start from the sentinel and the lead the ones before left
        before = dict(counts)
        got, objects = awaited_scenario(channels, reader, awaited, at, step=step)
        assert len(got) == 2 * len(awaited)
        reads = {s: billing.object_read_gets(body, reader, 8, cfg.probe_bytes)[0] for s, body in objects.items()}
        model = billing.object_receive_requests(cfg, at, reads, keys_in_step=7, hint=replay_hint, lead=lead)
        replay_hint = model["hint"]
        assert channels[reader]._lead == lead
        history, lead = next_poll_lead(cfg, history, model["first_read"], lead)
        done = {k: counts.get(k, 0) - before.get(k, 0) for k in ("s3_polls", "s3_get_requests",
                                                                   "s3_get_misses", "s3_list_requests")}
        assert done == {"s3_polls": model["polls"], "s3_get_requests": model["gets"],
                        "s3_get_misses": model["misses"], "s3_list_requests": model["lists"]}, (step, model)
        assert channels[reader]._hint == replay_hint
        assert (model["lists"] > 0) == (poll == "list" and (len(awaited) > 1 or not sentinel) or
                                        poll == "auto" and len(awaited) - sentinel > 12)
    # the schedule does not depend on how many objects come in: 0, 25, 75, 175, 375, 775 ms, ...
    # (a wait of 0, 0.01, 0.025, 0.3, 0.481, 2.5 s: found at poll 1, 2, 2, 5, 6, 8)
    from fsd_runtime.channels.object import poll_offset
    offsets = [poll_offset(cfg, i) for i in range(8)]
    assert offsets == pytest.approx([0, 0.025, 0.075, 0.175, 0.375, 0.775, 1.575, 2.575])
    assert [next(i for i, t in enumerate(offsets) if t >= s) + 1 for s in (0, 0.01, 0.025, 0.3, 0.481, 2.5)] \
        == [1, 2, 2, 5, 6, 8]
    # with a lead, poll 0 stays at once and the doubling starts at the lead
    assert [poll_offset(cfg, i, 0.4) for i in range(4)] == pytest.approx([0, 0.4, 0.425, 0.475])


@pytest.mark.parametrize("poll_lead, polls", [(True, [6, 6, 5, 5, 4, 4, 3, 3, 3]), (False, [6] * 9)])
def test_steady_arrivals_teach_the_lead_and_a_late_step_does_not_raise_it(run, aws, poll_lead, polls):
    """Peers that keep arriving 0.481 s after the first receive: polls per step fall from 6 (0, 25,
    75, 175, 375, 775 ms) to 3 (0, 475, 500 ms) as the lead is learned (by hand: bounds 375, 375,
    450, 450, 475, ...; the lead is the smaller of the last two). Then one step 3 s late, and
    the lead stays what the steady steps taught."""
    config, _, channels = run(4, poll_lead=poll_lead)
    reader, counts, seen = 0, channels[0].counts, []
    for step in range(9):
        before = counts["s3_polls"]
        awaited_scenario(channels, reader, [1, 2, 3], 0.481, step=step)
        seen.append(counts["s3_polls"] - before)
    assert seen == polls
    if not poll_lead:
        return
    assert channels[reader]._lead == pytest.approx(0.475)
    awaited_scenario(channels, reader, [1, 2, 3], 3.0, step=9)   # one late step
    awaited_scenario(channels, reader, [1, 2, 3], 0.481, step=10)
    assert channels[reader]._lead == pytest.approx(0.475)        # min(late bound, steady bound)
    before = counts["s3_polls"]
    awaited_scenario(channels, reader, [1, 2, 3], 0.481, step=11)
    assert counts["s3_polls"] - before == 3


def test_a_poll_before_the_sentinel_arrives_costs_one_get_not_a_list(run, aws):
    """20 awaited keys (a LIST each poll without the sentinel): every poll before they come is one
    GET miss, then one LIST finds the rest; the replay is an independent count of the same."""
    n = 21
    config, _, channels = run(n)
    reader, awaited = 0, list(range(1, n))
    got, _ = awaited_scenario(channels, reader, awaited, 0.481)
    assert len(got) == 2 * len(awaited)
    counts = channels[reader].counts
    # polls at 0, 25, 75, 175, 375 ms miss the sentinel (worker 20); the one at 775 ms finds it,
    # LISTs once, then reads the other 19
    assert counts["s3_polls"] == 6 and counts["s3_get_misses"] == 5 and counts["s3_list_requests"] == 1
    assert counts["s3_get_requests"] == 5 + len(awaited)
    assert channels[reader]._hint == 20  # the highest read at that poll (the sentinel itself)


def test_a_send_with_no_chunks_writes_nothing(run, aws):
    """A worker with nothing for anyone at a step (random nets have such steps; the challenge nets
    do not) makes no PUT, and its next object of the step is still its part 0."""
    config, run_id, channels = run(3)
    channels[1].send(4, [])
    assert channels[1].counts["s3_put_requests"] == 0
    parsed = ObjectConfig.parse(config)
    assert ObjectResources(parsed).keys(parsed.run_prefix(run_id)) == []
    channels[1].send(4, [(0, b"late but there")])
    channels[0].expect(4, [1])
    assert channels[0].receive(4, timeout=5) == [b"late but there"]


def test_only_the_awaited_sources_are_read(run, aws):
    _, _, channels = run(6, poll="get")
    reader, awaited = 1, [3]
    got, _ = awaited_scenario(channels, reader, awaited, 0.0)
    assert sorted(got) == sorted(f"3->reader {i}".encode() * 40 for i in range(2))
    # one GET of worker 3's object; the four objects of peers with nothing for worker 1 are never read
    assert channels[reader].counts["s3_get_requests"] == 1 and channels[reader].counts["s3_polls"] == 1


def test_a_hint_naming_a_non_peer_is_refused(run):
    _, _, channels = run(3)
    with pytest.raises(ChannelError, match="not peers"):
        channels[0].expect(0, [0])
    with pytest.raises(ChannelError, match="not peers"):
        channels[0].expect(0, [3])


def test_read_gets_of_large_indexes_match_the_replay(run, aws):
    from fsd_runtime.aws import billing

    config, _, channels = run(8, probe_bytes=64)
    chunks = [(t, bytes([t, i]) * 30) for t in range(1, 8) for i in range(3)]
    channels[0].send(0, chunks)
    body = pack_object(chunks, 8)
    for reader in range(1, 8):
        channels[reader].expect(0, [0])
        assert len(channels[reader].receive(0, timeout=2)) == 3
        assert channels[reader].counts["s3_get_requests"] == billing.object_read_gets(body, reader, 8, 64)[0]


def _key_of(config: dict, run_id: str, step: int, worker: int) -> str:
    from fsd_runtime.channels.object import object_key
    return object_key(ObjectConfig.parse(config), run_id, step, worker, 0)


def test_a_put_retried_after_its_answer_was_lost_is_accepted(run, aws_settings):
    config, run_id, channels = run(2)
    body = pack_object([(1, b"payload")], 2)
    s3 = aws_client("s3", aws_settings)
    s3.put_object(Bucket=config["bucket"], Key=_key_of(config, run_id, 3, 0), Body=body)  # the lost answer's PUT
    channels[0].send(3, [(1, b"payload")])                                                 # gets 412, finds its own
    assert receive_all(channels[1], 1, 3) == [b"payload"]


@pytest.mark.parametrize("foreign", [b"", b"x" * 5, None])
def test_a_strangers_object_at_a_workers_own_key_is_an_error_of_that_worker(run, aws_settings, foreign):
    config, run_id, channels = run(2)
    if foreign is None:  # as long as ours and one byte different
        foreign = bytearray(pack_object([(1, b"payload")], 2))
        foreign[-1] ^= 1
    s3 = aws_client("s3", aws_settings)
    s3.put_object(Bucket=config["bucket"], Key=_key_of(config, run_id, 3, 0), Body=bytes(foreign))
    with pytest.raises(ChannelError, match="worker 0's key holds an object it did not write"):
        channels[0].send(3, [(1, b"payload")])


def test_retried_reads_in_parallel_are_each_counted_once(run, aws):
    """The reads of a step run in the channel's threads: a retry is priced with the read it
    belongs to, never with another thread's (8 readers, 3 throttled GETs: 3 more, not up to 24)."""
    _, _, channels = run(9, poll="get")
    for w in range(1, 9):
        channels[w].send(0, [(0, bytes([w]) * 50)])
    aws.throttle("GetObject", 3)
    before = dict(aws.requests)
    assert len(receive_all(channels[0], 8, 0)) == 8
    made = aws.requests["GetObject"] - before.get("GetObject", 0)
    assert channels[0].call.retries["GetObject"] == 3
    assert channels[0].counts["s3_get_requests"] == made
