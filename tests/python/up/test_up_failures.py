"""`openrun up` that must fail: a repository broken on purpose fails at the right step naming the
file and the command, and bad input (no project, an invalid devcontainer.json, an unreachable git
URL, a lockfile that cannot resolve) fails with a clear message. Every one: a non-zero exit, an
error object on stdout (`--json`), `openrun up: ...` on stderr, and no sandbox left running
unless `--keep` asks for it."""

import io
import json
import re
import tarfile

import pytest


def assert_failed(run, code):
    """A failed `up`: non-zero exit, the error object with `code`, a message on stderr."""
    assert run.code != 0, run.describe()
    err = run.out
    assert err.get("type") == "error", run.describe()
    assert err.get("code") == code, run.describe()
    assert err.get("message"), run.describe()
    assert "openrun up: " in run.stderr, run.describe()
    return err


@pytest.fixture()
def no_new_sandbox(client):
    """Asserts that the test made no sandbox that is still there at its end."""
    before = client.sandbox_ids()
    yield
    left = client.sandbox_ids() - before
    for sid in left:
        client.delete(sid)
    assert not left, f"sandboxes left behind: {sorted(left)}"


@pytest.mark.timeout(900)
def test_broken_fails_at_install_naming_the_file(client, repo, no_new_sandbox):
    run = client.up(repo("python-broken"))
    err = assert_failed(run, "step_failed")
    assert run.code == 1, run.describe()  # the repository's own command failed
    assert err.get("step") == "install", run.describe()
    assert err.get("file") == "requirements.txt", run.describe()
    assert "requirements.txt" in (err.get("command") or ""), run.describe()
    assert "sandbox_id" not in err, run.describe()
    # pip's own words reach the user: in the error's output tail or the streamed output.
    assert "attrs==0.0.0" in err["message"] + run.stderr, run.describe()


@pytest.mark.timeout(900)
def test_broken_with_keep_keeps_the_rolled_back_sandbox(client, repo):
    before = client.sandbox_ids()
    run = client.up(repo("python-broken"), "--keep")
    try:
        err = assert_failed(run, "step_failed")
        assert err.get("step") == "install" and err.get("file") == "requirements.txt", run.describe()
        sid = err.get("sandbox_id")
        assert sid, run.describe()
        assert client.sandbox_ids() - before == {sid}
        assert client.sandbox(sid)["state"] == "running"
        # Rolled back: pip had prepared ./halfway (its setup.py leaves a marker) before it
        # failed; the kept sandbox is the one from before the step.
        code, text = client.exec(sid, "test ! -e /var/tmp/halfway-prepared && echo ROLLED-BACK")
        assert code == 0 and "ROLLED-BACK" in text, text
        # ...and the steps before it are kept: the workspace is there.
        code, text = client.exec(sid, "ls requirements.txt", workdir="/workspaces/python-broken")
        assert code == 0, text
    finally:
        for sid in client.sandbox_ids() - before:
            client.delete(sid)


@pytest.mark.timeout(300)
def test_no_recognizable_project(client, repo, no_new_sandbox):
    run = client.up(repo("empty"))
    err = assert_failed(run, "no_project")
    assert "no recognizable project" in err["message"], run.describe()


@pytest.mark.timeout(300)
def test_invalid_devcontainer_says_where(client, repo, no_new_sandbox):
    run = client.up(repo("devcontainer-invalid"))
    err = assert_failed(run, "invalid_config")
    assert err.get("file") == ".devcontainer/devcontainer.json", run.describe()
    # The missing comma: after line 3's value (or at line 4's key), with a column.
    assert re.search(r"devcontainer\.json:[34]:\d+", err["message"]), run.describe()


@pytest.mark.timeout(300)
def test_invalid_devcontainer_through_the_api(client, repo, no_new_sandbox):
    """The same check on the server's side: POST /v1/up with the tree as a tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(repo("devcontainer-invalid"), arcname=".")
    res = client.v1.post(
        "/v1/up",
        params={"name": "devcontainer-invalid", "repo": "test:devcontainer-invalid"},
        content=buf.getvalue(),
        headers={"Content-Type": "application/x-tar"},
    )
    if res.status_code == 200:
        lines = [json.loads(line) for line in res.text.splitlines() if line.strip()]
        err = lines[-1]
        assert err["type"] == "error", lines
    else:
        assert 400 <= res.status_code < 500, res.text
        err = res.json()
    assert err["code"] == "invalid_config", err
    assert re.search(r"devcontainer\.json:[34]:\d+", err["message"]), err


@pytest.mark.timeout(600)
def test_unreachable_git_url(client, no_new_sandbox):
    url = "http://127.0.0.1:9/nothing.git"
    run = client.up(url)
    err = assert_failed(run, "fetch_failed")
    assert url in err["message"], run.describe()


@pytest.mark.timeout(900)
def test_unresolvable_lockfile_fails_at_install(client, repo, no_new_sandbox):
    run = client.up(repo("node-unresolvable"))
    err = assert_failed(run, "step_failed")
    assert err.get("step") == "install", run.describe()
    assert err.get("file") == "package-lock.json", run.describe()
    assert err.get("command"), run.describe()
