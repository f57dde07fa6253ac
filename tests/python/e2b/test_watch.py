"""Directory watching through the official e2b SDK against a live `openrun serve`: the sync
`files.watch_dir` (CreateWatcher / GetWatcherEvents / RemoveWatcher), recursive watches, stop(),
refusals (missing directory, a file), a killed sandbox, and the async `files.watch_dir` (the
WatchDir stream) with its on_event and on_exit callbacks. Also the core call's own surface,
`GET /v1/sandboxes/{id}/files/watch` (NDJSON), which the E2B adapter is a thin layer over.

Run: scripts/python-tests e2b -- -k watch
"""

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

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


def test_watch_sync_watcher_of_a_killed_sandbox_fails(server_url):
    sbx = Sandbox.create(template="base")
    try:
        handle = sbx.files.watch_dir("/tmp")
    finally:
        sbx.kill()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def v1(server_url, api_key, method, path, body=None, timeout=30):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(
        server_url + path,
        data=data,
        method=method,
        headers={"Authorization": "Bearer " + api_key, "Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=timeout)


def test_watch_v1_ndjson_stream(server_url, api_key):
    sandbox = json.load(v1(server_url, api_key, "POST", "/v1/sandboxes", {}))
    sid = sandbox["id"]
    try:
        v1(server_url, api_key, "POST", f"/v1/sandboxes/{sid}/files/mkdir",
           {"path": "/tmp/v1w/sub", "parents": True})
        stream = v1(server_url, api_key, "GET",
                    f"/v1/sandboxes/{sid}/files/watch?path=/tmp/v1w&recursive=true&timeout_ms=20000")
        assert stream.headers["Content-Type"] == "application/x-ndjson"
        lines = []
        done = threading.Event()

        def read():
            for raw in stream:
                line = json.loads(raw)
                lines.append(line)
                if line == {"type": "change", "name": "sub/x.txt", "kind": "write"}:
                    done.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        v1(server_url, api_key, "PUT", f"/v1/sandboxes/{sid}/files?path=/tmp/v1w/sub/x.txt", b"data")
        assert done.wait(WAIT), lines
        assert {"type": "change", "name": "sub/x.txt", "kind": "create"} in lines, lines
        stream.close()

        # timeout_ms ends a quiet stream with an ended line.
        quiet = v1(server_url, api_key, "GET",
                   f"/v1/sandboxes/{sid}/files/watch?path=/tmp/v1w&timeout_ms=300")
        assert [json.loads(l) for l in quiet] == [{"type": "ended", "reason": "timeout_ms passed"}]

        for query, status, code in [
            ("path=/tmp/v1w/none", 404, "not_found"),
            ("path=/etc/hostname", 400, "not_a_directory"),
            ("path=/proc/self/root", 403, "forbidden"),
            ("path=/tmp&recursive=maybe", 400, "invalid_argument"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as err:
                v1(server_url, api_key, "GET", f"/v1/sandboxes/{sid}/files/watch?{query}")
            assert err.value.code == status, query
            assert json.load(err.value)["code"] == code, query
    finally:
        v1(server_url, api_key, "DELETE", f"/v1/sandboxes/{sid}")


async def test_watch_async_on_exit_gets_the_error_when_the_sandbox_is_killed(server_url):
    sbx = await AsyncSandbox.create(template="base")
    exited = asyncio.Event()
    exits = []

    def on_exit(error):
        exits.append(error)
        exited.set()

    try:
        await sbx.files.watch_dir("/tmp", on_event=lambda e: None, on_exit=on_exit)
    finally:
        await sbx.kill()
    await asyncio.wait_for(exited.wait(), WAIT)
    assert len(exits) == 1 and isinstance(exits[0], Exception), exits


def test_watch_include_entry(sandbox, workdir):
    # The SDK asks for entries only from envd >= 0.6.3; the server reports an older envd (for
    # features it lacks elsewhere) but serves includeEntry, so raise the SDK's view here.
    from packaging.version import Version

    files = sandbox.files
    saved = files._envd_version
    files._envd_version = Version("0.6.4")
    try:
        handle = files.watch_dir(workdir, include_entry=True)
    finally:
        files._envd_version = saved
    try:
        sandbox.files.write(f"{workdir}/e.txt", "abc")
        events = poll_until(handle, lambda ev: seen(ev, "e.txt", FilesystemEventType.WRITE))
        write = next(e for e in events if e.type == FilesystemEventType.WRITE)
        assert write.entry is not None
        assert write.entry.path == f"{workdir}/e.txt"
        assert write.entry.size == 3
        sandbox.files.remove(f"{workdir}/e.txt")
        events = poll_until(handle, lambda ev: seen(ev, "e.txt", FilesystemEventType.REMOVE))
        assert all(e.entry is None for e in events if e.type == FilesystemEventType.REMOVE)
    finally:
        handle.stop()


DEEP_CHAIN = """python3 -c '
import os
os.makedirs("{path}", exist_ok=True); os.chdir("{path}")
for i in range({depth}):
    os.mkdir("{name}"); os.chdir("{name}")
'"""


def agent_peak_kib(sandbox):
    """The agent's (pid 1) peak memory in KiB."""
    out = sandbox.commands.run("grep VmHWM /proc/1/status").stdout
    return int(out.split()[1])


def test_watch_refuses_a_deep_tree_and_the_sandbox_lives(sandbox, workdir):
    # 3000 levels of 64-character names (192 kB of path at the bottom): refused clearly,
    # not the agent (pid 1, the sandbox) killed for memory.
    deep = f"{workdir}/deep"
    sandbox.commands.run(DEEP_CHAIN.format(path=deep, depth=3000, name="d" * 64), timeout=120)
    with pytest.raises(InvalidArgumentException, match="deeper than 4095"):
        sandbox.files.watch_dir(deep, recursive=True)
    assert agent_peak_kib(sandbox) < 100 * 1024
    # The sandbox and watching still work.
    handle = sandbox.files.watch_dir(deep)
    try:
        sandbox.files.write(f"{deep}/top.txt", "x")
        poll_until(handle, lambda ev: seen(ev, "top.txt", FilesystemEventType.WRITE))
    finally:
        handle.stop()
    sandbox.commands.run(f"rm -rf {deep}", timeout=120)


def test_watch_again_right_after_stop_keeps_reporting(sandbox, workdir):
    # A recursive watch of a tree shares every kernel watch with the previous one, which is
    # being stopped as the new one starts.
    sandbox.commands.run(f"cd {workdir} && mkdir -p d{{1..500}}")
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    for round in range(15):
        handle.stop()
        handle = sandbox.files.watch_dir(workdir, recursive=True)
        sandbox.files.write(f"{workdir}/d1/f{round}", "x")
        poll_until(handle, lambda ev: seen(ev, f"d1/f{round}", FilesystemEventType.WRITE))
    handle.stop()


def test_watch_follows_thousands_of_new_directories_while_files_answer(sandbox, workdir):
    sandbox.files.write(f"{workdir}/keep.txt", "content")
    handle = sandbox.files.watch_dir(workdir, recursive=True)
    try:
        maker = sandbox.commands.run(
            f"cd {workdir} && mkdir -p t{{1..1000}}/a/b", background=True
        )
        # File operations answer meanwhile.
        for _ in range(5):
            assert sandbox.files.read(f"{workdir}/keep.txt") == "content"
        assert maker.wait().exit_code == 0
        # The newest directories are watched.
        deadline = time.monotonic() + WAIT
        n = 0
        events = []
        while True:
            n += 1
            sandbox.files.write(f"{workdir}/t1000/a/b/f{n}", "x")
            time.sleep(0.2)
            events.extend(handle.get_new_events())
            if any(e.name.startswith("t1000/a/b/f") for e in events):
                break
            assert time.monotonic() < deadline, "t1000/a/b is never watched"
    finally:
        handle.stop()


def test_watch_v1_tree_limits_are_400_not_429(server_url, api_key):
    sandbox = json.load(v1(server_url, api_key, "POST", "/v1/sandboxes", {}))
    sid = sandbox["id"]
    try:
        # A tree too deep to name in one path: a clear 400 that retrying cannot lift.
        body = {"cmd": ["sh", "-c", DEEP_CHAIN.format(path="/tmp/v1deep", depth=100, name="e" * 64)]}
        v1(server_url, api_key, "POST", f"/v1/sandboxes/{sid}/exec", body).read()
        with pytest.raises(urllib.error.HTTPError) as err:
            v1(server_url, api_key, "GET",
               f"/v1/sandboxes/{sid}/files/watch?path=/tmp/v1deep&recursive=true")
        assert err.value.code == 400
        answer = json.load(err.value)
        assert answer["code"] == "invalid_argument", answer
        assert "deeper than 4095" in answer["message"], answer
        assert "Retry-After" not in err.value.headers
    finally:
        v1(server_url, api_key, "DELETE", f"/v1/sandboxes/{sid}")
