"""MCP through the official `mcp` Python client against the live server: over stdio
(`openrun mcp`, bridged to the server's /mcp) and over Streamable HTTP (`/mcp` with the bearer
key). Run with `scripts/python-tests mcp`."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

PROTOCOL_VERSION = "2025-11-25"
TOOLS = {
    "create_sandbox", "list_sandboxes", "destroy_sandbox", "run_command", "start_process",
    "read_process_output", "kill_process", "list_processes", "write_process_stdin", "read_file", "write_file",
    "list_files", "edit_file", "environment", "snapshot", "fork", "diff", "preview_url",
    "timeline",
}
INVALID_PARAMS = -32602


def stdio_params(openrun_bin, env):
    return StdioServerParameters(command=openrun_bin, args=["mcp"], env=env)


@contextlib.asynccontextmanager
async def connect(transport, server_url, api_key, openrun_bin, data_dir):
    """A connected client over `transport` ("stdio" or "http"), handshake done."""
    if transport == "stdio":
        env = {
            "OPENRUN_SERVER": server_url,
            "OPENRUN_API_KEY": api_key,
            "OPENRUN_DATA_DIR": data_dir,
        }
        server = stdio_params(openrun_bin, env)
    else:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {api_key}"})
        server = streamable_http_client(f"{server_url}/mcp", http_client=http)
    async with Client(server, mode="legacy", read_timeout_seconds=180) as client:
        yield client


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


async def call(client, tool, **arguments):
    """Calls a tool that must succeed; returns its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {text_of(result)}"
    assert result.structured_content is not None, tool
    return result.structured_content


