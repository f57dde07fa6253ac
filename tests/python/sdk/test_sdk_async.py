"""The async client: the same surface as the sync one, over asyncio."""

from __future__ import annotations

import asyncio
import signal

import pytest

import openrun
from openrun import AsyncSandbox, Exit, Started, Stdout


async def test_async_context_manager_kills(client_args: dict, label: dict) -> None:
    async with AsyncSandbox.create(labels=label, **client_args) as sbx:
        sandbox_id = sbx.id
        assert (await sbx.info()).state == "running"
        listed = await AsyncSandbox.list(labels=label, **client_args)
        assert [s.id for s in listed] == [sandbox_id]
    with pytest.raises(openrun.SandboxNotFoundError):
        await AsyncSandbox.connect(sandbox_id, **client_args)


async def test_async_run_with_async_callbacks(asbx: AsyncSandbox) -> None:
    seen: list = []

    async def on_stdout(text: str) -> None:
        seen.append(text)
        if "ready" in text:
            # The command waits for this file: the callback ran while it was running.
            await asbx.files.write("/tmp/go", "1")

    result = await asbx.run(
        "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo done; exit 2",
        timeout=60,
        on_stdout=on_stdout,
    )
    assert (result.exit_code, result.stdout, result.timed_out) == (2, "ready\ndone\n", False)
    assert "".join(seen) == "ready\ndone\n"
    with pytest.raises(openrun.CommandError) as caught:
        await asbx.run("exit 9", check=True)
    assert caught.value.exit_code == 9
    plain = await asbx.run(["sh", "-c", "echo $X >&2"], env={"X": "y"}, on_stderr=seen.append)
    assert plain.stderr == "y\n" and seen[-1] == "y\n"


async def test_async_exec_stream(asbx: AsyncSandbox) -> None:
    events = [e async for e in asbx.exec("echo a; echo b")]
    assert isinstance(events[0], Started)
    assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"a\nb\n"
    assert isinstance(events[-1], Exit) and events[-1].exit_code == 0
    with pytest.raises(openrun.CommandNotFoundError):
        async for _ in asbx.exec(["no-such-program-xyz"]):
            pass


async def test_async_background_process(asbx: AsyncSandbox, client_args: dict) -> None:
    proc = await asbx.start("cat; echo bye", stdin=True)
    await proc.send_stdin("hello\n")
    async for event in proc.output(follow=True):
        if isinstance(event, Stdout):
            break
    assert proc.stdout_offset == 6
    await proc.send_stdin(b"world\n")
    await proc.close_stdin()
    result = await proc.wait(timeout=30)
    assert result.stdout == "hello\nworld\nbye\n" and result.exit_code == 0
    other = await AsyncSandbox.connect(asbx.id, **client_args)
    try:
        tail = [e async for e in other.process(proc.pid).output(stdout_since=6)]
        assert b"".join(e.data for e in tail if isinstance(e, Stdout)) == b"world\nbye\n"
    finally:
        await other.close()

    sleeper = await asbx.start(["sleep", "300"])
    with pytest.raises(openrun.TimeoutError):
        await sleeper.wait(timeout=0.3)
    assert (await sleeper.status()).running
    assert sleeper.pid in [p.pid for p in await asbx.processes()]
    await sleeper.kill(signal.SIGTERM)
    assert (await sleeper.wait(timeout=30)).signal == signal.SIGTERM


async def test_async_files(asbx: AsyncSandbox, tmp_path) -> None:
    data = bytes(range(256)) + b"\xff\x00"
    await asbx.files.write("/root/x/blob", data)
    assert await asbx.files.read("/root/x/blob") == data
    await asbx.files.write("/root/x/t.txt", "text ✓")
    assert await asbx.files.read_text("/root/x/t.txt") == "text ✓"
    assert sorted(e.name for e in await asbx.files.list("/root/x")) == ["blob", "t.txt"]
    assert (await asbx.files.stat("/root/x/blob")).size == len(data)
    await asbx.files.move("/root/x/t.txt", "/root/x/u.txt")
    assert await asbx.files.exists("/root/x/u.txt") and not await asbx.files.exists("/root/x/t.txt")
    with pytest.raises(openrun.NotFoundError):
        await asbx.files.read("/root/x/t.txt")
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "f").write_text("f")
    assert (await asbx.files.upload_dir(str(tmp_path / "up"), "/root/up")).files == 1
    await asbx.files.download_dir("/root/x", str(tmp_path / "down"))
    assert (tmp_path / "down" / "blob").read_bytes() == data
    await asbx.files.remove("/root/x", recursive=True)
    assert not await asbx.files.exists("/root/x")


