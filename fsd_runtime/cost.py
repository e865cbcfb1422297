"""What a run costs on AWS, from its measured counts (docs/cost.md has the table and the reasoning).

Billing rules used (AWS pricing pages, us-east-1, list prices, no free tier):

* Lambda: GB-seconds (configured memory x billed duration, 1 ms granularity, the
  INIT phase included since August 2025) at a per-architecture price, plus a price per
  invocation;
* SNS: one request per started 64 KiB of each Publish/PublishBatch call's payload
  (body + attributes); deliveries to SQS are free;
* SQS: one request per started 64 KiB of each call's payload (ReceiveMessage, also when
  empty, DeleteMessageBatch, ...);
* S3: per request, PUT/COPY/POST/LIST at one price, GET at a twelfth of it; DELETE free;
* data transfer: free inside a region (the default), priced per GB when asked for (the
  seed charged $0.09/GB on SNS traffic; :data:`SEED_PRICES` reproduces that).

Counts come from the channels (``Channel.requests()``, summed by the coordinator into
``traffic["channel_requests"]``) and from the run store. When the run did not happen on
Lambda, each worker's duration is modelled as its measured compute (kernels, encode,
decode) plus one communication hop per layer it exchanged messages in, plus the
Lambda INIT time: :class:`LatencyModel` holds those assumptions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

ARCHITECTURES = ("x86_64", "arm64")
#: Lambda memory size that comes with one full vCPU.
FULL_VCPU_MB = 1769


@dataclass(frozen=True)
class Prices:
    """USD list prices; region and date say where and when they were read."""

    region: str = "us-east-1"
    as_of: str = "2026-11-30"
    lambda_gb_second: Mapping[str, float] = field(
        default_factory=lambda: {"x86_64": 0.0000166667, "arm64": 0.0000133334})
    lambda_invocation: float = 0.20e-6
    sns_request: float = 0.50e-6          # per 64 KiB chunk published
    sqs_request: float = 0.40e-6          # per 64 KiB chunk of any call
    s3_put: float = 0.005e-3              # PUT, COPY, POST, LIST
    s3_get: float = 0.0004e-3             # GET, HEAD and the rest
    data_transfer_gb: float = 0.0         # same region: free


PRICES = Prices()
#: The seed's cost sheet: the same request prices, but SNS traffic charged as data out.
SEED_PRICES = Prices(data_transfer_gb=0.09)


@dataclass(frozen=True)
class LatencyModel:
    """Seconds a layer's message exchange adds to a worker's duration, per channel kind.

    Assumptions, not measurements on AWS: an SNS PublishBatch call (~20 ms), SNS->SQS
    delivery (~50 ms) and a long poll returning (~20 ms); an S3 PUT (~50 ms), half the
    first poll interval and a ranged GET (~30 ms, index and data in one). ``init_s`` is a
    cold start of Python + numpy + the compiled kernels."""

    hop_s: Mapping[str, float] = field(default_factory=lambda: {"queue": 0.090, "object": 0.095,
                                                                "local": 0.0})
    init_s: float = 1.0


LATENCY = LatencyModel()


def cpu_share(memory_mb: int) -> float:
    """The vCPU share Lambda gives a function of ``memory_mb`` (one full vCPU at 1,769 MB)."""
    return min(1.0, memory_mb / FULL_VCPU_MB)


def modelled_worker_seconds(rows: Iterable[Mapping], channel_kind: str, latency: LatencyModel = LATENCY,
                            memory_mb: int = FULL_VCPU_MB) -> list[float]:
    """Per worker: measured compute + encode + decode (on one core; slowed by the CPU share of
    ``memory_mb``), plus ``hop_s`` per layer with traffic, plus ``init_s``. ``rows`` are the
    coordinator's merged metrics (fsd_runtime.metrics)."""
    if channel_kind not in latency.hop_s:
        raise ValueError(f"no latency model for channel kind {channel_kind!r}; known: {sorted(latency.hop_s)}")
    compute: dict[int, float] = {}
    hops: dict[int, int] = {}
    for row in rows:
        w = int(row["worker"])
        compute[w] = compute.get(w, 0.0) + row["compute_s"] + row["encode_s"] + row["decode_s"]
        talked = row["messages_sent"] > 0 or row["messages_received"] > 0
        hops[w] = hops.get(w, 0) + int(talked)
    slow = 1.0 / cpu_share(memory_mb)
    return [compute[w] * slow + hops[w] * latency.hop_s[channel_kind] + latency.init_s for w in sorted(compute)]


