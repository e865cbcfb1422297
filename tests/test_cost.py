"""The cost model against hand-worked bills, and billed-chunk counting at its boundaries."""
from __future__ import annotations

import pytest

from fsd_runtime import cost
from fsd_runtime.aws import billed_chunks


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


def test_durations_are_billed_per_started_millisecond():
    bill = cost.run_cost({}, [0.0011], n_images=1, memory_mb=1024)
    assert bill["gb_seconds"] == pytest.approx(0.002)


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
