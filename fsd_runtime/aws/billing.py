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
* object (S3, ``channels/object.py``): one PUT per worker and step (``object.pack_object``).
  Each receiving worker reads exactly the objects of the peers that sent it chunks (the worker
  loop names them, ``Channel.expect``): a ranged GET of ``probe_bytes`` each, more when the
  index or its chunks lie beyond (``object_read_gets``); the objects of peers with nothing for
  it are never read. It learns what arrived by polling on a schedule fixed per step (0, then
  intervals doubling from ``poll_interval`` to ``max_poll_interval``): each poll probes every
  awaited key with a GET or, when that costs more than one LIST (more than 12 keys), LISTs the
  step's prefix (``object.use_list``). Polls depend on timing: ``optimistic`` finds every
  awaited object at the first poll; ``conservative`` has them all arrive after the worker
  waited ``latency``'s object hop (the seed's measured 0.481 s) plus the measured straggler
  wait (and at its first receive the launch-tree skew), polling all the while
  (``object_receive_requests``; ``object.polls_until``). Given that wait, this is the most the
  channel can be billed in $ (a poll costs at most the price ``use_list`` chose for all awaited
  keys); the request count of that scenario is exact for it, but other arrival orders within the
  wait can make a few more, cheaper requests (a LIST poll turning into up to 12 GET probes once
  few keys are still awaited).

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
from fsd_runtime.aws.cost import SEED_MEASURED, LatencyModel, busy_seconds, cpu_share, tree_depths

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


def object_read_gets(body: bytes, reader: int, n_workers: int, probe_bytes: int) -> tuple[int, int]:
    """(GETs, chunks) for ``reader`` to read its part of one step object, as ``ObjectChannel._fetch``
    does: a ranged GET of ``probe_bytes`` (the probe or the first read), one more each time the
    index continues beyond what it has, one more if the reader's chunks lie beyond."""
    head = body[:probe_bytes]
    index = s3ch.read_index(head, len(body), n_workers, reader, "billing")
    gets = 1
    while index.size_needed > len(head):
        head = body[:index.size_needed]
        index = s3ch.read_index(head, len(body), n_workers, reader, "billing")
        gets += 1
    if index.ranges and max(o + n for o, n in index.ranges) > len(head):
        gets += 1
    return gets, len(index.ranges)