def billed_requests(requests: Mapping[str, float]) -> dict[str, int]:
    """The billing units in a channel's (or store's) counters: SNS/SQS 64 KiB chunks, S3 calls."""
    get = lambda key: int(requests.get(key, 0))  # noqa: E731
    return {"sns": get("sns_billed_requests"), "sqs": get("sqs_billed_requests"),
            "s3_put": get("s3_put_requests") + get("s3_list_requests"), "s3_get": get("s3_get_requests")}


def s3_counters(attempts: Mapping[str, int]) -> dict[str, int]:
    """A run store's per-operation attempt counts (``aws.Caller.attempts``) as channel-style counters
    (deletes are free and left out)."""
    get = lambda *names: sum(int(attempts.get(n, 0)) for n in names)  # noqa: E731
    return {"s3_put_requests": get("PutObject", "CreateBucket"),
            "s3_list_requests": get("ListObjectsV2", "ListObjects"),
            "s3_get_requests": get("GetObject", "HeadObject", "HeadBucket")}


def run_cost(requests: Mapping[str, float], worker_seconds: Sequence[float], *, n_images: int,
             memory_mb: int = 2048, architecture: str = "x86_64", invocations: int | None = None,
             transfer_bytes: int | None = None, prices: Prices = PRICES) -> dict:
    """The run's cost in USD, by part, and per 10,000 inferences.

    ``requests``: summed channel/store counters; ``worker_seconds``: each worker's (billed or
    modelled) duration; ``invocations`` defaults to one per worker; ``transfer_bytes`` (priced
    at ``prices.data_transfer_gb``) defaults to the SNS bytes published."""
    if architecture not in prices.lambda_gb_second:
        raise ValueError(f"architecture must be one of {sorted(prices.lambda_gb_second)}, got {architecture!r}")
    if not 128 <= memory_mb <= 10240:
        raise ValueError(f"Lambda memory must be 128..10240 MB, got {memory_mb}")
    if n_images <= 0 or any(s < 0 for s in worker_seconds):
        raise ValueError("n_images must be positive and durations non-negative")
    billed = billed_requests(requests)
    gb_seconds = sum(math.ceil(s * 1000) / 1000 for s in worker_seconds) * memory_mb / 1024
    invocations = len(worker_seconds) if invocations is None else invocations
    if transfer_bytes is None:
        transfer_bytes = int(requests.get("bytes_sent", 0)) if billed["sns"] else 0
    parts = {
        "lambda_compute": gb_seconds * prices.lambda_gb_second[architecture],
        "lambda_requests": invocations * prices.lambda_invocation,
        "sns": billed["sns"] * prices.sns_request,
        "sqs": billed["sqs"] * prices.sqs_request,
        "s3": billed["s3_put"] * prices.s3_put + billed["s3_get"] * prices.s3_get,
        "data_transfer": transfer_bytes / 1e9 * prices.data_transfer_gb,
    }
    usd = sum(parts.values())
    return {"usd": usd, "usd_per_10k_inferences": usd * 10_000 / n_images, "parts": parts,
            "billed_requests": billed, "gb_seconds": gb_seconds, "invocations": invocations,
            "memory_mb": memory_mb, "architecture": architecture,
            "prices": {**asdict(prices), "lambda_gb_second": dict(prices.lambda_gb_second)}}
