"""Fixtures shared by tests/ and bench/ (pytest loads this for both)."""
import pytest

from fsd_runtime import model


@pytest.fixture(scope="session")
def official():
    """The embedded official 1024x120 network with the first 10,000 inputs and golden categories."""
    return model.embedded()


@pytest.fixture(scope="session")
def official_packed(official):
    return official.network.pack()
