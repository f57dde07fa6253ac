"""Creating, finding, changing and killing sandboxes with the sync client."""

from __future__ import annotations

import datetime as dt

import pytest

import openrun
from openrun import Sandbox


def test_create_reports_its_limits_and_labels(sbx: Sandbox, label: dict) -> None:
    info = sbx.info()
    assert info.id == sbx.id
    assert info.state == "running"
    assert info.image == "host"
    assert info.limits.memory_bytes == 512 * 1024 * 1024
    assert info.labels == label
    assert info.expires_at is not None and info.created_at is not None
    assert dt.timedelta(minutes=9) < info.expires_at - info.created_at <= dt.timedelta(minutes=11)


def test_create_passes_env_cpus_and_pids(client_args: dict, cleanup: list) -> None:
    sandbox = Sandbox.create(env={"GREETING": "bonjour"}, cpus=0.5, pids=128, ttl=120, **client_args)
    cleanup.append(sandbox)
    info = sandbox.info()
    assert info.limits.cpu_millis == 500
    assert info.limits.pids == 128
    assert info.env == {"GREETING": "bonjour"}
    assert sandbox.run("echo $GREETING").stdout == "bonjour\n"


def test_context_manager_kills_the_sandbox(client_args: dict) -> None:
    with Sandbox.create(**client_args) as sandbox:
        sandbox_id = sandbox.id
        assert sandbox.run("true").exit_code == 0
    with pytest.raises(openrun.SandboxNotFoundError) as caught:
        Sandbox.connect(sandbox_id, **client_args)
    assert caught.value.status == 404
    assert caught.value.code == "not_found"


def test_context_manager_kills_on_an_exception_too(client_args: dict) -> None:
    with pytest.raises(RuntimeError):
        with Sandbox.create(**client_args) as sandbox:
            sandbox_id = sandbox.id
            raise RuntimeError("boom")
    assert sandbox_id not in [s.id for s in Sandbox.list(**client_args)]


def test_kill_reports_whether_it_was_there(client_args: dict) -> None:
    sandbox = Sandbox.create(**client_args)
    assert sandbox.kill() is True
    assert sandbox.kill() is False
    sandbox.close()


def test_connect_gives_a_working_handle(sbx: Sandbox, client_args: dict) -> None:
    sbx.files.write("/root/mark", "here")
    other = Sandbox.connect(sbx.id, **client_args)
    try:
        assert other.files.read_text("/root/mark") == "here"
        assert other.info().id == sbx.id
    finally:
        other.close()


def test_list_filters_by_label_and_pages(client_args: dict, cleanup: list, label: dict) -> None:
    made = [Sandbox.create(labels={**label, "n": str(i)}, **client_args) for i in range(3)]
    cleanup.extend(made)
    # One per page: the client follows X-Next-Cursor through all of them, oldest first.
    found = Sandbox.list(labels=label, page_size=1, **client_args)
    assert [s.id for s in found] == [s.id for s in made]
    only = Sandbox.list(labels={**label, "n": "1"}, **client_args)
    assert [s.id for s in only] == [made[1].id]
    made[2].pause()
    paused = Sandbox.list(labels=label, state="paused", **client_args)
    assert [s.id for s in paused] == [made[2].id]


def test_set_ttl_moves_the_deadline(sbx: Sandbox) -> None:
    before = sbx.info().expires_at
    info = sbx.set_ttl(dt.timedelta(hours=1))
    assert info.expires_at is not None and before is not None
    assert info.expires_at - before > dt.timedelta(minutes=45)
    shorter = sbx.set_ttl("90s")
    assert shorter.expires_at is not None and shorter.expires_at < before


def test_pause_blocks_commands_until_resume(sbx: Sandbox) -> None:
    assert sbx.pause().state == "paused"
    with pytest.raises(openrun.SandboxPausedError) as caught:
        sbx.run("true")
    assert caught.value.status == 409
    with pytest.raises(openrun.SandboxPausedError):
        sbx.files.read("/etc/hostname")
    assert sbx.resume().state == "running"
    assert sbx.run("echo back").stdout == "back\n"


def test_environment_describes_the_sandbox(sbx: Sandbox) -> None:
    env = sbx.environment()
    assert env.os.id
    assert env.limits.memory_bytes == 512 * 1024 * 1024
    assert env.network.policy == "none"
    assert env.tool("sh") is not None or env.tool("bash") is not None
    assert any(p.endswith("bin") for p in env.path)


def test_network_policy_get_and_set(sbx: Sandbox) -> None:
    assert sbx.network.get().mode == "none"
    policy = sbx.network.set(mode="allowlist", allow=["example.com", "*.pypi.org"])
    assert policy.mode == "allowlist"
    assert sorted(policy.allow) == ["*.pypi.org", "example.com"]
    assert sbx.network.get() == policy
    with pytest.raises(openrun.InvalidNetworkPolicyError) as caught:
        sbx.network.set(mode="allowlist", allow=["not a domain!"])
    assert caught.value.status == 400
    assert sbx.network.set("none").mode == "none"


def test_preview_url_carries_a_token_for_the_port(sbx: Sandbox) -> None:
    url = sbx.preview_url(8000)
    assert url.startswith(sbx.server + f"/v1/sandboxes/{sbx.id}/ports/8000/")
    assert "openrun_token=" in url
    token = sbx.preview(8001, ttl="2h")
    assert token.expires_at is not None
    assert (
        dt.timedelta(minutes=110)
        < token.expires_at - dt.datetime.now(dt.timezone.utc)
        <= dt.timedelta(hours=2)
    )
    with pytest.raises(openrun.InvalidArgumentError):
        sbx.preview(0)