async def call_error(client, tool, **arguments):
    """Calls a tool that must fail as a tool error; returns its text."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} did not fail: {text_of(result)}"
    return text_of(result)


@contextlib.asynccontextmanager
async def sandbox(client, **options):
    created = await call(client, "create_sandbox", ttl="10m", **options)
    try:
        yield created["id"]
    finally:
        result = await client.call_tool("destroy_sandbox", {"sandbox_id": created["id"]})
        # Already destroyed by the test is fine; anything else is not.
        assert not result.is_error or "no such sandbox" in text_of(result), text_of(result)


TRANSPORTS = ["stdio", "http"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_initialize_and_tools(transport, server_url, api_key, openrun_bin, data_dir):
    async with connect(transport, server_url, api_key, openrun_bin, data_dir) as client:
        assert client.protocol_version == PROTOCOL_VERSION
        assert client.server_info.name == "openrun"
        assert "create_sandbox" in (client.instructions or "")
        listed = await client.list_tools()
        tools = {t.name: t for t in listed.tools}
        assert TOOLS <= set(tools), TOOLS - set(tools)
        for tool in tools.values():
            assert len(tool.description or "") > 40, tool.name
            assert tool.input_schema["type"] == "object", tool.name
        run = tools["run_command"].input_schema
        assert {"sandbox_id", "command", "argv", "timeout_seconds"} <= set(run["properties"])
        assert run["required"] == ["sandbox_id"]
        assert tools["list_sandboxes"].annotations.read_only_hint is True
        assert tools["destroy_sandbox"].annotations.destructive_hint is True


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_commands_files_and_diff(transport, server_url, api_key, openrun_bin, data_dir):
    async with connect(transport, server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            listed = await call(client, "list_sandboxes")
            assert sid in [s["id"] for s in listed["sandboxes"]]

            ran = await call(client, "run_command", sandbox_id=sid,
                             command="echo hello; echo oops >&2; printf '%s' \"$GREETING\"",
                             env={"GREETING": "hi there"})
            assert ran["exit_code"] == 0 and not ran["timed_out"]
            assert ran["stdout"] == "hello\nhi there"
            assert ran["stderr"] == "oops\n"

            ran = await client.call_tool("run_command", {"sandbox_id": sid, "argv": ["sh", "-c", "exit 3"]})
            assert not ran.is_error, "a non-zero exit is a result, not a tool error"
            assert ran.structured_content["exit_code"] == 3
            assert "exit code 3" in text_of(ran)

            ran = await call(client, "run_command", sandbox_id=sid, command="cat | tr a-z A-Z",
                             stdin="piped in\n")
            assert ran["stdout"] == "PIPED IN\n"

            ran = await call(client, "run_command", sandbox_id=sid, command="echo started; sleep 30",
                             timeout_seconds=1)
            assert ran["timed_out"] is True
            assert ran["exit_code"] != 0
            assert ran["stdout"] == "started\n"

            ran = await call(client, "run_command", sandbox_id=sid,
                             command="head -c 200000 /dev/zero | tr '\\0' x; echo; echo END")
            assert ran["truncated"] is True
            assert ran["stdout"].endswith("END\n")
            assert "bytes left out" in ran["stdout"]

            text = "line one\nline two\nline three\n"
            wrote = await call(client, "write_file", sandbox_id=sid, path="/work/notes.txt", content=text)
            assert wrote["bytes"] == len(text)
            read = await call(client, "read_file", sandbox_id=sid, path="/work/notes.txt")
            assert read["content"] == text and read["encoding"] == "text"
            read = await call(client, "read_file", sandbox_id=sid, path="/work/notes.txt", offset=2, limit=1)
            assert read["content"] == "line two\n"
            assert (read["first_line"], read["last_line"], read["total_lines"]) == (2, 2, 3)

            edited = await call(client, "edit_file", sandbox_id=sid, path="/work/notes.txt",
                                old_string="line two", new_string="line 2")
            assert edited["replacements"] == 1
            message = await call_error(client, "edit_file", sandbox_id=sid, path="/work/notes.txt",
                                       old_string="line four", new_string="x")
            assert "old_string not found" in message
            message = await call_error(client, "edit_file", sandbox_id=sid, path="/work/notes.txt",
                                       old_string="line ", new_string="LINE ")
            assert "found 3 times" in message and "replace_all" in message
            edited = await call(client, "edit_file", sandbox_id=sid, path="/work/notes.txt",
                                old_string="line ", new_string="LINE ", replace_all=True)
            assert edited["replacements"] == 3
            read = await call(client, "read_file", sandbox_id=sid, path="/work/notes.txt")
            assert read["content"] == "LINE one\nLINE 2\nLINE three\n"

            binary = await call(client, "write_file", sandbox_id=sid, path="/work/blob.bin",
                                content="AAEC/w==", encoding="base64")
            assert binary["bytes"] == 4
            read = await call(client, "read_file", sandbox_id=sid, path="/work/blob.bin")
            assert read["encoding"] == "base64" and read["content"] == "AAEC/w=="

            await call(client, "write_file", sandbox_id=sid, path="/work/log.txt", content="a\n")
            appended = await call(client, "write_file", sandbox_id=sid, path="/work/log.txt",
                                  content="b\n", append=True)
            assert appended["appended"] is True
            read = await call(client, "read_file", sandbox_id=sid, path="/work/log.txt")
            assert read["content"] == "a\nb\n"

            listing = await call(client, "list_files", sandbox_id=sid, path="/work")
            names = {e["name"] for e in listing["entries"]}
            assert {"notes.txt", "blob.bin"} <= names

            diff = await call(client, "diff", sandbox_id=sid)
            changed = {c["path"]: c["kind"] for c in diff["changes"]}
            assert changed.get("/work/notes.txt") == "added", changed
            assert "+LINE 2" in diff["patch"]
        # Destroyed: the sandbox is gone for every tool.
        message = await call_error(client, "run_command", sandbox_id=sid, command="true")
        assert "no such sandbox" in message and "list_sandboxes" in message


async def test_background_processes(server_url, api_key, openrun_bin, data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            started = await call(client, "start_process", sandbox_id=sid,
                                 command="for i in 1 2 3; do echo line$i; sleep 0.2; done; exit 4")
            pid = started["pid"]
            out, since, exited = "", 0, None
            for _ in range(20):
                got = await call(client, "read_process_output", sandbox_id=sid, pid=pid,
                                 stdout_since=since, wait_seconds=5)
                out += got["stdout"]
                since = got["stdout_next"]
                if got["exited"]:
                    exited = got
                    break
            assert exited is not None, out
            assert out == "line1\nline2\nline3\n"
            assert exited["exit_code"] == 4
            again = await call(client, "read_process_output", sandbox_id=sid, pid=pid, stdout_since=since)
            assert again["stdout"] == "" and again["exited"]

            started = await call(client, "start_process", sandbox_id=sid, argv=["tr", "a-z", "A-Z"],
                                 stdin=True)
            cat = started["pid"]
            await call(client, "write_process_stdin", sandbox_id=sid, pid=cat, input="hello\n")
            await call(client, "write_process_stdin", sandbox_id=sid, pid=cat, input="world\n", eof=True)
            got = await call(client, "read_process_output", sandbox_id=sid, pid=cat, wait_seconds=10)
            for _ in range(10):
                if got["exited"]:
                    break
                got = await call(client, "read_process_output", sandbox_id=sid, pid=cat, wait_seconds=5)
            assert got["exited"] and got["exit_code"] == 0, got
            assert got["stdout"] == "HELLO\nWORLD\n"

            sleeper = (await call(client, "start_process", sandbox_id=sid, argv=["sleep", "600"]))["pid"]
            listed = await call(client, "list_processes", sandbox_id=sid)
            assert sleeper in [p["pid"] for p in listed["processes"]]
            await call(client, "kill_process", sandbox_id=sid, pid=sleeper)
            got = await call(client, "read_process_output", sandbox_id=sid, pid=sleeper, wait_seconds=10)
            assert got["exited"] and got["signal"] == 9, got


async def test_environment_snapshot_fork_preview_timeline(server_url, api_key, openrun_bin, data_dir):
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as client:
        async with sandbox(client) as sid:
            env = await call(client, "environment", sandbox_id=sid)
            assert "python3" in [t["name"] for t in env["tools"]], env
            assert env["network"]["policy"] == "none"

            await call(client, "write_file", sandbox_id=sid, path="/root/state.txt", content="v1\n")
            name = f"mcp-snap-{uuid.uuid4().hex[:8]}"
            snap = await call(client, "snapshot", sandbox_id=sid, name=name)
            assert snap["image"].startswith(name)
            forked = await call(client, "fork", sandbox_id=sid, count=1)
            (child,) = forked["sandboxes"]
            try:
                read = await call(client, "read_file", sandbox_id=child["id"], path="/root/state.txt")
                assert read["content"] == "v1\n"
            finally:
                await call(client, "destroy_sandbox", sandbox_id=child["id"])

            preview = await call(client, "preview_url", sandbox_id=sid, port=8080)
            assert f"/v1/sandboxes/{sid}/ports/8080/" in preview["url"]
            assert preview["url"].startswith(server_url)
            message = await call_error(client, "preview_url", sandbox_id=sid, port=0)
            assert "invalid port" in message

            await call(client, "run_command", sandbox_id=sid, command="true")
            events = (await call(client, "timeline", sandbox_id=sid))["events"]
            kinds = [e["kind"] for e in events]
            for kind in ["sandbox.create", "file.write", "sandbox.snapshot", "process.exec", "preview.token"]:
                assert kind in kinds, kinds
            later = await call(client, "timeline", sandbox_id=sid, since=events[-1]["seq"])
            assert later["events"] == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_errors_a_model_can_act_on(transport, server_url, api_key, openrun_bin, data_dir):
    async with connect(transport, server_url, api_key, openrun_bin, data_dir) as client:
        message = await call_error(client, "run_command", sandbox_id="0123456789ab", command="true")
        assert "no such sandbox: 0123456789ab" in message and "list_sandboxes" in message
        message = await call_error(client, "create_sandbox", image="no-such-image-xyz")
        assert "no-such-image-xyz" in message
        async with sandbox(client) as sid:
            message = await call_error(client, "run_command", sandbox_id=sid, argv=["no-such-program-xyz"])
            assert "command_not_found" in message
            message = await call_error(client, "read_file", sandbox_id=sid, path="/no/such/file")
            assert "not_found" in message
            message = await call_error(client, "run_command", sandbox_id=sid)
            assert "nothing to run" in message
            message = await call_error(client, "run_command", sandbox_id=sid, command="true",
                                       timeout_seconds=0)
            assert "timeout_seconds" in message
            message = await call_error(client, "read_process_output", sandbox_id=sid, pid=99999)
            assert "no_such_process" in message
        # Arguments that do not fit the tool's schema: a tool error naming the field (MCP
        # 2025-11-25 treats input validation errors as tool execution errors).
        message = await call_error(client, "run_command", command="true")
        assert "sandbox_id" in message
        message = await call_error(client, "read_file", sandbox_id="x", path="/x", offset="first")
        assert "first" in message
        # An unknown tool is protocol misuse: a JSON-RPC error naming it.
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("no_such_tool", {})
        assert unknown.value.code == INVALID_PARAMS
        assert "no_such_tool" in unknown.value.message


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
               "clientInfo": {"name": "t", "version": "1"}},
}


def rpc_messages(answer):
    """The JSON-RPC messages of a Streamable HTTP answer (JSON or SSE)."""
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in answer.text.splitlines()
                if line.startswith("data:") and line[5:].strip()]
    return [answer.json()]


def test_malformed_requests_are_json_rpc_errors(server_url, api_key):
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=server_url, headers=headers, timeout=30) as http:
        init = http.post("/mcp", json=INITIALIZE)
        assert init.status_code == 200
        (answer,) = rpc_messages(init)
        assert answer["result"]["protocolVersion"] == PROTOCOL_VERSION
        headers = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": PROTOCOL_VERSION}
        assert http.post("/mcp", headers=headers,
                         json={"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202

        def ask(message):
            return [m for m in rpc_messages(http.post("/mcp", headers=headers, json=message)) if "id" in m]

        # A tools/call whose params are not a CallToolRequest: rmcp cannot parse it as one and
        # answers as for an unknown method (-32601); a JSON-RPC error either way, never a result.
        for n, params in enumerate([{"name": "run_command", "arguments": "not an object"},
                                    {"arguments": {}}, {"name": 7}]):
            (answer,) = ask({"jsonrpc": "2.0", "id": 10 + n, "method": "tools/call", "params": params})
            assert "result" not in answer, answer
            assert answer["error"]["code"] in (-32600, -32601, INVALID_PARAMS), answer
        (answer,) = ask({"jsonrpc": "2.0", "id": 4, "method": "tools/frobnicate", "params": {}})
        assert answer["error"]["code"] == -32601, answer
        http.delete("/mcp", headers=headers)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic abc"])
def test_http_needs_a_known_key(authorization, server_url):
    headers = {"Accept": "application/json, text/event-stream"}
    if authorization:
        headers["Authorization"] = authorization
    answer = httpx.post(f"{server_url}/mcp", json=INITIALIZE, headers=headers, timeout=30)
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthorized"


def bare_env(data_dir):
    """An environment naming no server and no config file, over `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENRUN_", "XDG_CONFIG"))}
    env["HOME"] = data_dir
    env["OPENRUN_DATA_DIR"] = data_dir
    return env


def test_stdio_without_a_server_and_no_start_fails_clearly(openrun_bin):
    with tempfile.TemporaryDirectory() as home:
        env = bare_env(home)
        done = subprocess.run([openrun_bin, "mcp", "--no-start"], input="", env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert done.stdout == "", "stdout carries only JSON-RPC"
        assert "no openrun server is configured" in done.stderr
        assert "OPENRUN_SERVER" in done.stderr


def test_stdio_configured_server_that_does_not_answer_fails_clearly(openrun_bin, api_key):
    with tempfile.TemporaryDirectory() as home:
        env = bare_env(home)
        env["OPENRUN_SERVER"] = "http://127.0.0.1:9"
        env["OPENRUN_API_KEY"] = api_key
        done = subprocess.run([openrun_bin, "mcp"], input="", env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and done.stdout == ""
        assert "does not answer" in done.stderr and "127.0.0.1:9" in done.stderr


async def test_stdio_starts_a_server_when_none_is_configured(openrun_bin):
    """No server configured, none running: `openrun mcp` starts one on its data dir, uses it,
    and stops it when the client closes stdin."""
    home = tempfile.mkdtemp(prefix="ormcp")
    try:
        env = bare_env(home)
        async with Client(stdio_params(openrun_bin, env), mode="legacy", read_timeout_seconds=120) as client:
            assert client.protocol_version == PROTOCOL_VERSION
            listed = await call(client, "list_sandboxes")
            assert listed["sandboxes"] == []
        local = os.path.join(home, "local.json")
        assert os.path.exists(local), "the started server wrote its local key"
        with open(local) as f:
            url = json.load(f)["server"]
        # Stopped with its client: nothing answers there any more.
        for _ in range(100):
            try:
                httpx.get(f"{url}/v1/health", timeout=1)
            except httpx.TransportError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server openrun mcp started is still running")
    finally:
        subprocess.run(["umount", "-l", os.path.join(home, "disk-pool")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


async def test_tenants_are_isolated(server_url, api_key, openrun_bin, data_dir, stranger_key):
    stranger = stranger_key
    async with connect("http", server_url, api_key, openrun_bin, data_dir) as owner:
        async with sandbox(owner) as sid:
            await call(owner, "write_file", sandbox_id=sid, path="/root/secret.txt", content="s3cret\n")
            async with connect("stdio", server_url, stranger, openrun_bin, data_dir) as other:
                listed = await call(other, "list_sandboxes")
                assert sid not in [s["id"] for s in listed["sandboxes"]]
                for tool, args in [("run_command", {"command": "true"}),
                                   ("read_file", {"path": "/root/secret.txt"}),
                                   ("timeline", {}), ("diff", {}), ("destroy_sandbox", {})]:
                    message = await call_error(other, tool, sandbox_id=sid, **args)
                    assert f"no such sandbox: {sid}" in message, (tool, message)
                    assert "s3cret" not in message
            # A session id is no credential: on the owner's session, the stranger's key gets
            # 404 (as for an unknown session) for POST, GET (also resuming with Last-Event-ID)
            # and DELETE, and the session goes on for its owner.
            headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {api_key}"}
            with httpx.Client(base_url=server_url, headers=headers, timeout=60) as http:
                init = http.post("/mcp", json=INITIALIZE)
                session = {"mcp-session-id": init.headers["mcp-session-id"],
                           "mcp-protocol-version": PROTOCOL_VERSION}
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                http.post("/mcp", headers=session, json=initialized)
                read_secret = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                               "params": {"name": "read_file",
                                          "arguments": {"sandbox_id": sid, "path": "/root/secret.txt"}}}
                as_stranger = {**session, "Authorization": f"Bearer {stranger}"}
                asked = http.post("/mcp", headers=as_stranger, json=read_secret)
                assert asked.status_code == 404, (asked.status_code, asked.text)
                assert "s3cret" not in asked.text
                for extra in [{}, {"Last-Event-ID": "0/0"}, {"Last-Event-ID": "1"}]:
                    got = http.get("/mcp", headers={**as_stranger, **extra,
                                                    "Accept": "text/event-stream"})
                    assert got.status_code == 404, (extra, got.status_code, got.text)
                assert http.delete("/mcp", headers=as_stranger).status_code == 404
                # Still the owner's, still alive.
                mine = http.post("/mcp", headers=session, json=read_secret)
                assert mine.status_code == 200, mine.text
                (answer,) = [m for m in rpc_messages(mine) if "id" in m]
                assert "s3cret" in json.dumps(answer["result"]), answer
                assert http.delete("/mcp", headers=session).status_code in (200, 202, 204)
                gone = http.post("/mcp", headers=session, json=read_secret)
                assert gone.status_code == 404


def leaves(error):
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def test_stdio_with_a_wrong_key_says_so(server_url, openrun_bin, data_dir):
    with pytest.raises(BaseException) as refused:
        async with connect("stdio", server_url, "or_not_a_key", openrun_bin, data_dir):
            pass
    errors = [e for e in leaves(refused.value) if isinstance(e, MCPError)]
    assert errors, refused.value
    assert "401" in errors[0].message and "unknown API key" in errors[0].message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_stdio_bridge_survives_a_server_restart(openrun_bin, private_servers):
    """The server forgets MCP sessions when it restarts: the bridge opens a new one with the
    client's initialize and the client notices nothing."""
    server = private_servers.start()
    env = bare_env(server.data)
    env["OPENRUN_SERVER"] = server.url
    env["OPENRUN_API_KEY"] = server.key
    async with Client(stdio_params(openrun_bin, env), mode="legacy", read_timeout_seconds=60) as client:
        assert (await call(client, "list_sandboxes"))["sandboxes"] == []
        server = private_servers.restart(server)
        assert (await call(client, "list_sandboxes"))["sandboxes"] == []
        tools = await client.list_tools()
        assert "run_command" in [t.name for t in tools.tools]
