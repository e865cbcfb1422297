"""Traffic, billed requests and modelled cost of the AWS channels on the official workload.

    python bench/cloud.py [--json] [--workers 8] [--memory-mb 1024] [--launcher process|thread]

Runs the official 1024x120 network on the embedded 10,000 images with the queue
(SNS+SQS) and object (S3) channels against the local AWS-API server (moto on
127.0.0.1, started here), checks the 337 golden categories, and prices the
measured counts with fsd_runtime.aws.cost: channel requests as counted by the
channels, the run's set-up/tear-down calls seen by the server (one request each),
run-store requests of an S3 store (3 PUTs and 3 GETs per worker: share,
result, metrics; the coordinator's 2 LISTs per 0.5 s poll), one invocation per worker,
and durations modelled as measured compute + per-hop latency + INIT (no Lambda here).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

#: The seed system's published numbers for the same workload (shared/README.md).
SEED = {"queue": {"usd_per_10k": 0.0215, "bytes": 104.1e6, "publishes": 1102, "receives": 4318,
                  "messages": 6774},
        "object": {"usd_per_10k": 0.0539, "bytes": None}}
TARGETS = {"queue_usd_per_10k": 0.002, "bytes": 10.4e6,
           "queue_billed_requests": (SEED["queue"]["publishes"] + SEED["queue"]["receives"]) / 2}
#: The S3 run store's coordinator polls every this many seconds, two LISTs a poll (fsd_runtime.aws.s3storage).
STORE_POLL_SECONDS = 0.5


#: Calls the channels count themselves, by server operation name -> channel counter.
CHANNEL_COUNTED = {"PublishBatch": "sns_publish_calls", "ReceiveMessage": "sqs_receive_calls",
                   "DeleteMessageBatch": "sqs_delete_calls", "PutObject": "s3_put_requests",
                   "GetObject": "s3_get_requests", "ListObjects": "s3_list_requests"}
#: Billing unit of every other (set-up / tear-down) call the server saw; DELETEs on S3 are free.
SETUP_UNIT = {**{op: "sns_billed_requests" for op in ("CreateTopic", "ListTopics", "Subscribe", "Unsubscribe",
                                                       "ListSubscriptionsByTopic", "PublishBatch")},
              **{op: "sqs_billed_requests" for op in ("CreateQueue", "GetQueueAttributes", "SetQueueAttributes",
                                                       "GetQueueUrl", "DeleteQueue", "ReceiveMessage",
                                                       "DeleteMessageBatch")},
              **{op: "s3_put_requests" for op in ("CreateBucket", "PutObject", "ListObjects")},
              **{op: "s3_get_requests" for op in ("HEADBucket", "GetObject")}}


def setup_requests(server_requests: dict, channel_requests: dict) -> dict[str, int]:
    """The run's set-up and tear-down calls (probes included), priced as one request each."""
    units: dict[str, int] = {}
    for op, n in server_requests.items():
        extra = n - channel_requests.get(CHANNEL_COUNTED.get(op, ""), 0)
        if op in SETUP_UNIT and extra > 0:
            units[SETUP_UNIT[op]] = units.get(SETUP_UNIT[op], 0) + extra
    return units


def store_requests(n_workers: int, run_seconds: float) -> dict[str, int]:
    """Requests an S3 run store adds to a run (see the module notes)."""
    return {"s3_put_requests": 3 * n_workers, "s3_get_requests": 3 * n_workers,
            "s3_list_requests": 2 * math.ceil(run_seconds / STORE_POLL_SECONDS)}


def run_channel(kind: str, settings, dataset, packed, n_workers: int, launcher: str, server) -> dict:
    from fsd_runtime.aws import cost
    from fsd_runtime.coordinator import run_distributed

    config = {"kind": "queue", "prefix": "bench", "aws": settings.to_dict()} if kind == "queue" else \
        {"kind": "object", "bucket": "fsd-bench", "aws": settings.to_dict()}
    server.faults.clear()
    start = time.perf_counter()
    result = run_distributed(packed, dataset.images.arrays, n_workers, channel=config,
                             launcher={"kind": launcher}, receive_timeout=120)
    wall = time.perf_counter() - start
    golden = bool(np.array_equal(result.categories, dataset.categories))
    counted = result.traffic["channel_requests"]
    return {"channel": kind, "golden_match": golden, "categories": int(len(result.categories)),
            "wall_seconds": wall, "timings": result.timings, "codec_bytes": result.traffic["bytes"],
            "wire_bytes": int(counted.get("bytes_sent", 0)), "messages": result.traffic["messages"],
            "chunks": result.traffic["chunks"], "channel_requests": counted,
            "server_requests": dict(server.requests), "rows": result.metrics,
            "setup_requests": setup_requests(dict(server.requests), counted),
            "billed_channel_requests": sum(cost.billed_requests(counted).values())}


