"""Fixtures of the `openrun up` suite: fixture repositories written into temporary directories
(tests/python/up/up_fixtures.py), the real CLI (`openrun up --json --server URL`) against the
server scripts/python-tests started, and the API to look inside what it made.

Every sandbox an `up` makes is deleted at the end of the session (or right away by the test).
A language's first `up` is shared by the tests that need it (`opened(kind)`), so each language
is set up once per session."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import up_fixtures as fixtures

# The longest an `up` may take: a first open builds the Debian base (~40 s) and installs a
# language's packages and dependencies.
UP_TIMEOUT = 900


@dataclass
class Up:
    """One run of `openrun up --json`."""

    argv: list
    code: int
    stdout: str
    stderr: str
    wall_ms: float
    out: dict = field(default_factory=dict)

    @property
    def sandbox_id(self) -> str | None:
        return self.out.get("sandbox_id")

    def describe(self) -> str:
        """What a failed assertion prints: the command, its exit code and both outputs' tails."""
        return (
            f"$ {' '.join(self.argv)}\nexit {self.code} after {self.wall_ms / 1000:.1f} s\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr (tail) ---\n{self.stderr[-6000:]}"
        )


class Client:
    """The CLI and the API of the live server, and the sandboxes made through them."""

    def __init__(self, openrun_bin: str, server_url: str, api_key: str):
        self.bin, self.url, self.key = openrun_bin, server_url, api_key
        self.v1 = httpx.Client(
            base_url=server_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120
        )
        self.made: set[str] = set()

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRUN_")}
        env["OPENRUN_API_KEY"] = self.key
        return env

    def up(self, target, *args: str, timeout: int = UP_TIMEOUT) -> Up:
        """Runs `openrun up --json --server URL ARGS TARGET`; the sandbox it names (result or
        kept error) is remembered for the cleanup."""
        argv = [self.bin, "up", "--json", "--server", self.url, *args, str(target)]
        start = time.monotonic()
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        run = Up(argv, done.returncode, done.stdout, done.stderr, (time.monotonic() - start) * 1000)
        text = done.stdout.strip()
        if text:
            try:
                run.out = json.loads(text)
            except json.JSONDecodeError:
                # Several JSON documents (should not happen): the last one is the answer.
                run.out = json.loads(text[text.rfind("\n{") + 1 :]) if "\n{" in text else {}
        if run.sandbox_id:
            self.made.add(run.sandbox_id)
        return run

    def exec(self, sandbox: str, script: str, workdir: str | None = None, timeout: int = 300):
        """`openrun exec ID -- sh -c SCRIPT` (in `workdir`): (exit code, stdout + stderr)."""
        argv = [self.bin, "exec", "--server", self.url]
        if workdir:
            argv += ["-w", workdir]
        argv += [sandbox, "--", "sh", "-c", script]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=self.env()
        )
        return done.returncode, done.stdout + done.stderr

    def sandbox(self, sandbox: str) -> dict:
        """GET /v1/sandboxes/ID."""
        res = self.v1.get(f"/v1/sandboxes/{sandbox}")
        res.raise_for_status()
        return res.json()

    def sandbox_ids(self) -> set[str]:
        """The ids of every sandbox of this key."""
        ids, cursor = set(), ""
        while True:
            res = self.v1.get("/v1/sandboxes", params={"limit": 1000, **({"cursor": cursor} if cursor else {})})
            res.raise_for_status()
            ids |= {s["id"] for s in res.json()}
            cursor = res.headers.get("X-Next-Cursor") or ""
            if not cursor:
                return ids

    def delete(self, sandbox: str) -> None:
        self.v1.delete(f"/v1/sandboxes/{sandbox}")
        self.made.discard(sandbox)

    def close(self) -> None:
        for sandbox in list(self.made):
            try:
                self.delete(sandbox)
            except Exception:
                pass
        self.v1.close()


@pytest.fixture(scope="session")
def client(openrun_bin, server_url, api_key):
    """A :class:`Client`; deletes every sandbox made through it at the end."""
    c = Client(openrun_bin, server_url, api_key)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def workdir():
    """A directory for this session's fixture repositories (removed at the end)."""
    with tempfile.TemporaryDirectory(prefix="openrun-up-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def repo(workdir):
    """`repo(kind)`: the fixture repository `kind` (fixtures.MAKERS), written once per session
    into `<workdir>/<kind>` (the directory name is the sandbox's workspace name)."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            root = workdir / kind
            root.mkdir()
            fixtures.MAKERS[kind](root)
            made[kind] = root
        return made[kind]

    return make


@pytest.fixture(scope="session")
def opened(client, repo):
    """`opened(kind)`: the first `openrun up` of fixture `kind` this session (made once,
    shared by every test that needs it; its sandbox stays until the end)."""
    runs: dict[str, Up] = {}

    def open_(kind: str) -> Up:
        if kind not in runs:
            runs[kind] = client.up(repo(kind))
        return runs[kind]

    return open_


# --- git repositories over HTTP ---------------------------------------------------------------

def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=up", "-c", "user.email=up@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


class Dumb(http.server.SimpleHTTPRequestHandler):
    """"Dumb" HTTP: the bare repository's files as they are (git update-server-info made the
    index files a client needs)."""

    def log_message(self, *args):
        pass


class Smart(http.server.BaseHTTPRequestHandler):
    """"Smart" HTTP (what GitHub and most hosts speak): every request through `git http-backend`
    as a CGI program."""

    root = ""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.backend()

    def do_POST(self):
        self.backend()

    def backend(self):
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, timeout=120)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="session")
def bare_repos(workdir):
    """A directory holding ruby-fixture.git: the Ruby fixture (no registry needed) committed to a
    bare repository."""
    src = workdir / "git-src"
    src.mkdir()
    fixtures.make_ruby(src)
    git("init", "-q", "-b", "main", cwd=src)
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "fixture", cwd=src)
    served = workdir / "git-served"
    served.mkdir()
    git("clone", "-q", "--bare", str(src), str(served / "ruby-fixture.git"), cwd=workdir)
    git("update-server-info", cwd=served / "ruby-fixture.git")
    return served


@pytest.fixture(scope="session")
def git_url_for(bare_repos):
    """`git_url_for(transport)`: http://127.0.0.1:PORT/ruby-fixture.git over "smart" or "dumb"
    HTTP, one server per transport, served until the session ends."""
    servers: dict[str, tuple] = {}

    def url(transport: str) -> str:
        if transport not in servers:
            if transport == "dumb":
                handler = functools.partial(Dumb, directory=str(bare_repos))
            else:
                handler = type("SmartHere", (Smart,), {"root": str(bare_repos)})
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            servers[transport] = (httpd, f"http://127.0.0.1:{httpd.server_address[1]}/ruby-fixture.git")
        return servers[transport][1]

    try:
        yield url
    finally:
        for httpd, _ in servers.values():
            httpd.shutdown()
            httpd.server_close()
