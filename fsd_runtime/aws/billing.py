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
  intervals doubling from ``poll_interval`` to ``max_poll_interval``): while it awaits more than
  one key, each poll probes one of them (the sentinel, ``object.sentinel_of``) with a GET that is
  also its first read, and looks for the others only once it is there: by a GET probe of each
  awaited key or, when that costs more than one LIST (more than 12 keys), by a LIST of the step's
  prefix (``object.use_list``). Polls depend on timing, replayed poll by poll
  (``object_receive_requests``): ``optimistic`` finds every awaited object at the first poll;
  ``conservative`` has each source's object arrive ``latency``'s object hop (the seed's measured
  mean, 0.516 s) after that source's measured compute of the layer ended (slowed to the Lambda CPU
  share), so a worker waits for its senders' hop plus how much longer they computed than it did
  (and at its first receive, their launch-tree depth); the lead each step's polls start from is
  learned as the channel learns it (``object.next_poll_lead``). This is exact for that timing; an arrival
  order the timing model does not predict can cost more: at most one LIST (or one GET per
  awaited key) per poll, plus the reads.

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


def object_receive_requests(config: s3ch.ObjectConfig, arrivals: dict[int, float], reads: dict[int, int],
                            keys_in_step: int = 1, hint: int | None = None, lead: float = 0.0) -> dict:
    """What ``ObjectChannel.receive`` bills for one worker and step, replayed poll by poll: the
    object of each awaited source ``s`` is PUT ``arrivals[s]`` seconds after the step's first
    receive and read with ``reads[s]`` GETs. Polls fall at ``poll_offset`` 0, 1, ... (from
    ``lead``); each probes the sentinel (``sentinel_of``, from ``hint``) with one GET while more
    than one source is awaited and stops there if it is missing; else it LISTs the step's prefix
    (one per 1,000 keys) or GET-probes every other awaited key, whichever ``use_list`` picks, and
    reads what is there. Returns polls, lists, gets (misses included), misses, and for the next
    step ``hint`` and ``first_read`` (the first poll that read an object, for ``next_poll_lead``)."""
    remaining = sorted(arrivals)
    out = {"polls": 0, "lists": 0, "gets": 0, "misses": 0, "hint": hint, "first_read": None}
    while remaining:
        t = s3ch.poll_offset(config, out["polls"], lead)
        out["polls"] += 1
        read, rest = [], remaining
        if config.sentinel and len(remaining) > 1:
            pick = s3ch.sentinel_of(remaining, out["hint"])
            out["gets"] += reads[pick] if arrivals[pick] <= t else 1
            if arrivals[pick] > t:
                out["misses"] += 1
                continue
            read.append(pick)
            rest = [s for s in remaining if s != pick]
        if s3ch.use_list(config, len(rest)):
            out["lists"] += max(1, -(-keys_in_step // 1000))
            rest = [s for s in rest if arrivals[s] <= t]
        for s in rest:
            if arrivals[s] <= t:
                out["gets"] += reads[s]
                read.append(s)
            else:
                out["gets"] += 1
                out["misses"] += 1
        if read:
            out["hint"] = max(read)
            remaining = [s for s in remaining if s not in read]
            if out["first_read"] is None:
                out["first_read"] = out["polls"] - 1
    return out


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
    them all. Conservative: each sender's object arrives ``latency``'s object hop plus how much
    longer that sender computed the layer before than this worker (compute + codec seconds,
    slowed to the CPU share of ``memory_mb``) after this worker's first receive, plus, at the
    worker's first receive, the difference of their launch-tree depths (``cost.duration_terms``'s
    level time; ``fanout``); the channel's polls are replayed against those arrivals
    (``object_receive_requests``), the sentinel and the poll lead carried from step to step. ``n_batches``: the
    run's batches per layer (step = layer x n_batches + batch)."""
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
    depths = tree_depths(n_workers, fanout)
    level_s = latency.invoke_s + latency.init_s + 2 * latency.s3_request_s
    first_step: dict[int, int] = {}
    for step in sorted(receivers):
        for reader in receivers[step]:
            first_step.setdefault(reader, step)
    totals = {mode: dict.fromkeys(("polls", "lists", "gets", "misses"), 0) for mode in ("optimistic", "conservative")}
    # per (mode, reader): the channel's state carried from step to step (sentinel hint, lead)
    state: dict[tuple[str, int], dict] = defaultdict(lambda: {"hint": None, "history": (), "lead": 0.0})
    reads_total = received = 0
    for step in sorted(receivers):
        readers = receivers[step]
        before = step // n_batches - 1   # the layer whose compute precedes this step's messages
        for reader, expected in sorted(readers.items()):
            reads, arrivals = {}, {}
            mine = seconds.get((reader, before), 0.0)
            for source in expected:
                gets, n_chunks = object_read_gets(objects[step][source], reader, n_workers, cfg.probe_bytes)
                reads[source] = gets
                received += n_chunks
                # the source PUTs when its compute is done, the hop after: relative to this
                # worker's first receive, which starts when its own compute is done
                arrive = latency.hop_s["object"] + slow * (seconds.get((source, before), 0.0) - mine) / n_batches
                if step == first_step[reader]:  # launched later or sooner down the launch tree
                    arrive += (depths[source] - depths[reader]) * level_s
                arrivals[source] = max(0.0, arrive)
            reads_total += sum(reads.values())
            for mode, arrive_at in (("optimistic", dict.fromkeys(arrivals, 0.0)), ("conservative", arrivals)):
                st = state[(mode, reader)]
                got = object_receive_requests(cfg, arrive_at, reads, len(objects[step]), st["hint"], st["lead"])
                st["hint"] = got.pop("hint")
                st["history"], st["lead"] = s3ch.next_poll_lead(cfg, st["history"], got.pop("first_read"), st["lead"])
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

