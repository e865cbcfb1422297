"""The billing replay (fsd_runtime.billing, what bench/paper.py prices) against real runs of the
queue (SNS+SQS) and object (S3) channels through the local AWS-API server (moto, 127.0.0.1):
the deterministic parts (publishes, SNS billed requests, bytes, PUTs, messages delivered) must be
exactly what the channels counted; the timing-dependent parts (receive calls, GETs, LISTs) must
lie within the replay's optimistic and conservative bounds where those are bounds."""
import uuid

import numpy as np
import pytest
import scipy.sparse as sp

import fsd_kernels
from fsd_runtime import model
from fsd_runtime.aws import billing
from fsd_runtime.coordinator import run_distributed
from test_differential import assert_bit_identical, images_csr, pack, random_bias, random_images, random_layer, \
    reference


def _run(net, images, n_workers, channel):
    result = run_distributed(net, images, n_workers, channel=channel, launcher={"kind": "thread"},
                             receive_timeout=120, run_timeout=900)
    serial = fsd_kernels.infer(*images, net)
    a = result.activations
    assert np.array_equal(a.indptr, serial.indptr) and np.array_equal(a.data.view(np.uint32), serial.data.view(np.uint32))
    return result


def _cases():
    official = model.embedded()
    small = model.Dataset(official.name, official.network, official.images.rows(0, 2000), None)
    synthetic = model.synthetic(4096, 8, 300, seed=2)
    return {"1024/8": (small, 8), "4096/16": (synthetic, 16)}


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_queue_replay_matches_the_channel(aws, aws_settings, case):
    ds, P = CASES[case]
    config = {"kind": "queue", "prefix": f"b{uuid.uuid4().hex[:6]}", "aws": aws_settings.to_dict()}
    result = _run(ds.network.pack(), ds.images.arrays, P, config)
    real = result.traffic["channel_requests"]
    model_ = billing.queue_requests(result.worker_metrics)
    assert model_["sns_publish_calls"] == real["sns_publish_calls"] > 0
    assert model_["sns_billed_requests"] == real["sns_billed_requests"]
    assert model_["bytes_sent"] == real["bytes_sent"]
    assert model_["messages_sent"] == real["messages_sent"] == result.traffic["chunks"]
    skipped = real.get("probes_skipped", 0) + real.get("foreign_skipped", 0)
    assert model_["messages_received"] == real["messages_received"] - skipped
    assert model_["sqs_receive_calls_optimistic"] <= real["sqs_receive_calls"] \
        <= model_["sqs_receive_calls_conservative"] + skipped
    assert model_["sqs_billed_requests_optimistic"] <= real["sqs_billed_requests"] \
        <= model_["sqs_billed_requests_conservative"] + skipped
    # the replay also gives the queue channel's chunk limit, so local runs cut chunks alike
    assert billing.queue_max_chunk_bytes(P) < 256 * 1024


@pytest.mark.parametrize("case", list(CASES))
def test_object_replay_matches_the_channel(aws, aws_settings, case):
    ds, P = CASES[case]
    config = {"kind": "object", "bucket": f"b{uuid.uuid4().hex[:8]}", "aws": aws_settings.to_dict()}
    result = _run(ds.network.pack(), ds.images.arrays, P, config)
    real = result.traffic["channel_requests"]
    model_ = billing.object_requests(result.worker_metrics, P)
    assert model_["s3_put_requests"] == real["s3_put_requests"] > 0
    assert model_["bytes_sent"] == real["bytes_sent"]
    assert model_["messages_received"] == real["messages_received"]
    # each worker reads exactly the objects of the peers that sent it chunks: the GETs that found
    # an object are the replay's reads, whatever the timing
    assert real["s3_get_requests"] - real.get("s3_get_misses", 0) == model_["s3_get_reads"] > 0
    assert real["s3_polls"] >= model_["s3_polls_optimistic"]
    assert real["s3_get_requests"] >= model_["s3_get_requests_optimistic"]
    assert real.get("s3_list_requests", 0) >= model_["s3_list_requests_optimistic"]
    # LISTs exactly where some worker awaits more than 12 objects in a step (the root, at P = 16)
    assert (real.get("s3_list_requests", 0) > 0) == (model_["s3_list_requests_optimistic"] > 0) == (P - 1 > 12)


@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("kind", ["queue", "object"])
def test_random_networks_run_exactly_and_replay_over_the_aws_channels(aws, aws_settings, kind, seed):
    """Not the challenge nets: odd N, weights of both signs, a bias per neuron, irregular peer
    sets and several batches a layer (steps), through the real channel against the local server;
    bit for bit against the independent reference, and the replay's fixed counts are the channel's."""
    rng = np.random.default_rng(seed)
    n, n_layers, P = int(rng.choice([29, 37, 53])), 7, 5
    layers = [random_layer(rng, n) for _ in range(n_layers)]
    biases = [random_bias(rng, n) for _ in range(n_layers)]
    dense = random_images(rng, n, 24, 8.0)
    want = reference(sp.csr_matrix(dense), layers, biases, 8.0)
    config = ({"kind": "queue", "prefix": f"b{uuid.uuid4().hex[:6]}"} if kind == "queue"
              else {"kind": "object", "bucket": f"b{uuid.uuid4().hex[:8]}"})
    result = run_distributed(pack(layers, biases, 8.0), images_csr(dense), P,
                             channel={**config, "aws": aws_settings.to_dict()}, launcher={"kind": "thread"},
                             batch_size=7, receive_timeout=120, run_timeout=900)
    assert_bit_identical(result.activations, want, f"{kind} seed {seed}")
    real = result.traffic["channel_requests"]
    if kind == "queue":
        model_ = billing.queue_requests(result.worker_metrics)
        assert model_["sns_publish_calls"] == real.get("sns_publish_calls", 0)
        assert model_["bytes_sent"] == real.get("bytes_sent", 0)
        return
    model_ = billing.object_requests(result.worker_metrics, P, n_batches=max(int(m.get("batches") or 1)
                                                                             for m in result.worker_metrics))
    assert model_["s3_put_requests"] == real.get("s3_put_requests", 0)
    assert model_["bytes_sent"] == real.get("bytes_sent", 0)
    assert model_["messages_received"] == real.get("messages_received", 0)
    assert real.get("s3_get_requests", 0) - real.get("s3_get_misses", 0) == model_["s3_get_reads"]
