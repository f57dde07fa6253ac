"""Fixtures of the E2B suite: the official `e2b` SDKs pointed at the live `openrun serve` of
tests/python/conftest.py (E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY, which
scripts/python-tests sets; set here from the server's URL and key when missing), and a fresh
sandbox per test, killed afterwards."""

import os

import httpx
import pytest
from e2b import Sandbox


@pytest.fixture(scope="session", autouse=True)
def e2b_environment(server_url, api_key):
    """Points the SDKs (which read the environment) at the live server."""
    os.environ.setdefault("E2B_API_URL", server_url)
    os.environ.setdefault("E2B_SANDBOX_URL", server_url)
    os.environ.setdefault("E2B_API_KEY", api_key)
    return server_url


@pytest.fixture()
def sandbox():
    """A sandbox of the `base` template (the image `host`), killed after the test."""
    sbx = Sandbox.create(template="base")
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture()
def api(server_url, api_key):
    """A raw HTTP client of the control plane, with the key as E2B sends it (X-API-KEY)."""
    with httpx.Client(base_url=server_url, headers={"X-API-KEY": api_key}, timeout=60) as client:
        yield client


@pytest.fixture()
def v1(server_url, api_key):
    """A raw HTTP client of openrun's own /v1 API."""
    with httpx.Client(
        base_url=server_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture()
def start_server(private_servers):
    """`start_server(*args)`: a private `openrun serve ARGS` (see tests/python/conftest.py's
    PrivateServers) with its own data dir and key, cleaned up after the test."""
    return private_servers.start
