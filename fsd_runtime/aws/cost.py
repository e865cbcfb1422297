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
  seed's sheet charged $0.09/GB on SNS traffic; :data:`SEED_PRICES` is its whole sheet).

Counts come from the channels (``Channel.requests()``, summed by the coordinator into
``traffic["channel_requests"]``) and from the run store. When the run did not happen on
Lambda, each worker's duration is modelled term by term (:func:`duration_terms`: its measured
compute, slowed to the memory's CPU share, the wait for each layer's slowest worker, one hop
per layer it exchanged messages in, INIT, the launch tree's skew, the share download and the
result upload); :class:`LatencyModel` holds the latency assumptions.
"""
from __future__ import annotations

import math
import re
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
#: The seed's cost sheet (its authors' spreadsheet, London prices; bench/data/paper-README.md):
#: Lambda $2.1e-9 per ms per 128 MB (= $0.0000168 per GB-s; arm64 taken 20% less, as AWS prices
#: it), S3 $0.0053 per 1,000 PUT/LIST and $0.00042 per 1,000 GET, the same SNS, SQS and
#: invocation prices, and SNS traffic charged as data out at $0.09/GB. Comparisons with the
#: paper's $ are made on this sheet too (``bench/paper.py``: ``usd_seed_prices``).
SEED_PRICES = Prices(region="eu-west-2 (the seed's sheet)", as_of="2023-24",
                     lambda_gb_second={"x86_64": 2.1e-9 * 1000 * 1024 / 128, "arm64": 0.8 * 2.1e-9 * 1000 * 1024 / 128},
                     s3_put=0.0053e-3, s3_get=0.00042e-3, data_transfer_gb=0.09)


@dataclass(frozen=True)
class LatencyModel:
    """Seconds the parts of a Lambda worker's life take that a run off Lambda cannot measure.

    Assumptions, not measurements on AWS (the ``optimistic`` preset): an SNS PublishBatch call
    (~20 ms), SNS->SQS delivery (~50 ms) and a long poll returning (~20 ms); an S3 PUT (~50 ms),
    half the first poll interval and a ranged GET (~30 ms, index and data in one). ``init_s`` is
    a cold start of Python + numpy + the compiled kernels; ``invoke_s`` an Event invoke until
    the handler runs; ``s3_request_s`` one small S3 request; ``s3_mb_per_s`` one S3 stream."""

    hop_s: Mapping[str, float] = field(default_factory=lambda: {"queue": 0.090, "object": 0.095,
                                                                "local": 0.0})
    init_s: float = 1.0
    invoke_s: float = 0.05
    s3_request_s: float = 0.03
    s3_mb_per_s: float = 80.0
    name: str = "optimistic"
    source: str = "assumed: per-call latencies from AWS documentation and write-ups, not measured"


LATENCY = LatencyModel()
#: The seed's measured per-layer exchange on the queue channel (1024 neurons, 8 workers, mean
#: 0.516 s; bench/data/paper-README.md). The mean, not the median (0.481 s): a worker's duration
#: sums its layers' exchanges, and a sum of L waits is L times their mean. The seed measured no
#: object-channel exchange: the same figure is used for it (an assumption). The rest as in the
#: optimistic preset.
SEED_MEASURED = LatencyModel(hop_s={"queue": 0.516, "object": 0.516, "local": 0.0}, name="seed-measured",
                             source="queue hop: the seed's measured mean per-layer exchange (0.516 s); "
                                    "object hop assumed equal; INIT, invoke and S3 as optimistic")
#: The presets a run's cost is shown with: a range, from the optimistic to the seed-measured.
PRESETS = {LATENCY.name: LATENCY, SEED_MEASURED.name: SEED_MEASURED}


def tree_depths(n_workers: int, fanout: int) -> list[int]:
    """Launch hops from worker 0 to each worker in the k-ary launch tree (worker 0: 0)."""
    depths = [0] * n_workers
    for w in range(1, n_workers):
        depths[w] = depths[(w - 1) // fanout] + 1
    return depths


#: Where each duration term comes from: measured here, or modelled (from measured sizes).
TERM_SOURCES = {
    "compute_s": "measured (kernels, encode, decode: the worker thread's CPU time on this machine's "
                 "core; divided by the CPU share of the memory size)",
    "straggler_wait_s": "measured (per layer: the slowest worker's compute minus this worker's)",
    "exchange_s": "modelled (layers with traffic x the preset's hop; with B image batches, less what "
                  "the other B - 1 batches' compute covers)",
    "init_s": "modelled (the preset's INIT)",
    "launch_skew_s": "modelled (waiting for the deepest worker of the launch tree: levels below x "
                     "(invoke + INIT + run check and claim))",
    "share_download_s": "modelled (measured share bytes, with a prepared model's segments, / S3 stream "
                        "rate + one request)",
    "result_upload_s": "modelled (measured result bytes / S3 stream rate + two requests)",
}


def duration_terms(rows: Iterable[Mapping], channel_kind: str, *, latency: LatencyModel = LATENCY,
                   memory_mb: int = FULL_VCPU_MB, fanout: int = 2,
                   share_bytes: Mapping[int, int] | None = None,
                   result_bytes: Mapping[int, int] | None = None, batches: int = 1) -> dict:
    """Each worker's modelled Lambda duration, term by term (see :data:`TERM_SOURCES`):
    ``{"per_worker": [seconds], "terms": {term: total seconds}, "sources": TERM_SOURCES}``.

    ``batches``: the image batches each layer ran in (rows sum them). The worker loop sends a
    batch's rows for the next layer as soon as it has computed them, so they travel while the
    other ``batches - 1`` batches compute: a layer's first batch waits for the rest of the hop,
    and each later one's rows, sent one batch's compute after the previous one's, are there
    when its turn comes. A layer with traffic costs ``max(0, hop - (batches - 1) * compute /
    batches)``: one hop when there is one batch."""
    if channel_kind not in latency.hop_s:
        raise ValueError(f"no latency model for channel kind {channel_kind!r}; known: {sorted(latency.hop_s)}")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive integer, got {batches!r}")
    slow = 1.0 / cpu_share(memory_mb)
    hop = latency.hop_s[channel_kind]
    compute: dict[tuple[int, int], float] = {}
    talked: dict[tuple[int, int], bool] = {}
    for row in rows:
        w, layer = int(row["worker"]), int(row.get("layer", 0))
        compute[w, layer] = compute.get((w, layer), 0.0) + busy_seconds(row) * slow
        talked[w, layer] = talked.get((w, layer), False) or row["messages_sent"] > 0 or row["messages_received"] > 0
    workers = sorted({w for w, _ in talked})
    layers = sorted({layer for _, layer in compute})
    slowest = {layer: max(compute.get((w, layer), 0.0) for w in workers) for layer in layers}
    depths = tree_depths(max(workers) + 1, fanout) if workers else []
    deepest = max(depths, default=0)
    level_s = latency.invoke_s + latency.init_s + 2 * latency.s3_request_s
    share_bytes, result_bytes = share_bytes or {}, result_bytes or {}
    per_term = {term: [] for term in TERM_SOURCES}
    for w in workers:
        mine = [compute.get((w, layer), 0.0) for layer in layers]
        per_term["compute_s"].append(sum(mine))
        per_term["straggler_wait_s"].append(sum(slowest[layer] - c for layer, c in zip(layers, mine)))
        per_term["exchange_s"].append(sum(max(0.0, hop - (batches - 1) * c / batches)
                                          for layer, c in zip(layers, mine) if talked.get((w, layer))))
        per_term["init_s"].append(latency.init_s)
        per_term["launch_skew_s"].append((deepest - depths[w]) * level_s)
        per_term["share_download_s"].append(latency.s3_request_s
                                            + share_bytes.get(w, 0) / 1e6 / latency.s3_mb_per_s)
        per_term["result_upload_s"].append(2 * latency.s3_request_s
                                           + result_bytes.get(w, 0) / 1e6 / latency.s3_mb_per_s)
    per_worker = [sum(values[i] for values in per_term.values()) for i in range(len(workers))]
    return {"per_worker": per_worker, "terms": {t: sum(v) for t, v in per_term.items()},
            "sources": dict(TERM_SOURCES), "latency": {**asdict(latency), "hop_s": dict(latency.hop_s)},
            "memory_mb": memory_mb, "cpu_share": cpu_share(memory_mb)}


_REPORT = re.compile(r"REPORT RequestId: (?P<id>[0-9a-fA-F-]+)\s+Duration: (?P<duration>[0-9.]+) ms\s+"
                     r"Billed Duration: (?P<billed>[0-9]+) ms\s+Memory Size: (?P<memory>[0-9]+) MB"
                     r"\s+Max Memory Used: (?P<used>[0-9]+) MB(?:\s+Init Duration: (?P<init>[0-9.]+) ms)?")


def parse_report(line: str) -> dict | None:
    """Lambda's ``REPORT`` log line (one per invocation) as numbers; None if it is not one."""
    match = _REPORT.search(line)
    if match is None:
        return None
    return {"request_id": match["id"], "duration_s": float(match["duration"]) / 1000,
            "billed_s": int(match["billed"]) / 1000, "memory_mb": int(match["memory"]),
            "max_memory_used_mb": int(match["used"]),
            "init_s": float(match["init"]) / 1000 if match["init"] else None}


