"""Fixtures of the E2B suite: the official `e2b` SDKs pointed at the live `openrun serve` of
tests/python/conftest.py (E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY, which
scripts/python-tests sets; set here from the server's URL and key when missing), and a fresh
sandbox per test, killed afterwards."""

import os
import shutil
import subprocess
import tempfile
import time

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


class Server:
    """A private `openrun serve` started by :func:`start_server`."""

    def __init__(self, url, key, process, data):
        self.url, self.key, self.process, self.data = url, key, process, data

    def peak_rss_kib(self):
        """The server's peak resident memory (VmHWM), in KiB."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")


@pytest.fixture()
def start_server(openrun_bin):
    """Starts private `openrun serve` processes with extra arguments (a fresh data dir with a
    short path, where sandboxes' sockets live, and a key each): `start_server(*args)` gives a
    :class:`Server`. Every sandbox of each is deleted and each is stopped afterwards."""
    started = []

    def start(*args):
        data = tempfile.mkdtemp(prefix="ore2b")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRUN_")}
        key = subprocess.run(
            [openrun_bin, "--data-dir", data, "key", "create", "--name", "private"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip().splitlines()[-1]
        log = os.path.join(data, "serve.out")
        with open(log, "w") as out, open(os.path.join(data, "serve.err"), "w") as err:
            process = subprocess.Popen(
                [openrun_bin, "--data-dir", data, "serve", "--listen", "127.0.0.1:0", *args],
                stdout=out,
                stderr=err,
                env=env,
            )
        server = Server(None, key, process, data)
        started.append(server)
        for _ in range(600):
            with open(log) as f:
                lines = [l for l in f.read().splitlines() if l.startswith("listening on ")]
            if lines:
                server.url = "http://" + lines[0].removeprefix("listening on ")
                return server
            assert process.poll() is None, open(os.path.join(data, "serve.err")).read()
            time.sleep(0.05)
        raise AssertionError("the private server did not start")

    try:
        yield start
    finally:
        for server in started:
            if server.url:
                try:
                    with httpx.Client(
                        base_url=server.url,
                        headers={"Authorization": f"Bearer {server.key}"},
                        timeout=60,
                    ) as v1:
                        for s in v1.get("/v1/sandboxes").json():
                            v1.delete(f"/v1/sandboxes/{s['id']}")
                except Exception:
                    pass
            server.process.terminate()
            server.process.wait(timeout=30)
            subprocess.run(
                ["umount", "-l", os.path.join(server.data, "disk-pool")], capture_output=True
            )
            shutil.rmtree(server.data, ignore_errors=True)
