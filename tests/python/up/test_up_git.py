"""`openrun up GIT_URL`: a fixture repository committed to a bare git repository served on
loopback over "smart" HTTP (`git http-backend` as CGI) and over "dumb" HTTP (`git
update-server-info` + Python's http.server, in a thread); the server clones it inside a sandbox
and reaches green tests. Test ids name the transport."""

import functools
import http.server
import os
import subprocess
import threading

import pytest

import up_fixtures as fixtures


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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module", params=["smart", "dumb"])
def git_url(request, bare_repos):
    """http://127.0.0.1:PORT/ruby-fixture.git over smart or dumb HTTP, served until the module
    ends (the test id names the transport)."""
    if request.param == "dumb":
        handler = functools.partial(Dumb, directory=str(bare_repos))
    else:
        handler = type("SmartHere", (Smart,), {"root": str(bare_repos)})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/ruby-fixture.git"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.timeout(900)
def test_git_url_is_cloned_and_green(client, git_url):
    run = client.up(git_url)
    assert run.code == 0, run.describe()
    out = run.out
    assert "ruby" in out["plan"]["languages"], run.describe()
    assert out["check"]["passed"] is True, run.describe()
    assert out["workspace"].endswith("/ruby-fixture"), out["workspace"]
    code, text = client.exec(out["sandbox_id"], "ls Gemfile Rakefile test/greeter_test.rb", workdir=out["workspace"])
    assert code == 0, text
    client.delete(out["sandbox_id"])


@pytest.mark.timeout(300)
def test_git_url_plan_only(client, git_url):
    """`--plan` on a URL asks the server, which clones, plans and makes no sandbox."""
    before = client.sandbox_ids()
    run = client.up(git_url, "--plan")
    assert run.code == 0, run.describe()
    assert "ruby" in run.out.get("languages", []), run.describe()
    assert client.sandbox_ids() == before
