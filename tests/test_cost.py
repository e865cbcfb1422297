"""The cost model against hand-worked bills, and billed-chunk counting at its boundaries."""
from __future__ import annotations

import pytest

from fsd_runtime.aws import cost
from fsd_runtime.aws.clients import billed_chunks


@pytest.mark.parametrize("payload, chunks", [(0, 1), (1, 1), (65536, 1), (65537, 2), (262144, 4), (262145, 5)])
def test_sns_and_sqs_bill_every_started_64_kib(payload, chunks):
    assert billed_chunks(payload) == chunks


def test_a_queue_run_priced_by_hand():
    counts = {"sns_billed_requests": 1_000, "sqs_billed_requests": 3_000, "bytes_sent": 2_000_000_000,
              "messages_sent": 7_000}
    bill = cost.run_cost(counts, [10.0] * 8, n_images=5_000, memory_mb=1024)
    lambda_usd = 8 * 10.0 * 1.0 * 0.0000166667 + 8 * 0.20e-6
    requests_usd = 1_000 * 0.50e-6 + 3_000 * 0.40e-6
    assert bill["usd"] == pytest.approx(lambda_usd + requests_usd, rel=1e-12)
    assert bill["usd_per_10k_inferences"] == pytest.approx(2 * bill["usd"], rel=1e-12)
    assert bill["parts"]["data_transfer"] == 0.0                      # same region: free
    seed_style = cost.run_cost(counts, [10.0] * 8, n_images=5_000, memory_mb=1024, prices=cost.SEED_PRICES)
    assert seed_style["parts"]["data_transfer"] == pytest.approx(2.0 * 0.09)


def test_an_object_run_priced_by_hand_and_lists_cost_like_puts():
    counts = {"s3_put_requests": 100, "s3_list_requests": 50, "s3_get_requests": 1_000}
    bill = cost.run_cost(counts, [2.0, 3.0], n_images=10_000, memory_mb=2048, architecture="arm64")
    expected = 5.0 * 2 * 0.0000133334 + 2 * 0.20e-6 + 150 * 0.005e-3 + 1_000 * 0.0004e-3
    assert bill["usd"] == pytest.approx(expected, rel=1e-12)
    assert bill["billed_requests"] == {"sns": 0, "sqs": 0, "s3_put": 150, "s3_get": 1_000}
    # the seed's sheet (bench/data/paper-README.md): $2.1e-9 per ms per 128 MB, London S3 prices
    seed = cost.run_cost(counts, [2.0, 3.0], n_images=10_000, memory_mb=2048, prices=cost.SEED_PRICES)
    assert seed["usd"] == pytest.approx(5_000 * 16 * 2.1e-9 + 2 * 0.20e-6 + 150 * 0.0053e-3 + 1_000 * 0.00042e-3,
                                        rel=1e-12)


def test_durations_are_billed_per_started_millisecond_without_float_noise():
    bill = cost.run_cost({}, [0.0011], n_images=1, memory_mb=1024)
    assert bill["gb_seconds"] == pytest.approx(0.002)
    # 2.007 * 1000 is a hair above 2007 in floating point: still 2,007 ms, not 2,008
    assert [cost.billed_ms(s) for s in (2.007, 2.011, 0.0001, 0.001, 0.0, 899.9995)] == [2007, 2011, 1, 1, 0, 900000]
    bill = cost.run_cost({}, [2.007, 4.0191], n_images=1, memory_mb=1024)
    assert bill["gb_seconds"] == pytest.approx((2007 + 4020) / 1000)


def test_arm64_is_cheaper_per_gb_second_and_bad_settings_are_refused():
    x86 = cost.run_cost({}, [60.0], n_images=1, architecture="x86_64")
    arm = cost.run_cost({}, [60.0], n_images=1, architecture="arm64")
    assert arm["parts"]["lambda_compute"] == pytest.approx(0.8 * x86["parts"]["lambda_compute"], rel=1e-4)
    with pytest.raises(ValueError, match="architecture"):
        cost.run_cost({}, [1.0], n_images=1, architecture="riscv")
    with pytest.raises(ValueError, match="memory"):
        cost.run_cost({}, [1.0], n_images=1, memory_mb=64)
    with pytest.raises(ValueError, match="n_images"):
        cost.run_cost({}, [1.0], n_images=0)


