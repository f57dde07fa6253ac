"""Fixtures of the MCP suite."""

import pytest


@pytest.fixture(scope="session")
def stranger_key(make_key):
    """A key of another tenant than `api_key`."""
    return make_key("mcp-other")
