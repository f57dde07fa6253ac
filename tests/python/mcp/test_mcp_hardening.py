"""MCP hardening: concurrent edits, symlinks, output encoding, listing, session limits, and
the stdio bridge's handling of keys, stale local servers, odd input and sibling bridges.
Run with `scripts/python-tests mcp`."""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from test_mcp import (
    INITIALIZE, PROTOCOL_VERSION, bare_env, call, call_error, connect, rpc_messages,
    sandbox, text_of,
)

REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


async def test_parallel_edits_of_one_file_all_land(server_url, api_key, openrun_bin, data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            lines = "".join(f"line {i} here\n" for i in range(20))
            await call(client, "write_file", sandbox_id=sid, path="/root/many.txt", content=lines)

            async def edit(i):
                return await client.call_tool("edit_file", {
                    "sandbox_id": sid, "path": "/root/many.txt",
                    "old_string": f"line {i} here\n", "new_string": f"edited {i} here\n"})

            results = await asyncio.gather(*(edit(i) for i in range(20)))
            for result in results:
                assert not result.is_error, text_of(result)
            read = await call(client, "read_file", sandbox_id=sid, path="/root/many.txt")
            assert read["content"] == "".join(f"edited {i} here\n" for i in range(20)), read["content"]


async def test_edit_file_refuses_a_symlink_and_write_file_replaces_it(server_url, api_key, openrun_bin,
                                                                      data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            await call(client, "write_file", sandbox_id=sid, path="/root/target.txt", content="alpha\n")
            await call(client, "run_command", sandbox_id=sid, command="ln -s target.txt /root/link.txt")
            message = await call_error(client, "edit_file", sandbox_id=sid, path="/root/link.txt",
                                       old_string="alpha", new_string="beta")
            assert "/root/link.txt is a symlink to target.txt: edit /root/target.txt" in message, message
            ran = await call(client, "run_command", sandbox_id=sid,
                             command="test -L /root/link.txt && cat /root/target.txt")
            assert ran["exit_code"] == 0, "edit_file replaced the link"
            assert ran["stdout"] == "alpha\n"
            # The target edits fine; the link then shows the new text.
            await call(client, "edit_file", sandbox_id=sid, path="/root/target.txt",
                       old_string="alpha", new_string="beta")
            assert (await call(client, "read_file", sandbox_id=sid, path="/root/link.txt"))["content"] == "beta\n"
            # write_file (documented): the link is replaced by a file, the target stays.
            await call(client, "write_file", sandbox_id=sid, path="/root/link.txt", content="gamma\n")
            ran = await call(client, "run_command", sandbox_id=sid,
                             command="test ! -L /root/link.txt && cat /root/link.txt /root/target.txt")
            assert ran["exit_code"] == 0 and ran["stdout"] == "gamma\nbeta\n", ran
            # Overlapping matches are not unique.
            await call(client, "write_file", sandbox_id=sid, path="/root/a.txt", content="aaa\n")
            message = await call_error(client, "edit_file", sandbox_id=sid, path="/root/a.txt",
                                       old_string="aa", new_string="b")
            assert "found 2 times" in message, message


async def test_multibyte_output_is_not_broken_at_cuts(server_url, api_key, openrun_bin, data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            # 3-byte characters: the 8 KiB head and the tail cut inside characters.
            ran = await call(client, "run_command", sandbox_id=sid,
                             command="python3 -c \"import sys; sys.stdout.write('€' * 40000)\"")
            assert ran["truncated"] is True
            assert REPLACEMENT not in ran["stdout"], ran["stdout"][8000:8300]
            head, _, tail = ran["stdout"].partition("\n[...")
            assert set(head) == {"€"} and tail.endswith("€")
            # Paging a background process's output: every page ends at a character boundary.
            started = await call(client, "start_process", sandbox_id=sid,
                                 command="python3 -c \"import sys; sys.stdout.write('€' * 30000)\"")
            pid, since, text = started["pid"], 0, ""
            for _ in range(20):
                page = await call(client, "read_process_output", sandbox_id=sid, pid=pid,
                                  stdout_since=since, wait_seconds=5)
                assert REPLACEMENT not in page["stdout"]
                text += page["stdout"]
                since = page["stdout_next"]
                if page["exited"] and not page["more"]:
                    break
            assert text == "€" * 30000


async def test_list_sandboxes_shows_live_ones_newest_first_with_a_cursor(server_url, api_key, openrun_bin,
                                                                        data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as first, sandbox(client) as second, sandbox(client) as third:
            await call(client, "destroy_sandbox", sandbox_id=second)
            listed = await call(client, "list_sandboxes")
            ids = [s["id"] for s in listed["sandboxes"]]
            assert second not in ids, "a destroyed sandbox is not live"
            assert ids.index(third) < ids.index(first), "newest first"
            # One at a time, with the cursor: every live one, newest first, exactly once.
            seen, cursor = [], None
            for _ in range(len(ids) + 1):
                args = {"limit": 1} | ({"cursor": cursor} if cursor else {})
                page = await call(client, "list_sandboxes", **args)
                seen += [s["id"] for s in page["sandboxes"]]
                if not page["more"]:
                    break
                cursor = page["next_cursor"]
            assert seen == ids
            message = await call_error(client, "list_sandboxes", cursor="bogus")
            assert "next_cursor" in message


def initialize(http, key):
    """A new session of `key`; its headers."""
    answer = http.post("/mcp", json=INITIALIZE, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {key}", "mcp-session-id": answer.headers["mcp-session-id"],
            "mcp-protocol-version": PROTOCOL_VERSION}


def test_sessions_per_key_are_bounded_and_the_oldest_idle_goes(server_url, stranger_key):
    key = stranger_key
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    with httpx.Client(base_url=server_url, headers={"Accept": "application/json, text/event-stream"},
                      timeout=30) as http:
        sessions = []
        for _ in range(33):
            session = initialize(http, key)
            assert http.post("/mcp", headers=session,
                             json={"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
            sessions.append(session)
        # The 33rd closed the oldest idle one of this key (32 at most).
        assert http.post("/mcp", headers=sessions[0], json=ping).status_code == 404
        for session in sessions[1:]:
            answer = http.post("/mcp", headers=session, json=ping)
            assert answer.status_code == 200, answer.text
            assert [m for m in rpc_messages(answer) if "id" in m][0]["result"] == {}
        for session in sessions[1:]:
            http.delete("/mcp", headers=session)


def run_bridge(openrun_bin, env, lines, timeout=60):
    """`openrun mcp` with `lines` on stdin (then EOF)."""
    return subprocess.run([openrun_bin, "mcp"], input="".join(lines), env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_bridge_never_shows_a_bad_key(server_url, openrun_bin):
    with tempfile.TemporaryDirectory() as home:
        env = bare_env(home)
        env["OPENRUN_SERVER"] = server_url
        env["OPENRUN_API_KEY"] = "or_secretpart\x7fmore"
        done = run_bridge(openrun_bin, env, [json.dumps(INITIALIZE) + "\n"])
        assert "secretpart" not in done.stdout + done.stderr, (done.stdout, done.stderr)
        assert done.returncode != 0
        assert "API key" in done.stderr and "cannot carry" in done.stderr, done.stderr


def test_the_bridge_answers_batches_and_over_long_lines_with_errors(server_url, api_key, openrun_bin):
    with tempfile.TemporaryDirectory() as home:
        env = bare_env(home)
        env["OPENRUN_SERVER"] = server_url
        env["OPENRUN_API_KEY"] = api_key
        lines = [json.dumps(INITIALIZE) + "\n",
                 json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n",
                 json.dumps([{"jsonrpc": "2.0", "id": 2, "method": "ping"}]) + "\n",
                 "x" * (33 << 20) + "\n",
                 json.dumps({"jsonrpc": "2.0", "id": 3, "method": "ping"}) + "\n"]
        done = run_bridge(openrun_bin, env, lines, timeout=120)
        answers = [json.loads(line) for line in done.stdout.splitlines()]
        errors = [a for a in answers if "error" in a]
        assert len(errors) == 2, answers
        assert all(e["id"] is None and e["error"]["code"] == -32600 for e in errors), errors
        assert any(a.get("id") == 3 and a.get("result") == {} for a in answers), \
            "the bridge went on after the long line"


FAKE_SERVER = r"""
import http.server, sys
log = open(sys.argv[2], "a")
class H(http.server.BaseHTTPRequestHandler):
    def answer(self):
        log.write(repr(self.headers.get("Authorization")) + "\n"); log.flush()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.end_headers(); self.wfile.write(b'{"status":"ok"}')
    do_GET = do_POST = do_DELETE = answer
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
s.serve_forever()
"""


@contextlib.contextmanager
def impostor(port, log):
    """An HTTP server of another user (nobody) on `port`, noting the Authorization it gets."""
    script = os.path.join(os.path.dirname(log), "impostor.py")
    with open(script, "w") as f:
        f.write(FAKE_SERVER)
    os.chmod(os.path.dirname(log), 0o777)
    open(log, "w").close()
    os.chmod(log, 0o666)
    os.chmod(script, 0o644)
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, script, str(port), log], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def test_the_local_key_never_goes_to_another_users_server_on_a_stale_port(openrun_bin):
    """local.json names a port its server no longer holds; another user's program listens
    there now and answers like a server: neither `openrun mcp` nor the CLI sends it the key,
    and `openrun mcp` starts its own server instead."""
    from test_mcp import free_port
    home = tempfile.mkdtemp(prefix="ormcp")
    try:
        port = free_port()
        with open(os.path.join(home, "local.json"), "w") as f:
            json.dump({"server": f"http://127.0.0.1:{port}", "api_key": "or_localsecret"}, f)
        os.chmod(os.path.join(home, "local.json"), 0o600)
        log = os.path.join(home, "auth.log")
        env = bare_env(home)
        with impostor(port, log):
            done = subprocess.run([openrun_bin, "mcp", "--no-start"], input=json.dumps(INITIALIZE) + "\n",
                                  env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode != 0, done.stdout
            assert "no openrun server" in done.stderr, done.stderr
            # A key of the user's own goes there neither.
            done = subprocess.run([openrun_bin, "mcp", "--no-start"], input=json.dumps(INITIALIZE) + "\n",
                                  env={**env, "OPENRUN_API_KEY": "or_userkey"}, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode != 0, done.stdout
            subprocess.run([openrun_bin, "--server", f"http://127.0.0.1:{port}", "ls"], env=env,
                           capture_output=True, text=True, timeout=60)
            with open(log) as f:
                seen = f.read()
            assert seen, "the impostor was asked (health, ls)"
            assert "or_localsecret" not in seen and "or_userkey" not in seen, seen
    finally:
        subprocess.run(["umount", "-l", os.path.join(home, "disk-pool")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def server_gone(url):
    for _ in range(150):
        try:
            httpx.get(f"{url}/v1/health", timeout=1)
        except httpx.TransportError:
            return True
        time.sleep(0.2)
    return False


def servers_of(home):
    """Pids of the `openrun serve` processes on data dir `home`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and home.encode() in args:
            pids.append(int(entry))
    return pids


class Bridge:
    """A raw `openrun mcp` process, one JSON-RPC line at a time."""

    def __init__(self, openrun_bin, env):
        self.proc = subprocess.Popen([openrun_bin, "mcp"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def send(self, message):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def ask(self, message):
        self.send(message)
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_concurrent_bridges_share_one_started_server(openrun_bin):
    """Two `openrun mcp` on one data dir with no server, at once: one server is started; the
    one that started it closes first and leaves it to the other; the last one stops it."""
    home = tempfile.mkdtemp(prefix="ormcp")
    bridges = []
    try:
        env = bare_env(home)
        bridges = [Bridge(openrun_bin, env), Bridge(openrun_bin, env)]
        for bridge in bridges:
            bridge.send(INITIALIZE)
        for bridge in bridges:
            answer = json.loads(bridge.proc.stdout.readline())
            assert answer["result"]["protocolVersion"] == PROTOCOL_VERSION, answer
            bridge.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert len(servers_of(home)) == 1, "two servers on one data dir"
        with open(os.path.join(home, "local.json")) as f:
            url = json.load(f)["server"]
        with open(os.path.join(home, "mcp-server.pid")) as f:
            server_pid = int(f.read().split()[0])
        with open(f"/proc/{server_pid}/stat") as f:
            starter_pid = int(f.read().rsplit(")", 1)[1].split()[1])
        starter = next(b for b in bridges if b.proc.pid == starter_pid)
        other = next(b for b in bridges if b is not starter)
        starter.close()
        assert httpx.get(f"{url}/v1/health", timeout=5).status_code == 200, \
            "the starter stopped a server another openrun mcp uses"
        answer = other.ask({"jsonrpc": "2.0", "id": 5, "method": "ping"})
        assert answer == {"jsonrpc": "2.0", "id": 5, "result": {}}, answer
        other.close()
        assert server_gone(url), "the last openrun mcp did not stop the started server"
    finally:
        for bridge in bridges:
            if bridge.proc.poll() is None:
                bridge.proc.kill()
        for pid in servers_of(home):
            os.kill(pid, 15)
        subprocess.run(["umount", "-l", os.path.join(home, "disk-pool")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def server_pid(data_dir):
    """The pid of the live `openrun serve` on `data_dir`."""
    (pid,) = servers_of(data_dir)
    return pid


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_abandoned_output_waits_hold_no_agent_connection(server_url, api_key, openrun_bin, data_dir):
    """read_process_output with wait_seconds on a quiet process returns at its deadline; the
    server's follow of that output ends with it (no connection left per call)."""
    pid = server_pid(data_dir)
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            quiet = (await call(client, "start_process", sandbox_id=sid, command="sleep 300"))["pid"]
            await call(client, "read_process_output", sandbox_id=sid, pid=quiet, wait_seconds=1)
            await asyncio.sleep(0.5)
            before = open_fds(pid)
            for _ in range(3):
                pages = await asyncio.gather(*(
                    call(client, "read_process_output", sandbox_id=sid, pid=quiet, wait_seconds=1)
                    for _ in range(8)))
                assert all(not page["exited"] for page in pages)
            await asyncio.sleep(1)
            after = open_fds(pid)
            assert after <= before + 4, f"{after - before} more open fds after 24 abandoned waits"
            await call(client, "kill_process", sandbox_id=sid, pid=quiet)


def sse_call(http, session, request_id, tool, arguments):
    answer = http.post("/mcp", headers=session, json={
        "jsonrpc": "2.0", "id": request_id, "method": "tools/call",
        "params": {"name": tool, "arguments": arguments}})
    assert answer.status_code == 200, answer.text
    (message,) = [m for m in rpc_messages(answer) if m.get("id") == request_id]
    return message


def test_a_cancelled_run_command_kills_its_command(server_url, api_key):
    import threading
    with httpx.Client(base_url=server_url, headers={"Accept": "application/json, text/event-stream"},
                      timeout=120) as http:
        session = initialize(http, api_key)
        http.post("/mcp", headers=session, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        created = sse_call(http, session, 1, "create_sandbox", {"ttl": "5m"})
        sid = created["result"]["structuredContent"]["id"]
        try:
            # A cancelled request gets no answer (MCP): its stream just ends.
            runner = threading.Thread(target=lambda: http.post("/mcp", headers=session, json={
                "jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "run_command", "arguments": {
                    "sandbox_id": sid, "command": "sleep 300", "timeout_seconds": 600}}}))
            runner.start()
            for n in range(100):
                listed = sse_call(http, session, 100 + n, "list_processes", {"sandbox_id": sid})
                processes = listed["result"]["structuredContent"]["processes"]
                if any("sleep 300" in " ".join(p["argv"]) for p in processes):
                    break
                time.sleep(0.1)
            else:
                pytest.fail("run_command's process never showed up")
            cancelled = http.post("/mcp", headers=session, json={
                "jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": 7, "reason": "test"}})
            assert cancelled.status_code == 202
            runner.join(timeout=30)
            assert not runner.is_alive(), "the cancelled call did not end"
            ran = sse_call(http, session, 300, "run_command",
                           {"sandbox_id": sid, "command": "pgrep -x sleep || echo none"})
            assert ran["result"]["structuredContent"]["stdout"].strip() == "none", ran
        finally:
            sse_call(http, session, 400, "destroy_sandbox", {"sandbox_id": sid})
            http.delete("/mcp", headers=session)


async def test_read_file_goes_on_by_bytes_in_long_lines_and_binaries(server_url, api_key, openrun_bin, data_dir):
    import base64
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            line = "é" + "".join(f"{i:07d}," for i in range(20000)) + "€\n"
            await call(client, "write_file", sandbox_id=sid, path="/root/long.txt", content=line + "next\n")
            first = await call(client, "read_file", sandbox_id=sid, path="/root/long.txt")
            assert first["truncated"] and first["next_byte_offset"], first["next_byte_offset"]
            text, at = first["content"], first["next_byte_offset"]
            for _ in range(20):
                page = await call(client, "read_file", sandbox_id=sid, path="/root/long.txt", byte_offset=at)
                assert page["encoding"] == "text"
                text += page["content"]
                if page["next_byte_offset"] is None:
                    break
                at = page["next_byte_offset"]
            assert text == line + "next\n"
            blob = bytes(range(256)) * 400 + b"\0tail"
            await call(client, "write_file", sandbox_id=sid, path="/root/blob.bin",
                       content=base64.b64encode(blob).decode(), encoding="base64")
            got, at = b"", 0
            for _ in range(20):
                page = await call(client, "read_file", sandbox_id=sid, path="/root/blob.bin", byte_offset=at)
                assert page["encoding"] == "base64"
                got += base64.b64decode(page["content"])
                if page["next_byte_offset"] is None:
                    break
                at = page["next_byte_offset"]
            assert got == blob


def test_the_bridge_keeps_initialized_before_the_requests_after_it(server_url, api_key, openrun_bin):
    with tempfile.TemporaryDirectory() as home:
        env = bare_env(home)
        env["OPENRUN_SERVER"] = server_url
        env["OPENRUN_API_KEY"] = api_key
        lines = [json.dumps(INITIALIZE) + "\n",
                 json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n"]
        lines += [json.dumps({"jsonrpc": "2.0", "id": 10 + n, "method": "tools/list"}) + "\n" for n in range(8)]
        done = run_bridge(openrun_bin, env, lines)
        answers = {a.get("id"): a for a in map(json.loads, done.stdout.splitlines())}
        for n in range(8):
            assert "result" in answers.get(10 + n, {}), answers.get(10 + n)


async def test_start_process_timeouts_are_its_own(server_url, api_key, openrun_bin, data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            message = await call_error(client, "start_process", sandbox_id=sid, command="true",
                                       timeout_seconds=0)
            assert "timeout_seconds" in message and "use start_process" not in message, message
            started = await client.call_tool("start_process", {
                "sandbox_id": sid, "command": "cat", "stdin": True, "timeout_seconds": 7200})
            assert not started.is_error, text_of(started)
            assert "write_process_stdin" in text_of(started) and "Started pid" in text_of(started)
            await call(client, "kill_process", sandbox_id=sid, pid=started.structured_content["pid"])
