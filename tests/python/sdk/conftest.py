"""Fixtures of the SDK suite: sandboxes on the live server of ``tests/python/conftest.py``
(``server_url``, ``api_key``), always killed afterwards."""

from __future__ import annotations

import uuid
from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from openrun import AsyncSandbox, Sandbox


@pytest.fixture
def client_args(server_url: str, api_key: str) -> dict:
    """The server and key, passed explicitly (the tests of resolution use the environment)."""
    return {"server": server_url, "api_key": api_key}


@pytest.fixture
def label() -> dict:
    """A label unique to the test, to find its sandboxes."""
    return {"sdk-test": uuid.uuid4().hex[:12]}


@pytest.fixture
def sbx(client_args: dict, label: dict) -> Iterator[Sandbox]:
    """A running sandbox (image ``host``), killed after the test."""
    sandbox = Sandbox.create(memory="512M", ttl="10m", labels=label, **client_args)
    try:
        yield sandbox
    finally:
        sandbox.kill()
        sandbox.close()


@pytest_asyncio.fixture
async def asbx(client_args: dict, label: dict) -> AsyncIterator[AsyncSandbox]:
    """A running sandbox for the async client, killed after the test."""
    sandbox = await AsyncSandbox.create(memory="512M", ttl="10m", labels=label, **client_args)
    try:
        yield sandbox
    finally:
        await sandbox.kill()
        await sandbox.close()


@pytest.fixture
def cleanup(client_args: dict) -> Iterator[list]:
    """Append sandboxes (sync handles) to it: they are killed after the test."""
    made: list = []
    try:
        yield made
    finally:
        for sandbox in made:
            sandbox.kill()
            sandbox.close()
