"""Fixtures of the MCP suite."""

import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def stranger_key(openrun_bin, data_dir):
    """A key of another tenant than `api_key`, made once before any test runs. (Keys made
    with `openrun key create` while the server runs: the server saw only the first one —
    reported to the lead; so the suite makes one, early.)"""
    made = subprocess.run([openrun_bin, "--data-dir", data_dir, "key", "create", "--name", "mcp-other"],
                          capture_output=True, text=True, timeout=60, check=True)
    return made.stdout.strip()
