"""The requests the AWS channels would be billed for, for exactly the chunks a run sent.

A run on any channel (the local one included) records every ``Channel.send`` call's chunks
(``metrics.LayerMetrics.log_chunks``: step, target, bytes). From that log this module replays
the AWS channels' own packing code, so the counts are what those channels would do with the
same chunks:

* queue (SNS+SQS, ``channels/queue.py``): a worker's chunks of a step are one ``send``; each is
  an entry of its base85 text plus the ``run`` and ``target`` attributes; entries are packed by
  ``queue.pack_batches`` into PublishBatch calls (<= 10 entries, <= the message size limit);
  SNS bills ``aws.billed_chunks`` (per started 64 KiB) of each call. Every chunk is delivered
  to its target's queue as one SQS message; ReceiveMessage calls take up to 10 and are billed
  per started 64 KiB of what they return. How many calls that takes depends on timing:
  ``optimistic`` packs 10 messages a call, ``conservative`` one message a call (each long poll
  returns as soon as one message arrives). Long polls make no empty calls while waiting
  (waits under 20 s).
* object (S3, ``channels/object.py``): one PUT per worker and step (``object.pack_object``);
  every receiving worker reads the index of every object of the step (a ranged GET of
  ``probe_bytes``) and its chunks with one more ranged GET when they lie beyond
  (``object.read_index``); with more than 12 peers it LISTs the step's prefix before
  reading (``poll="auto"``), otherwise it probes each peer's key with a GET, present or not.
  Polls again depend on timing: ``optimistic`` finds in one poll exactly the objects it waits
  for (a worker stops reading once it has every message it expects, so later objects of peers
  with nothing for it stay unread); ``conservative`` makes one poll per object it waits for plus
  the polls of the channel's back-off schedule within one hop of ``cost.LATENCY`` each step,
  and reads every object of the step.

The run store (shares, results) and the channels' set-up are not counted here.
"""
from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache

from fsd_kernels import codec
from fsd_runtime.aws.clients import billed_chunks
from fsd_runtime.channels import object as s3ch
from fsd_runtime.channels import queue as qch
from fsd_runtime.aws.cost import LATENCY, PRICES

#: The coordinator's run ids are 16 characters; the ``run`` attribute's size depends only on that.
RUN_ID = "0" * 16


