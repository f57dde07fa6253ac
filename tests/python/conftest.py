"""Fixtures shared by every Python suite: the live `openrun serve` that scripts/python-tests
started (its URL, an API key, the binary and the data dir), read from the environment."""

import os
import shutil
import subprocess
import tempfile
import time

import httpx
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


def _bare_env() -> dict:
    """This environment without OPENRUN_* (a private server or key uses only what it is given)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENRUN_")}


def _create_key(openrun_bin: str, data_dir: str, name: str) -> str:
    done = subprocess.run(
        [openrun_bin, "--data-dir", data_dir, "key", "create", "--name", name],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=_bare_env(),
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def make_key(openrun_bin, data_dir):
    """`make_key(name, data_dir=<the live server's>)`: a new API key (a new tenant), made with
    `openrun key create` like a user would, also while the server runs."""

    def make(name: str, data: str = data_dir) -> str:
        return _create_key(openrun_bin, data, name)

    return make


class Server:
    """A private `openrun serve` started by :class:`PrivateServers`."""

    def __init__(self, url, key, process, data):
        self.url, self.key, self.process, self.data = url, key, process, data

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def peak_rss_kib(self) -> int:
        """The server's peak resident memory (VmHWM), in KiB."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")


class PrivateServers:
    """Private `openrun serve` processes for tests that need their own flags, data dir or a
    restart. Each data dir is fresh (a short path: sandboxes' sockets live under it) with a key;
    at the end every sandbox is deleted, every server stopped and every data dir removed."""

    def __init__(self, openrun_bin: str):
        self.openrun_bin = openrun_bin
        self.servers: list = []
        self.dirs: list = []

    def data_dir(self) -> str:
        """A fresh data dir, removed at the end."""
        data = tempfile.mkdtemp(prefix="orpv")
        self.dirs.append(data)
        return data

    def start(self, *args, data=None, key=None, port=0) -> Server:
        """Starts `openrun serve ARGS` on `data` (default: a fresh data dir with a new key)
        listening on `port` (0: any free one) and returns once it listens."""
        data = data or self.data_dir()
        key = key or _create_key(self.openrun_bin, data, "private")
        log = os.path.join(data, "serve.out")
        with open(log, "w") as out, open(os.path.join(data, "serve.err"), "w") as err:
            process = subprocess.Popen(
                [self.openrun_bin, "--data-dir", data, "serve", "--listen", f"127.0.0.1:{port}", *args],
                stdout=out,
                stderr=err,
                env=_bare_env(),
            )
        server = Server(None, key, process, data)
        self.servers.append(server)
        for _ in range(600):
            with open(log) as f:
                lines = [l for l in f.read().splitlines() if l.startswith("listening on ")]
            if lines:
                server.url = "http://" + lines[0].removeprefix("listening on ")
                return server
            assert process.poll() is None, open(os.path.join(data, "serve.err")).read()[-2000:]
            time.sleep(0.05)
        raise AssertionError("the private server did not start")

    def stop(self, server: Server) -> None:
        """Stops `server` (SIGTERM; its sandboxes outlive it)."""
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(timeout=30)

    def restart(self, server: Server, *args) -> Server:
        """Stops `server` and starts a new one on its data dir, key and port."""
        self.stop(server)
        return self.start(*args, data=server.data, key=server.key, port=server.port)

    def close(self) -> None:
        for server in self.servers:
            if server.url and server.process.poll() is None:
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
            self.stop(server)
        for data in self.dirs:
            subprocess.run(["umount", "-l", os.path.join(data, "disk-pool")], capture_output=True)
            shutil.rmtree(data, ignore_errors=True)


@pytest.fixture()
def private_servers(openrun_bin):
    """A :class:`PrivateServers`, cleaned up after the test."""
    servers = PrivateServers(openrun_bin)
    try:
        yield servers
    finally:
        servers.close()
