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
from fsd_runtime.aws import AwsSettings

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
