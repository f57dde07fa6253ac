"""Fixtures shared by every Python suite: the live `openrun serve` that scripts/python-tests
started (its URL, an API key, the binary and the data dir), read from the environment."""

import os

import pytest


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: run these tests through scripts/python-tests, "
            "which starts the server they talk to"
        )
    return value


@pytest.fixture(scope="session")
def server_url() -> str:
    """Base URL of the live server, e.g. http://127.0.0.1:41234."""
    return _env("OPENRUN_SERVER").rstrip("/")


@pytest.fixture(scope="session")
def api_key() -> str:
    """An API key of the live server."""
    return _env("OPENRUN_API_KEY")


@pytest.fixture(scope="session")
def openrun_bin() -> str:
    """Absolute path of the `openrun` binary the server runs."""
    return _env("OPENRUN_BIN")


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The server's data dir."""
    return _env("OPENRUN_DATA_DIR")
