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


def test_create_outlives_a_short_request_timeout(client_args: dict, cleanup: list, label: dict) -> None:
    # The server finishes a create whose client left: a read timeout on it would leave a
    # sandbox without a handle. The create waits for its answer; the timeout bounds the rest.
    sandbox = Sandbox.create(labels=label, request_timeout=0.002, **client_args)
    cleanup.append(Sandbox.connect(sandbox.id, **client_args))
    assert [s.id for s in Sandbox.list(labels=label, **client_args)] == [sandbox.id]
    forks = sandbox.fork(1, labels=label)
    cleanup.extend(Sandbox.connect(f.id, **client_args) for f in forks)
    assert len(Sandbox.list(labels=label, **client_args)) == 2
    for handle in [sandbox, *forks]:
        handle.close()


async def test_a_cancelled_create_leaves_no_sandbox(client_args: dict, label: dict) -> None:
    import asyncio

    # Cancelled after the request went out (the server goes on with it): the sandbox the
    # server makes is found by the request's label and deleted before the cancellation ends.
    cancelled = 0
    for delay in (0.002, 0.005, 0.015, 0.03):
        try:
            made = await asyncio.wait_for(openrun.AsyncSandbox.create(labels=label, **client_args), delay)
        except asyncio.TimeoutError:
            cancelled += 1
            continue
        # A create can beat the delay (a few ms here): that one was not cancelled.
        assert await made.kill() is True
        await made.close()
    assert cancelled > 0, "no create was slow enough to be cancelled"
    await asyncio.sleep(1.0)  # any create still running would have finished by now
    left = Sandbox.list(labels=label, **client_args)
    assert left == [], f"sandboxes left by cancelled creates: {[s.id for s in left]}"


def test_the_request_label_is_hidden(sbx: Sandbox, label: dict) -> None:
    from openrun.models import REQUEST_LABEL

    info = sbx.info()
    assert info.labels == label
    assert REQUEST_LABEL in info.raw["labels"]


def test_reprs_do_not_show_secrets(client_args: dict, cleanup: list) -> None:
    sandbox = Sandbox.create(env={"API_TOKEN": "s3cr3t-value"}, **client_args)
    cleanup.append(sandbox)
    info = sandbox.info()
    assert info.env == {"API_TOKEN": "s3cr3t-value"}
    assert "s3cr3t-value" not in repr(info) and "API_TOKEN" in repr(info)
    assert "s3cr3t-value" not in repr(Sandbox.list(**client_args))
    token = sandbox.preview(8000)
    for secret in (token.token, token.path_url):
        assert secret and secret not in repr(token)
    assert "openrun_token=" not in repr(token)


def test_a_policy_with_secrets_is_not_sent_back_without_them(sbx: Sandbox) -> None:
    sbx.network.set(
        mode="allowlist",
        allow=["api.github.com"],
        secrets=[{"name": "GH", "value": "s3cr3t", "hosts": ["api.github.com"]}],
    )
    current = sbx.network.get()
    assert [s.name for s in current.secrets] == ["GH"]
    # The values never come back: sending it as it is would drop the secret silently.
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        sbx.network.set(current, allow=["api.github.com", "pypi.org"])
    assert "GH" in caught.value.message
    assert sbx.network.get() == current, "nothing changed"
    dropped = sbx.network.set(current, secrets=[])
    assert dropped.secrets == [] and dropped.allow == ["api.github.com"]
    with pytest.raises(openrun.InvalidArgumentError):
        Sandbox.create(network=current, server=sbx.server, api_key="or_unused")


def test_list_takes_a_request_timeout(client_args: dict, sbx: Sandbox, label: dict) -> None:
    import socket
    import time

    assert [s.id for s in Sandbox.list(labels=label, request_timeout=30, **client_args)] == [sbx.id]
    # A listener that never answers: the list gives up after its request_timeout.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        started = time.monotonic()
        with pytest.raises(openrun.TimeoutError):
            Sandbox.list(
                request_timeout=0.5,
                server=f"http://127.0.0.1:{mute.getsockname()[1]}",
                api_key="or_unused",
            )
        assert time.monotonic() - started < 10


def test_forks_share_the_connection_pool_until_the_last_closes(sbx: Sandbox, client_args: dict) -> None:
    parent = Sandbox.connect(sbx.id, **client_args)
    forks = parent.fork(2)
    try:
        transport = parent._transport
        assert all(f._transport is transport for f in forks)
        parent.close()
        forks[0].close()
        assert not transport.client.is_closed, "a fork still uses it"
        assert forks[1].run("echo alive").stdout == "alive\n"
        with pytest.raises(openrun.ClientClosedError):
            forks[0].run("true")
    finally:
        for fork in forks:
            Sandbox.connect(fork.id, **client_args).kill()
            fork.close()
    assert transport.client.is_closed


def test_the_handle_count_is_thread_safe(client_args: dict) -> None:
    import threading

    from openrun._config import Target
    from openrun._transport import SyncTransport

    transport = SyncTransport(Target(client_args["server"], client_args["api_key"]))
    barrier = threading.Barrier(8)

    def churn() -> None:
        barrier.wait()
        for _ in range(2000):
            transport.retain()
            assert not transport.closed
            transport.retain()
            transport.release()

    transport.retain()  # one user throughout: the pool must stay open
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert transport._users == 1 + 8 * 2000 and not transport.client.is_closed
    transport.close()


class _Interrupted(BaseException):
    """Stands for Ctrl-C (a KeyboardInterrupt would also stop pytest)."""


def test_an_interrupted_create_leaves_no_sandbox(client_args: dict, label: dict) -> None:
    import signal
    import time

    def fire(*_: object) -> None:
        raise _Interrupted()

    previous = signal.signal(signal.SIGALRM, fire)
    try:
        for delay in (0.005, 0.01, 0.015, 0.02, 0.03):
            made = None
            try:
                signal.setitimer(signal.ITIMER_REAL, delay)
                made = Sandbox.create(labels=label, **client_args)
                signal.setitimer(signal.ITIMER_REAL, 0)
            except _Interrupted:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if made is not None:  # the answer came first: not this test's case
                made.kill()
                made.close()
    finally:
        signal.signal(signal.SIGALRM, previous)
    time.sleep(1.0)  # any create still running would have finished by now
    left = Sandbox.list(labels=label, **client_args)
    assert left == [], f"sandboxes left by interrupted creates: {[s.id for s in left]}"