def test_modelled_duration_is_compute_plus_one_hop_per_talking_layer():
    def row(worker, layer, compute, sent, received):
        return {"worker": worker, "layer": layer, "compute_s": compute, "encode_s": 0.01, "decode_s": 0.02,
                "messages_sent": sent, "messages_received": received}

    rows = [row(0, 0, 0.5, 3, 3), row(0, 1, 0.5, 0, 0), row(1, 0, 0.25, 0, 2), row(1, 1, 0.25, 1, 0)]
    latency = cost.LatencyModel(hop_s={"queue": 0.1}, init_s=1.0)
    seconds = cost.modelled_worker_seconds(rows, "queue", latency)
    assert seconds == pytest.approx([1.0 + 0.06 + 1 * 0.1 + 1.0, 0.5 + 0.06 + 2 * 0.1 + 1.0])
    half_cpu = cost.modelled_worker_seconds(rows, "queue", latency, memory_mb=884)
    assert half_cpu[0] == pytest.approx(1.06 * 1769 / 884 + 0.1 + 1.0)   # compute slows, waiting does not
    with pytest.raises(ValueError, match="latency model"):
        cost.modelled_worker_seconds(rows, "carrier-pigeon", latency)


def test_store_attempts_map_to_s3_billing_units():
    counters = cost.s3_counters({"PutObject": 24, "GetObject": 16, "ListObjectsV2": 5, "DeleteObjects": 3})
    assert cost.billed_requests(counters) == {"sns": 0, "sqs": 0, "s3_put": 29, "s3_get": 16}


def _rows(workers=4, layers=3):
    return [{"worker": w, "layer": l, "compute_s": 0.1 * (w + 1), "encode_s": 0.0, "decode_s": 0.0,
             "messages_sent": 1, "messages_received": 1} for w in range(workers) for l in range(layers)]