def object_receive_requests(config: s3ch.ObjectConfig, awaited: int, reads: int, wait_s: float,
                            keys_in_step: int = 1) -> dict:
    """What ``ObjectChannel.receive`` bills for one worker and step when all of its ``awaited``
    objects (read with ``reads`` GETs in all) are PUT ``wait_s`` seconds after the step's first
    receive: ``polls_until`` polls of the step's schedule, each a LIST of the step's prefix (one
    per 1,000 keys) or a GET probe of every awaited key, whichever ``use_list`` picks for
    ``awaited`` keys; every probe but the last poll's misses, the last poll's probes are the
    first reads. ``wait_s`` <= 0: one poll finds them all."""
    polls = s3ch.polls_until(config, wait_s)
    if s3ch.use_list(config, awaited):
        return {"polls": polls, "lists": polls * max(1, -(-keys_in_step // 1000)), "gets": reads, "misses": 0}
    return {"polls": polls, "lists": 0, "gets": (polls - 1) * awaited + reads, "misses": (polls - 1) * awaited}


def _layer_seconds(worker_metrics: list[dict]) -> dict[tuple[int, int], float]:
    """(worker, layer) -> measured compute + encode + decode seconds (``cost.busy_seconds``: the
    worker thread's CPU time on this machine's core where the metrics have it)."""
    out = {}
    for m in worker_metrics:
        fields = m.get("fields")
        if not fields:
            continue
        for layer, row in enumerate(m["layers"]):
            out[(int(m["worker"]), layer)] = busy_seconds(dict(zip(fields, row)))
    return out


def object_requests(worker_metrics: list[dict], n_workers: int, config: dict | None = None, *,
                    latency: LatencyModel = SEED_MEASURED, memory_mb: int = 2048, fanout: int = 2,
                    n_batches: int = 1) -> dict:
    """Counters in the object channel's names, for both timing assumptions (see the module notes);
    the plain ``s3_*`` keys are the conservative ones.

    Each worker reads, at each step, exactly the objects of the peers that sent it chunks (the
    worker loop tells the channel whom it awaits, ``Channel.expect``). Optimistic: one poll finds
    them all. Conservative: they all arrive after the worker waited ``latency``'s object hop plus
    the measured straggler wait (per layer, the slowest worker's compute + codec seconds of the
    layer before minus this worker's, slowed to the CPU share of ``memory_mb``) plus, at the
    worker's first receive, the launch-tree skew (``cost.duration_terms``'s term; ``fanout``),
    and the channel polls on its schedule meanwhile (``object_receive_requests``). ``n_batches``:
    the run's batches per layer (step = layer x n_batches + batch)."""
    cfg = s3ch.ObjectConfig.parse({"bucket": "fsd-billing", **(config or {})})
    sends = _by_sender_step(worker_metrics)
    objects: dict[int, dict[int, bytes]] = defaultdict(dict)   # step -> source -> object body
    out = {"s3_put_requests": 0, "bytes_sent": 0, "messages_sent": 0}
    for (worker, step), chunks in sorted(sends.items()):
        # distinct dummy payloads of the logged sizes (real chunks differ: their headers name the target)
        body = s3ch.pack_object([(t, i.to_bytes(4, "little") + bytes(n - 4)) for i, (t, n) in enumerate(chunks)],
                                n_workers)
        objects[step][worker] = body
        out["s3_put_requests"] += 1
        out["bytes_sent"] += len(body)
        out["messages_sent"] += len(chunks)
    receivers: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))  # step -> reader -> sources
    for (worker, step), chunks in sends.items():
        for t, _ in chunks:
            receivers[step][t].add(worker)
    seconds = _layer_seconds(worker_metrics)
    slow = 1.0 / cpu_share(memory_mb)
    layers = {layer for _, layer in seconds}
    slowest = {layer: max(v for (_, l), v in seconds.items() if l == layer) for layer in layers}
    depths = tree_depths(n_workers, fanout)
    level_s = latency.invoke_s + latency.init_s + 2 * latency.s3_request_s
    first_step: dict[int, int] = {}
    for step in sorted(receivers):
        for reader in receivers[step]:
            first_step.setdefault(reader, step)
    totals = {mode: dict.fromkeys(("polls", "lists", "gets", "misses"), 0) for mode in ("optimistic", "conservative")}
    reads_total = received = 0
    for step, readers in receivers.items():
        before = step // n_batches - 1   # the layer whose compute precedes this step's messages
        for reader, expected in readers.items():
            reads = 0
            for source in expected:
                gets, n_chunks = object_read_gets(objects[step][source], reader, n_workers, cfg.probe_bytes)
                reads += gets
                received += n_chunks
            reads_total += reads
            wait = latency.hop_s["object"] + slow * max(
                0.0, slowest.get(before, 0.0) - seconds.get((reader, before), 0.0)) / n_batches
            if step == first_step[reader]:
                wait += (max(depths) - depths[reader]) * level_s
            for mode, w in (("optimistic", 0.0), ("conservative", wait)):
                got = object_receive_requests(cfg, len(expected), reads, w, len(objects[step]))
                for key, value in got.items():
                    totals[mode][key] += value
    for mode, t in totals.items():
        out[f"s3_get_requests_{mode}"] = t["gets"]
        out[f"s3_list_requests_{mode}"] = t["lists"]
        out[f"s3_polls_{mode}"] = t["polls"]
        out[f"s3_get_misses_{mode}"] = t["misses"]
    out["s3_get_reads"] = reads_total
    out["s3_get_requests"] = out["s3_get_requests_conservative"]
    out["s3_list_requests"] = out["s3_list_requests_conservative"]
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