def cpu_share(memory_mb: int) -> float:
    """The vCPU share Lambda gives a function of ``memory_mb`` (one full vCPU at 1,769 MB)."""
    return min(1.0, memory_mb / FULL_VCPU_MB)


def busy_seconds(row: Mapping) -> float:
    """A metrics row's kernel + encode + decode time: the worker thread's CPU time where the row
    has it (``*_cpu_s``; wall clock on a machine with more workers than cores also counts the
    waits for a core, which a Lambda worker with its own vCPU does not have), else wall clock."""
    if "compute_cpu_s" in row:
        return row["compute_cpu_s"] + row["encode_cpu_s"] + row["decode_cpu_s"]
    return row["compute_s"] + row["encode_s"] + row["decode_s"]


def modelled_worker_seconds(rows: Iterable[Mapping], channel_kind: str, latency: LatencyModel = LATENCY,
                            memory_mb: int = FULL_VCPU_MB) -> list[float]:
    """Per worker: measured compute + encode + decode (``busy_seconds``: CPU time on one core;
    slowed by the CPU share of ``memory_mb``), plus ``hop_s`` per layer with traffic, plus
    ``init_s``. ``rows`` are the coordinator's merged metrics (fsd_runtime.metrics)."""
    if channel_kind not in latency.hop_s:
        raise ValueError(f"no latency model for channel kind {channel_kind!r}; known: {sorted(latency.hop_s)}")
    compute: dict[int, float] = {}
    hops: dict[int, int] = {}
    for row in rows:
        w = int(row["worker"])
        compute[w] = compute.get(w, 0.0) + busy_seconds(row)
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