async def test_async_snapshot_fork_diff_events(asbx: AsyncSandbox) -> None:
    await asbx.files.write("/root/s.txt", "one\n")
    diff = await asbx.diff()
    assert ("/root/s.txt", "added") in [(c.path, c.kind) for c in diff.changes]
    forks = await asbx.fork(1)
    try:
        assert await forks[0].files.read_text("/root/s.txt") == "one\n"
    finally:
        for fork in forks:
            assert await fork.kill()
            await fork.close()
    snap = await asbx.snapshot()
    assert snap.image.startswith("snap-")
    kinds = [e.kind async for e in asbx.events()]
    assert "file.write" in kinds and "sandbox.fork" in kinds and "sandbox.snapshot" in kinds


async def test_async_lifecycle_and_errors(asbx: AsyncSandbox, client_args: dict, server_url: str) -> None:
    assert (await asbx.pause()).state == "paused"
    with pytest.raises(openrun.SandboxPausedError):
        await asbx.run("true")
    assert (await asbx.resume()).state == "running"
    await asbx.set_ttl(600)
    assert (await asbx.environment()).os.id
    assert (await asbx.network.set(mode="allowlist", allow=["example.com"])).allow == ["example.com"]
    assert "openrun_token=" in await asbx.preview_url(3000)
    with pytest.raises(openrun.InvalidArgumentError):
        await AsyncSandbox.create(memory="lots", **client_args)
    with pytest.raises(openrun.AuthenticationError):
        await AsyncSandbox.create(server=server_url, api_key="or_bad")
    assert await asbx.kill()
    with pytest.raises((openrun.NotFoundError, openrun.SandboxNotRunningError)):
        await asbx.run("true")
    assert not await asbx.kill()


async def test_async_calls_run_concurrently(asbx: AsyncSandbox) -> None:
    # Each command waits for a file the other makes: they can only both finish (before their
    # timeout) if they run at the same time.
    def cmd(me: int, other: int) -> str:
        return f"touch /tmp/c{me}; while [ ! -e /tmp/c{other} ]; do sleep 0.05; done; echo {me}"

    results = await asyncio.gather(asbx.run(cmd(0, 1), timeout=30), asbx.run(cmd(1, 0), timeout=30))
    assert [(r.stdout, r.timed_out) for r in results] == [("0\n", False), ("1\n", False)]


async def test_async_run_feeds_stdin(asbx: AsyncSandbox) -> None:
    seen: list = []
    result = await asbx.run("tr a-z A-Z", stdin=b"quiet\n", on_stdout=seen.append)
    assert result.stdout == "QUIET\n" and seen == ["QUIET\n"] and result.ok


async def test_async_watch(asbx: AsyncSandbox) -> None:
    await asbx.files.mkdir("/root/aw")
    writer = await asbx.start("while true; do touch /root/aw/f; sleep 0.05; done")
    kinds = []
    async for change in asbx.files.watch("/root/aw"):
        kinds.append(change.kind)
        if len(kinds) == 1:
            assert change.path == "/root/aw/f"
            # The writer stops before the directory goes (else the removal may race it).
            await writer.kill()
            assert (await writer.wait(timeout=30)).signal == signal.SIGKILL
            await asbx.files.remove("/root/aw", recursive=True)
    assert "remove" in kinds


async def test_async_sandbox_killed_mid_run(client_args: dict) -> None:
    sandbox = await AsyncSandbox.create(**client_args)
    try:

        async def kill(_: str) -> None:
            await sandbox.kill()

        with pytest.raises(openrun.SandboxLostError) as caught:
            await sandbox.run("echo up; sleep 60", on_stdout=kill)
        assert isinstance(caught.value, openrun.SandboxNotRunningError)
    finally:
        await sandbox.kill()
        await sandbox.close()
    with pytest.raises(openrun.ClientClosedError):
        await sandbox.run("true")


async def test_async_bad_inputs_are_typed(asbx: AsyncSandbox) -> None:
    with pytest.raises(openrun.InvalidArgumentError):
        await asbx.run(None)  # type: ignore[arg-type]
    with pytest.raises(openrun.InvalidArgumentError):
        await asbx.run("cat", stdin=123)  # type: ignore[arg-type]
    proc = await asbx.start("cat", stdin=True)
    with pytest.raises(openrun.InvalidArgumentError):
        await proc.send_stdin(5)  # type: ignore[arg-type]
    await proc.send_stdin(bytearray(b"ok"))
    await proc.close_stdin()
    assert (await proc.wait(timeout=30)).stdout == "ok"
    assert (await asbx.run("cat", stdin=memoryview(b"view"))).stdout == "view"
    with pytest.raises(openrun.InvalidArgumentError):
        await asbx.files.write("/root/x", "x", mode="644")  # type: ignore[arg-type]
