"""`openrun up` of the devcontainer fixture (tests/python/up/up_fixtures.py: JSON with comments and
trailing commas, containerEnv, remoteEnv, forwardPorts, hostRequirements, unsupported keys and
the four lifecycle commands in string, array and object forms): every lifecycle command ran, in
order; the environment, ports and limits are applied; the unsupported keys are named."""

import pytest

KIND = "devcontainer"
CHECK = "python3 check.py"


@pytest.fixture(scope="module")
def dev(client, repo):
    """The devcontainer fixture opened once with an explicit check (its containerEnv must be
    visible to the check)."""
    return client.up(repo(KIND), "--check", CHECK)


@pytest.mark.timeout(900)
def test_devcontainer_is_ready(dev):
    assert dev.code == 0, dev.describe()
    out = dev.out
    assert out["plan"]["source"] == "devcontainer", dev.describe()
    assert out["plan"]["config_file"] == ".devcontainer/devcontainer.json"
    check = out["check"]
    assert check["passed"] is True and check["exit_code"] == 0 and check["command"] == CHECK, dev.describe()


@pytest.mark.timeout(300)
def test_lifecycle_commands_ran_in_order(dev, client):
    assert dev.code == 0, dev.describe()
    sid = dev.out["sandbox_id"]
    code, text = client.exec(
        sid,
        "ls /var/tmp/marker-onCreate /var/tmp/marker-updateContent /var/tmp/marker-postCreate-first "
        "/var/tmp/marker-postCreate-second /var/tmp/marker-postStart && cat /var/tmp/lifecycle.log",
    )
    assert code == 0, text
    log = [line for line in text.splitlines() if not line.startswith("/var/tmp/")]
    # postCreateCommand's object form: its entries may run in parallel (the spec says so), so
    # only their place between updateContent and postStart is fixed.
    assert log[:2] == ["onCreate", "updateContent"], log
    assert sorted(log[2:4]) == ["postCreate:first", "postCreate:second"], log
    assert log[4:] == ["postStart"], log


@pytest.mark.timeout(300)
def test_environment_ports_and_limits(dev, client):
    assert dev.code == 0, dev.describe()
    out = dev.out
    sid = out["sandbox_id"]
    # containerEnv: every process of the sandbox.
    code, text = client.exec(sid, 'echo "container=$FIXTURE_CONTAINER"')
    assert code == 0 and "container=from-containerEnv" in text, text
    # remoteEnv: the lifecycle commands (postStartCommand dumped its environment).
    code, text = client.exec(sid, "cat /var/tmp/poststart.env")
    assert code == 0, text
    assert "FIXTURE_REMOTE=from-remoteEnv" in text, text
    assert "FIXTURE_CONTAINER=from-containerEnv" in text, text
    # forwardPorts (trailing comma and all).
    ports = sorted(p["port"] for p in out["ports"])
    assert ports == [5432, 8000], out["ports"]
    for p in out["ports"]:
        assert p["preview"] == f"/v1/sandboxes/{sid}/ports/{p['port']}/", p
    # hostRequirements: memory "1gb" (the server's default is 2 GiB), cpus 1.
    limits = client.sandbox(sid)["limits"]
    assert limits["memory_bytes"] == 1024**3, limits
    assert limits["cpu_millis"] == 1000, limits


@pytest.mark.timeout(300)
def test_unsupported_keys_are_named(dev):
    assert dev.code == 0, dev.describe()
    plan = dev.out["plan"]
    for key in ("features", "postAttachCommand"):
        assert any(entry.startswith(key) for entry in plan["unsupported"]), plan["unsupported"]
    # The image is approximated by Debian with Python, and the plan says so.
    assert plan["notes"], plan


@pytest.mark.timeout(300)
def test_cached_reopen_runs_only_post_start(dev, client, repo):
    """A second open starts from the recipe's snapshot: the setup commands' effects are there
    (they do not run again), postStartCommand runs again."""
    assert dev.code == 0, dev.describe()
    again = client.up(repo(KIND), "--check", CHECK)
    try:
        assert again.code == 0, again.describe()
        assert again.out["cached"] is True, again.describe()
        assert again.out["sandbox_id"] != dev.out["sandbox_id"]
        assert again.out["check"]["passed"] is True, again.describe()
        code, text = client.exec(again.out["sandbox_id"], "cat /var/tmp/lifecycle.log")
        assert code == 0, text
        log = text.splitlines()
        assert log.count("onCreate") == 1 and log.count("updateContent") == 1, log
        assert log[-1] == "postStart" and log.count("postStart") == 1, log
        limits = client.sandbox(again.out["sandbox_id"])["limits"]
        assert limits["memory_bytes"] == 1024**3, limits
    finally:
        if again.sandbox_id:
            client.delete(again.sandbox_id)