def billed_ms(seconds: float) -> int:
    """Lambda's billed duration of ``seconds``: whole milliseconds, rounded up (2.007 s is 2,007 ms,
    although ``2.007 * 1000`` is a hair above 2007 in floating point)."""
    return math.ceil(round(seconds * 1000, 6))


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
    gb_seconds = sum(billed_ms(s) for s in worker_seconds) / 1000 * memory_mb / 1024
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


#: Lambda's memory sizes step by 1 MB from 128 MB; sized here in 64 MB steps.
MEMORY_STEP_MB = 64


def fitting_memory_mb(peak_rss_mb: float, *, headroom: float = 1.25, most_mb: int = 10240) -> int:
    """The smallest Lambda memory size (a multiple of 64 MB, at least 128) that holds a worker
    whose measured peak resident set is ``peak_rss_mb``, with ``headroom`` to spare.

    Below one vCPU (1,769 MB) Lambda's CPU share, and so a CPU-bound worker's duration, scale
    with memory: GB-seconds of compute stay the same, while the seconds spent waiting for
    messages cost in proportion to memory. The smallest size that fits is then the cheapest in
    the model (``modelled_worker_seconds``), which counts the slower compute. ValueError if the
    worker does not fit in Lambda's largest size."""
    if not (math.isfinite(peak_rss_mb) and peak_rss_mb > 0) or headroom < 1:
        raise ValueError(f"peak_rss_mb must be positive and headroom >= 1, got {peak_rss_mb}, {headroom}")
    need = math.ceil(peak_rss_mb * headroom / MEMORY_STEP_MB) * MEMORY_STEP_MB
    if need > most_mb:
        raise ValueError(f"a worker peaking at {peak_rss_mb:.0f} MB needs {need} MB with headroom "
                         f"{headroom}: more than Lambda's {most_mb} MB (use more workers or smaller batches)")
    return max(128, need)