def price(run: dict, n_workers: int, n_images: int, memory_mb: int) -> dict:
    """Modelled durations and the bill on both architectures."""
    from fsd_runtime.aws import cost

    seconds = cost.modelled_worker_seconds(run["rows"], run["channel"], memory_mb=memory_mb)
    counts = dict(run["channel_requests"])
    for extra in (store_requests(n_workers, max(seconds)), run["setup_requests"]):
        for key, value in extra.items():
            counts[key] = counts.get(key, 0) + value
    bills = {arch: cost.run_cost(counts, seconds, n_images=n_images, memory_mb=memory_mb, architecture=arch)
             for arch in cost.ARCHITECTURES}
    seed_priced = cost.run_cost(counts, seconds, n_images=n_images, memory_mb=memory_mb,
                                prices=cost.SEED_PRICES)
    return {"worker_seconds": seconds, "bills": bills,
            "usd_per_10k_seed_prices": seed_priced["usd_per_10k_inferences"]}


def table(report: dict) -> str:
    seed = SEED["queue"]
    lines = ["| channel | codec bytes | wire bytes | messages | billed requests (channel) | "
             "modelled worker s (max) | USD / 10k x86_64 | USD / 10k arm64 | seed USD / 10k |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        c, bills = run["channel_requests"], run["pricing"]["bills"]
        if run["channel"] == "queue":
            billed = (f"{run['billed_channel_requests']:,} (SNS {c.get('sns_billed_requests', 0):,} + "
                      f"SQS {c.get('sqs_billed_requests', 0):,})")
        else:
            billed = (f"{run['billed_channel_requests']:,} (PUT {c.get('s3_put_requests', 0):,} + "
                      f"GET {c.get('s3_get_requests', 0):,} + LIST {c.get('s3_list_requests', 0):,})")
        lines.append(
            f"| {run['channel']} | {run['codec_bytes'] / 1e6:.2f} MB | {run['wire_bytes'] / 1e6:.2f} MB | "
            f"{run['messages']:,} | {billed} | {max(run['pricing']['worker_seconds']):.2f} | "
            f"${bills['x86_64']['usd_per_10k_inferences']:.5f} | ${bills['arm64']['usd_per_10k_inferences']:.5f} | "
            f"${SEED[run['channel']]['usd_per_10k']} |")
    lines.append(f"| seed (queue) | — | {seed['bytes'] / 1e6:.1f} MB | {seed['messages']:,} | "
                 f">= {seed['publishes'] + seed['receives']:,} ({seed['publishes']:,} publishes + "
                 f"{seed['receives']:,} receives, deletes not counted) | 63.5 | ${seed['usd_per_10k']} | — | — |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--launcher", choices=("process", "thread"), default="process")
    parser.add_argument("--channels", default="queue,object")
    args = parser.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from awsserver import AwsServer
    from fsd_runtime import model
    from fsd_runtime.aws.clients import AwsSettings

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    server = AwsServer().start()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
    try:
        settings = AwsSettings(region="us-east-1", endpoint_url=server.endpoint_url)
        dataset = model.embedded()
        packed = dataset.network.pack()
        n_images = dataset.images.shape[0]
        runs = []
        for kind in args.channels.split(","):
            run = run_channel(kind, settings, dataset, packed, args.workers, args.launcher, server)
            run["pricing"] = price(run, args.workers, n_images, args.memory_mb)
            del run["rows"]
            runs.append(run)
    finally:
        server.stop()
    report = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "workers": args.workers,
              "images": n_images, "memory_mb": args.memory_mb, "launcher": args.launcher,
              "server": "moto 5.2 on 127.0.0.1", "seed": SEED, "targets": TARGETS, "runs": runs}
    queue = next((r for r in runs if r["channel"] == "queue"), None)
    if queue is not None:
        report["queue_targets_met"] = {
            "usd": queue["pricing"]["bills"]["x86_64"]["usd_per_10k_inferences"] <= TARGETS["queue_usd_per_10k"],
            "bytes": queue["wire_bytes"] <= TARGETS["bytes"],
            "billed_requests": queue["billed_channel_requests"] < TARGETS["queue_billed_requests"]}
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0 if all(r["golden_match"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