def _by_sender_step(worker_metrics: list[dict]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    sends: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for m in worker_metrics:
        for step, target, size in m["chunk_log"]:
            sends[(int(m["worker"]), int(step))].append((int(target), int(size)))
    return sends


@lru_cache(maxsize=None)
def _text_bytes(n: int) -> int:
    return len(codec.to_text(bytes(n)))


def queue_max_chunk_bytes(n_workers: int, max_message_bytes: int = qch.DEFAULT_MESSAGE_BYTES) -> int:
    """``QueueChannel.max_chunk_bytes`` for a run of ``n_workers`` (the local channel can be run
    with it, so the chunks are the ones the queue channel would send)."""
    return codec.max_payload_for_text(max_message_bytes - qch._attribute_bytes("run", "String", RUN_ID)
                                      - qch._attribute_bytes("target", "String.Array",
                                                             json.dumps([str(n_workers)] * n_workers)))


def queue_requests(worker_metrics: list[dict], max_message_bytes: int = qch.DEFAULT_MESSAGE_BYTES) -> dict:
    """Counters in the queue channel's names (``cost.billed_requests`` reads them)."""
    run_attr = qch._attribute_bytes("run", "String", RUN_ID)
    out = dict.fromkeys(("sns_publish_calls", "sns_billed_requests", "bytes_sent", "messages_sent"), 0)
    inbox: dict[tuple[int, int], list[int]] = defaultdict(list)
    for (worker, step), chunks in sorted(_by_sender_step(worker_metrics).items()):
        sizes = [_text_bytes(n) + run_attr + qch._attribute_bytes("target", "String.Array", qch._targets_text([t]))
                 for t, n in chunks]
        for batch in qch.pack_batches(sizes, max_message_bytes):
            payload = sum(sizes[i] for i in batch)
            out["sns_publish_calls"] += 1
            out["sns_billed_requests"] += billed_chunks(payload)
            out["bytes_sent"] += payload
        out["messages_sent"] += len(sizes)
        for (t, _), size in zip(chunks, sizes):
            inbox[(t, step)].append(size)
    for mode in ("optimistic", "conservative"):
        calls = billed = 0
        for sizes in inbox.values():
            per_call = qch.MAX_BATCH_ENTRIES if mode == "optimistic" else 1
            for start in range(0, len(sizes), per_call):
                calls += 1
                billed += billed_chunks(sum(sizes[start:start + per_call]))
        out[f"sqs_receive_calls_{mode}"] = calls
        out[f"sqs_billed_requests_{mode}"] = billed
    out["sqs_receive_calls"] = out["sqs_receive_calls_conservative"]
    out["sqs_billed_requests"] = out["sqs_billed_requests_conservative"]
    out["messages_received"] = sum(len(v) for v in inbox.values())
    return out


def _polls_within(seconds: float, first: float, most: float) -> int:
    """Polls the object channel makes while waiting ``seconds`` (its doubling back-off)."""
    t, interval, polls = 0.0, first, 1
    while t + interval < seconds:
        t += interval
        interval = min(2 * interval, most)
        polls += 1
    return polls


def object_requests(worker_metrics: list[dict], n_workers: int, config: dict | None = None,
                    hop_s: float | None = None) -> dict:
    """Counters in the object channel's names, for both timing assumptions (see the module notes);
    the plain ``s3_*`` keys are the conservative ones."""
    cfg = s3ch.ObjectConfig.parse({"bucket": "fsd-billing", **(config or {})})
    hop_s = LATENCY.hop_s["object"] if hop_s is None else hop_s
    waiting_polls = _polls_within(hop_s, cfg.poll_interval, cfg.max_poll_interval)
    use_list = (cfg.poll == "list") or (cfg.poll == "auto" and (n_workers - 1) * PRICES.s3_get > PRICES.s3_put)
    objects: dict[int, dict[int, bytes]] = defaultdict(dict)   # step -> source -> object body
    out = {"s3_put_requests": 0, "bytes_sent": 0, "messages_sent": 0}
    for (worker, step), chunks in sorted(_by_sender_step(worker_metrics).items()):
        # distinct dummy payloads of the logged sizes (real chunks differ: their headers name the target)
        body = s3ch.pack_object([(t, i.to_bytes(4, "little") + bytes(n - 4)) for i, (t, n) in enumerate(chunks)],
                                n_workers)
        objects[step][worker] = body
        out["s3_put_requests"] += 1
        out["bytes_sent"] += len(body)
        out["messages_sent"] += len(chunks)
    receivers: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))  # step -> reader -> sources
    for (worker, step), chunks in _by_sender_step(worker_metrics).items():
        for t, _ in chunks:
            receivers[step][t].add(worker)
    gets = {"optimistic": 0, "conservative": 0}
    lists = {"optimistic": 0, "conservative": 0}
    received = 0
    for step, readers in receivers.items():
        for reader, expected in readers.items():
            present = {s: body for s, body in objects[step].items() if s != reader}
            reads = {}  # source -> GETs to read its object (index, and the reader's chunks beyond it)
            for source, body in present.items():
                index = s3ch.read_index(body[:cfg.probe_bytes], len(body), n_workers, reader, "billing")
                reads[source] = 1 + (index.size_needed > cfg.probe_bytes) + bool(
                    index.ranges and max(o + n for o, n in index.ranges) > min(len(body), cfg.probe_bytes))
                if source in expected:
                    received += len(index.ranges)
            # optimistic: one poll finds exactly the objects it waits for (others come later, unread);
            # conservative: one poll per awaited object plus the back-off polls, every present object read
            found = {"optimistic": (expected, 1), "conservative": (set(present), len(expected) + waiting_polls)}
            for mode, (sources, n_polls) in found.items():
                read = sum(reads[s] for s in sources)
                if use_list:
                    lists[mode] += n_polls
                    gets[mode] += read
                else:  # every poll probes every peer's next key; a found object's probe is its index read
                    gets[mode] += n_polls * (n_workers - 1) - len(sources) + read
    for mode in ("optimistic", "conservative"):
        out[f"s3_get_requests_{mode}"] = gets[mode]
        out[f"s3_list_requests_{mode}"] = lists[mode]
    out["s3_get_requests"] = gets["conservative"]
    out["s3_list_requests"] = lists["conservative"]
    out["messages_received"] = received
    return out


def billed_total(kind: str, requests: dict, mode: str = "conservative") -> int:
    """Billed requests as the paper counts them: queue publishes + receives (calls), object
    PUT + GET + LIST."""
    if kind == "queue":
        return requests["sns_publish_calls"] + requests[f"sqs_receive_calls_{mode}"]
    return requests["s3_put_requests"] + requests[f"s3_get_requests_{mode}"] + requests[f"s3_list_requests_{mode}"]


def with_mode(requests: dict, mode: str) -> dict:
    """``requests`` with the plain keys set to ``mode``'s figures (for ``cost.run_cost``)."""
    out = dict(requests)
    for key in ("sqs_receive_calls", "sqs_billed_requests", "s3_get_requests", "s3_list_requests"):
        if f"{key}_{mode}" in out:
            out[key] = out[f"{key}_{mode}"]
    return out

