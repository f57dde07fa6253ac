"""`openrun up GIT_URL`: a fixture repository committed to a bare git repository served over
"dumb" HTTP on loopback (`git update-server-info` + Python's http.server in a thread); the
server clones it inside a sandbox and reaches green tests."""

import functools
import http.server
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


@pytest.fixture(scope="module")
def git_url(workdir):
    """http://127.0.0.1:PORT/ruby-fixture.git: the Ruby fixture (no registry needed) as a bare
    repository, served until the module ends."""
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

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(served))
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
