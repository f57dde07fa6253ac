"""Directory watching through the official e2b SDK against a live `openrun serve`: the sync
`files.watch_dir` (CreateWatcher / GetWatcherEvents / RemoveWatcher), recursive watches, stop(),
refusals (missing directory, a file), and the async `files.watch_dir` (the WatchDir stream) with
its on_event and on_exit callbacks.

Run: scripts/python-tests e2b -- -k watch
"""

import asyncio
import time

import pytest
from e2b import AsyncSandbox, FilesystemEventType, Sandbox, SandboxException
from e2b.exceptions import FileNotFoundException, InvalidArgumentException

WAIT = 10.0


@pytest.fixture(scope="module")
def sandbox(server_url):
    sbx = Sandbox.create(template="base")
    try:
        yield sbx
    finally:
        sbx.kill()


@pytest.fixture()
def workdir(sandbox, request):
    """A fresh directory for one test."""
    path = f"/tmp/watch-{request.node.name}"
    sandbox.commands.run(f"rm -rf {path} && mkdir -p {path}")
    return path


def poll_until(handle, done, timeout=WAIT):
    """Collects handle.get_new_events() until done(events) holds; returns them."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(handle.get_new_events())
        if done(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"timed out; events so far: {events}")


def seen(events, name, kind):
    return any(e.name == name and e.type == kind for e in events)


def test_watch_sync_sees_writes_renames_and_removes(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    try:
        sandbox.files.write(f"{workdir}/hello.txt", "hi")
        events = poll_until(handle, lambda ev: seen(ev, "hello.txt", FilesystemEventType.WRITE))
        assert seen(events, "hello.txt", FilesystemEventType.CREATE), events
        # The server's atomic write shows no temporary file.
        assert all(e.name == "hello.txt" for e in events), events

        sandbox.files.rename(f"{workdir}/hello.txt", f"{workdir}/moved.txt")
        events = poll_until(handle, lambda ev: seen(ev, "moved.txt", FilesystemEventType.CREATE))
        assert seen(events, "hello.txt", FilesystemEventType.RENAME), events

        sandbox.commands.run(f"chmod 600 {workdir}/moved.txt && echo more >> {workdir}/moved.txt")
        events = poll_until(
            handle,
            lambda ev: seen(ev, "moved.txt", FilesystemEventType.CHMOD)
            and seen(ev, "moved.txt", FilesystemEventType.WRITE),
        )

        sandbox.files.remove(f"{workdir}/moved.txt")
        poll_until(handle, lambda ev: seen(ev, "moved.txt", FilesystemEventType.REMOVE))
        # Drained: nothing new without a change.
        time.sleep(0.3)
        assert handle.get_new_events() == []
    finally:
        handle.stop()


def test_watch_sync_is_not_recursive_unless_asked(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    flat = sandbox.files.watch_dir(workdir)
    deep = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        sandbox.files.write(f"{workdir}/sub/inner.txt", "x")
        poll_until(deep, lambda ev: seen(ev, "sub/inner.txt", FilesystemEventType.WRITE))
        # A directory made after the watch started is followed too.
        sandbox.files.make_dir(f"{workdir}/later")
        poll_until(deep, lambda ev: seen(ev, "later", FilesystemEventType.CREATE))
        deadline = time.monotonic() + WAIT
        found, n = False, 0
        while not found and time.monotonic() < deadline:
            n += 1
            sandbox.files.write(f"{workdir}/later/f{n}.txt", "y")
            time.sleep(0.2)
            found = any(e.name.startswith("later/f") for e in deep.get_new_events())
        assert found, "a new subdirectory of a recursive watch is never watched"
        flat_events = flat.get_new_events()
        assert not any("/" in e.name for e in flat_events), flat_events
        assert seen(flat_events, "later", FilesystemEventType.CREATE), flat_events
    finally:
        flat.stop()
        deep.stop()


def test_watch_sync_stop_ends_the_watcher(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    handle.stop()
    with pytest.raises(SandboxException, match="already stopped"):
        handle.get_new_events()
    # The server forgot it: polling its id again is not found.
    with pytest.raises(SandboxException):
        handle._closed = False
        handle.get_new_events()


def test_watch_refuses_a_missing_directory_and_a_file(sandbox, workdir):
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(f"{workdir}/missing")
    sandbox.files.write(f"{workdir}/plain.txt", "x")
    with pytest.raises(InvalidArgumentException, match="not a directory"):
        sandbox.files.watch_dir(f"{workdir}/plain.txt")


def test_watch_ends_when_the_directory_is_removed(sandbox, workdir):
    handle = sandbox.files.watch_dir(workdir)
    sandbox.commands.run(f"rm -rf {workdir}")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            handle.get_new_events()
        except SandboxException as e:
            assert "removed" in str(e), e
            return
        time.sleep(0.1)
    raise AssertionError("a watcher of a removed directory never ends")


async def test_watch_async_on_event(server_url):
    sbx = await AsyncSandbox.create(template="base")
    try:
        await sbx.commands.run("mkdir -p /tmp/awatch/deep")
        events = []
        exits = []
        got_write = asyncio.Event()

        def on_event(event):
            events.append(event)
            if event.name == "deep/a.txt" and event.type == FilesystemEventType.WRITE:
                got_write.set()

        handle = await sbx.files.watch_dir(
            "/tmp/awatch", on_event=on_event, on_exit=exits.append, recursive=True
        )
        await sbx.files.write("/tmp/awatch/deep/a.txt", "hello")
        await asyncio.wait_for(got_write.wait(), WAIT)
        assert any(
            e.name == "deep/a.txt" and e.type == FilesystemEventType.CREATE for e in events
        ), events
        await handle.stop()
        assert exits == [None]
        count = len(events)
        await sbx.files.write("/tmp/awatch/after.txt", "x")
        await asyncio.sleep(0.5)
        assert len(events) == count, "events after stop()"

        with pytest.raises(FileNotFoundException):
            await sbx.files.watch_dir("/tmp/awatch-missing", on_event=on_event)
    finally:
        await sbx.kill()