def test_duration_terms_add_skew_stragglers_share_and_result_transfers():
    latency = cost.LatencyModel(hop_s={"queue": 0.5}, init_s=1.0, invoke_s=0.05, s3_request_s=0.03,
                                s3_mb_per_s=100.0)
    model = cost.duration_terms(_rows(), "queue", latency=latency, memory_mb=cost.FULL_VCPU_MB, fanout=2,
                                share_bytes={0: 100_000_000, 3: 0}, result_bytes={1: 50_000_000})
    assert cost.tree_depths(4, 2) == [0, 1, 1, 2]
    level = 0.05 + 1.0 + 2 * 0.03
    w0 = (3 * 0.1) + 3 * (0.4 - 0.1) + 3 * 0.5 + 1.0 + 2 * level + (0.03 + 1.0) + 2 * 0.03
    assert model["per_worker"][0] == pytest.approx(w0)
    w3 = 3 * 0.4 + 0 + 3 * 0.5 + 1.0 + 0 + 0.03 + 2 * 0.03   # the slowest and deepest waits for no one
    assert model["per_worker"][3] == pytest.approx(w3)
    assert model["terms"]["launch_skew_s"] == pytest.approx((2 + 1 + 1) * level)
    assert model["terms"]["result_upload_s"] == pytest.approx(4 * 0.06 + 0.5)
    assert set(model["terms"]) == set(cost.TERM_SOURCES) == set(model["sources"])
    assert all(text.startswith(("measured", "modelled")) for text in model["sources"].values())
    # the memory size buys a CPU share: half of it doubles compute and straggling, nothing else
    half = cost.duration_terms(_rows(), "queue", latency=latency, memory_mb=cost.FULL_VCPU_MB // 2, fanout=2)
    full = cost.duration_terms(_rows(), "queue", latency=latency, memory_mb=cost.FULL_VCPU_MB, fanout=2)
    assert half["terms"]["compute_s"] == pytest.approx(full["terms"]["compute_s"] * cost.FULL_VCPU_MB
                                                       / (cost.FULL_VCPU_MB // 2))
    assert half["terms"]["exchange_s"] == full["terms"]["exchange_s"]


def test_presets_give_a_range_with_the_seed_measured_exchange():
    assert cost.SEED_MEASURED.hop_s["queue"] == 0.516 and cost.LATENCY.hop_s["queue"] == 0.090
    bills = {name: cost.run_cost({}, cost.duration_terms(_rows(8, 20), "queue", latency=p)["per_worker"],
                                 n_images=10_000) for name, p in cost.PRESETS.items()}
    extra_s = 8 * 20 * (0.516 - 0.090)  # every worker exchanges in every layer
    assert bills["seed-measured"]["usd"] - bills["optimistic"]["usd"] == pytest.approx(
        extra_s * 2048 / 1024 * cost.PRICES.lambda_gb_second["x86_64"], rel=1e-3)


def test_report_line_is_parsed():
    line = ("REPORT RequestId: 3f5c2b1e-0000-4a5b-9c8d-123456789abc\tDuration: 1234.56 ms\tBilled Duration: 1235 ms"
            "\tMemory Size: 2048 MB\tMax Memory Used: 312 MB\tInit Duration: 456.78 ms\t")
    report = cost.parse_report(line)
    assert report == {"request_id": "3f5c2b1e-0000-4a5b-9c8d-123456789abc", "duration_s": pytest.approx(1.23456),
                      "billed_s": 1.235, "memory_mb": 2048, "max_memory_used_mb": 312,
                      "init_s": pytest.approx(0.45678)}
    assert cost.parse_report("START RequestId: x Version: $LATEST") is None
    warm = cost.parse_report(line.split("\tInit")[0])
    assert warm["init_s"] is None and warm["billed_s"] == 1.235


def test_billed_durations_come_from_the_report_lines(aws_settings):
    """CloudWatch Logs on the local server, written as Lambda writes them: the handler's JSON line
    ties request id to run and worker; REPORT has the billed duration (a duplicate is billed too)."""
    import json
    import time
    import uuid

    from fsd_runtime.aws.clients import client
    from fsd_runtime.aws.run import billed_from_logs

    logs = client("logs", aws_settings)
    function = f"fsd-{uuid.uuid4().hex[:6]}"
    group = f"/aws/lambda/{function}"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="s")
    now = int(time.time() * 1000)
    lines = []
    for request, worker, run, billed in (("a-1", 0, "run1", 1500), ("a-2", 1, "run1", 2500),
                                         ("a-3", 1, "run1", 7), ("b-1", 0, "other", 9999)):
        lines.append(json.dumps({"level": "INFO", "message": "worker starting", "run": run, "worker": worker,
                                 "request_id": request}))
        lines.append(f"REPORT RequestId: {request}\tDuration: 1.0 ms\tBilled Duration: {billed} ms\t"
                     f"Memory Size: 2048 MB\tMax Memory Used: 300 MB\t")
    logs.put_log_events(logGroupName=group, logStreamName="s",
                        logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(lines)])
    assert billed_from_logs(logs, function, "run1", 2, now - 1000, wait_s=0) == [1.5, 2.507]
    assert billed_from_logs(logs, function, "run1", 3, now - 1000, wait_s=0) is None  # worker 2 missing


@pytest.mark.parametrize("peak, want", [(1, 128), (102.4, 128), (102.5, 192), (207.0, 320), (550.0, 704),
                                        (8191.0, 10240)])
def test_fitting_memory_is_the_smallest_64_mb_step_with_a_quarter_to_spare(peak, want):
    got = cost.fitting_memory_mb(peak)
    assert got == want and got % 64 == 0 and got >= peak * 1.25
    assert got == 128 or got - 64 < peak * 1.25  # one step less would not fit


def test_fitting_memory_refuses_what_lambda_cannot_hold_or_nonsense():
    for bad in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            cost.fitting_memory_mb(bad)
    with pytest.raises(ValueError, match="more than Lambda"):
        cost.fitting_memory_mb(9000.0)
    with pytest.raises(ValueError):
        cost.fitting_memory_mb(100.0, headroom=0.5)


def test_below_one_vcpu_less_memory_never_costs_more_in_the_model():
    rows = [{"worker": 0, "layer": l, "compute_s": 0.2, "encode_s": 0.05, "decode_s": 0.05,
             "messages_sent": 1, "messages_received": 1} for l in range(20)]
    usd = []
    for mb in (128, 320, 1000, 1769):
        seconds = cost.modelled_worker_seconds(rows, "queue", latency=cost.SEED_MEASURED, memory_mb=mb)
        usd.append(cost.run_cost({}, seconds, n_images=10000, memory_mb=mb)["parts"]["lambda_compute"])
    assert usd == sorted(usd) and usd[0] < usd[-1]


def test_busy_time_is_cpu_time_where_the_metrics_have_it():
    wall = {"compute_s": 3.0, "encode_s": 1.0, "decode_s": 1.0}
    assert cost.busy_seconds(wall) == 5.0  # older metrics: wall clock
    both = {**wall, "compute_cpu_s": 0.5, "encode_cpu_s": 0.25, "decode_cpu_s": 0.25}
    assert cost.busy_seconds(both) == 1.0
    rows = [{"worker": 0, "layer": 0, "messages_sent": 0, "messages_received": 0, **both}]
    [seconds] = cost.modelled_worker_seconds(rows, "local", memory_mb=cost.FULL_VCPU_MB)
    assert seconds == pytest.approx(1.0 + cost.LATENCY.init_s)


def test_the_exchange_of_several_batches_is_what_the_other_batches_compute_does_not_hide():
    # one worker, two layers with traffic and one without; 0.3 s of compute per layer over B batches
    rows = [{"worker": 0, "layer": l, "compute_s": 0.3, "encode_s": 0.0, "decode_s": 0.0,
             "messages_sent": int(l < 2), "messages_received": 0} for l in range(3)]
    latency = cost.LatencyModel(hop_s={"queue": 0.5})

    def exchange(batches):
        return cost.duration_terms(rows, "queue", latency=latency, batches=batches)["terms"]["exchange_s"]

    def simulated(batches, layers):
        """The worker loop's schedule, step by step: batch b's rows for the next layer leave when
        it has computed this one and arrive a hop later; the worker waits for them in its turn
        (layer 0's inputs are in the share: no wait)."""
        c, hop = 0.3 / batches, latency.hop_s["queue"]
        now, waited, sent = 0.0, 0.0, [None] * batches
        for _ in range(layers):
            for b in range(batches):
                arrival = 0.0 if sent[b] is None else sent[b] + hop
                waited += max(0.0, arrival - now)
                now = max(now, arrival) + c
                sent[b] = now
        return waited

    assert exchange(1) == pytest.approx(2 * 0.5)                       # one hop a layer with traffic
    # B = 3: a batch's rows leave as soon as it is computed and travel while the other two
    # batches (0.1 s each) compute: a layer's first batch waits 0.5 - 0.2 s, the later ones not
    assert exchange(3) == pytest.approx(2 * (0.5 - 0.2))
    assert exchange(6) == pytest.approx(2 * (0.5 - 5 * 0.05))
    assert exchange(30) == pytest.approx(2 * (0.5 - 29 * 0.01))        # a layer's compute < the hop
    for batches in (1, 2, 3, 6, 30):                                    # what the schedule waits
        assert exchange(batches) == pytest.approx(simulated(batches, layers=3), abs=1e-9)
    latency = cost.LatencyModel(hop_s={"queue": 0.2})
    assert exchange(2) == pytest.approx(2 * (0.2 - 0.15))
    assert exchange(3) == pytest.approx(0.0, abs=1e-12)                # 2 x 0.1 s covers the hop
    assert exchange(4) == 0.0                                          # 3 x 0.075 s is more than it
    for batches in (2, 3, 4):
        assert exchange(batches) == pytest.approx(simulated(batches, layers=3), abs=1e-9)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batches"):
            cost.duration_terms(rows, "queue", latency=latency, batches=bad)
