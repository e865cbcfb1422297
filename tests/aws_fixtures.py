"""pytest plugin: a local AWS-API server (tests/awsserver.py) on 127.0.0.1 for the whole session.

The session gets dummy credentials and AWS_ENDPOINT_URL pointing at the server, so
nothing a test starts (worker processes included) can reach real AWS; ``aws`` gives
each test the server with its fault rules and request counts cleared.
"""
from __future__ import annotations

import logging
import os

import pytest

from awsserver import AwsServer
from fsd_runtime.aws.clients import AwsSettings

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="session")
def aws_server():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = AwsServer().start()
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL", "AWS_PROFILE"]}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=server.endpoint_url)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def aws(aws_server):
    """The session's server with no fault rules and zeroed request counts."""
    aws_server.faults.clear()
    yield aws_server
    aws_server.faults.clear()


@pytest.fixture
def aws_settings(aws_server) -> AwsSettings:
    """Settings pointing at the local server, with short backoff so retry tests stay fast."""
    return AwsSettings(region="us-east-1", endpoint_url=aws_server.endpoint_url,
                       backoff_base=0.01, backoff_cap=0.1)


@pytest.fixture(scope="session")
def serial_official(official, official_packed):
    """The serial result every distributed run must reproduce bit for bit."""
    from fsd_kernels import infer

    return infer(*official.images.arrays, official_packed)


@pytest.fixture
def distributed_official(official, official_packed, serial_official):
    """Run the official 1024x120 x 10k images over a channel config with worker threads
    (the worker loop and channel code of a Lambda worker); assert the result is the serial
    one, bit for bit, with the 337 golden categories; return the RunResult."""
    import numpy as np

    from fsd_runtime.coordinator import run_distributed

    def run(channel: dict, n_workers: int = 3):
        result = run_distributed(official_packed, official.images.arrays, n_workers, partition="contiguous",
                                 channel=channel, launcher={"kind": "thread"}, receive_timeout=60)
        assert np.array_equal(result.categories, official.categories) and len(result.categories) == 337
        for got, want in zip(result.activations[:3], serial_official[:3]):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        return result

    return run
