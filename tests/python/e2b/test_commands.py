"""envd's process service (process.Process/*) through the official e2b SDK: `commands.run`
(output, exit codes, streaming callbacks, timeouts, background, envs, cwd, user), `list`,
`connect` and reconnect, `kill`, stdin; and malformed Connect requests sent by hand."""

import json
import struct
import threading
import time

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
    TimeoutException,
)
from e2b.exceptions import SandboxNotRunningException


def _args(sandbox, pid):
    """The argv of a running process in `commands.list()`, or None."""
    for p in sandbox.commands.list():
        if p.pid == pid:
            return [p.cmd, *p.args]
    return None


def test_run_returns_stdout_stderr_and_exit_code(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0
    assert result.error is None


def test_non_zero_exit_raises_with_the_output(sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("echo partial; echo bad >&2; exit 3")
    assert raised.value.exit_code == 3
    assert raised.value.stdout == "partial\n"
    assert raised.value.stderr == "bad\n"
    assert raised.value.error == "exit status 3"


def test_a_missing_command_is_exit_127_from_bash(sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("no-such-command-h2")
    assert raised.value.exit_code == 127
    assert "no-such-command-h2" in raised.value.stderr


def test_on_stdout_is_called_per_line_while_the_command_runs(sandbox):
    start = time.monotonic()
    seen = []
    errors = []
    result = sandbox.commands.run(
        "echo first; sleep 2; echo second; echo warn >&2",
        on_stdout=lambda text: seen.append((time.monotonic() - start, text)),
        on_stderr=lambda text: errors.append(text),
    )
    total = time.monotonic() - start
    assert "".join(text for _, text in seen) == "first\nsecond\n"
    assert "".join(errors) == "warn\n"
    first_at = next(at for at, text in seen if "first" in text)
    # Streamed: the first line came about 2 s before the end, not with it.
    assert first_at < total - 1.0, (first_at, total)
    assert result.stdout == "first\nsecond\n"


def test_timeout_kills_the_command(sandbox):
    marker = "/tmp/h2-timeout-marker"
    start = time.monotonic()
    with pytest.raises((TimeoutException, CommandExitException)):
        sandbox.commands.run(f"sleep 8; touch {marker}", timeout=2)
    assert time.monotonic() - start < 7
    # The process is gone: it never gets to write the marker.
    time.sleep(7)
    assert not sandbox.files.exists(marker)
    assert all("sleep 8" not in " ".join(p.args) for p in sandbox.commands.list())


def test_background_command_and_wait(sandbox, v1):
    handle = sandbox.commands.run("sleep 1; echo bg-done", background=True)
    assert handle.pid > 0
    assert _args(sandbox, handle.pid) == ["/bin/bash", "-l", "-c", "sleep 1; echo bg-done"]
    result = handle.wait()
    assert result.stdout == "bg-done\n"
    assert result.exit_code == 0
    assert _args(sandbox, handle.pid) is None
    # Forgotten once it exited, as envd does (the agent keeps no output of it).
    time.sleep(0.5)
    table = v1.get(f"/v1/sandboxes/{sandbox.sandbox_id}/processes").json()
    assert handle.pid not in [p["pid"] for p in table]


def test_list_shows_running_commands_with_their_cwd(sandbox):
    handle = sandbox.commands.run("sleep 30", background=True, cwd="/tmp", envs={"H2_L": "1"})
    try:
        listed = {p.pid: p for p in sandbox.commands.list()}
        assert handle.pid in listed
        assert listed[handle.pid].cmd == "/bin/bash"
        assert listed[handle.pid].args == ["-l", "-c", "sleep 30"]
        assert listed[handle.pid].cwd == "/tmp"
        assert listed[handle.pid].envs == {"H2_L": "1"}
    finally:
        sandbox.commands.kill(handle.pid)


def test_connect_and_reconnect_to_a_background_command(sandbox):
    handle = sandbox.commands.run(
        "for i in 1 2 3 4 5 6; do echo tick$i; sleep 0.5; done; echo end", background=True
    )
    handle.disconnect()
    # The process keeps running without a client.
    time.sleep(0.3)
    assert _args(sandbox, handle.pid) is not None

    again = sandbox.commands.connect(handle.pid)
    assert again.pid == handle.pid
    first = None
    for stdout, _, _ in again:
        if stdout:
            first = stdout
            break
    assert first is not None and first.startswith("tick")
    again.disconnect()

    last = sandbox.commands.connect(handle.pid)
    result = last.wait()
    assert result.exit_code == 0
    assert result.stdout.endswith("end\n")
    # Connect streams live output: not what was printed before it.
    assert "tick1" not in result.stdout


def test_connect_behind_on_the_output_gets_all_of_it_and_the_end(sandbox):
    """A reader of `connect` that falls behind while the command exits still gets every byte
    and the end event (the process is forgotten only after it), not a hang to its deadline."""
    handle = sandbox.commands.run(
        "sleep 1; head -c 30000000 /dev/zero | base64 -w 0; echo; echo done",
        background=True,
        timeout=0,
    )
    pid = handle.pid
    handle.disconnect()
    follower = sandbox.commands.connect(pid, timeout=60)
    time.sleep(6)  # the command exits meanwhile; its output waits in the buffers
    started = time.monotonic()
    result = follower.wait()
    assert time.monotonic() - started < 40
    assert result.exit_code == 0
    assert len(result.stdout) == 40_000_000 + len("\ndone\n")
    assert result.stdout.endswith("\ndone\n")
    # Then it is gone, as envd forgets an exited process.
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(pid)


def test_start_refuses_the_interpreters_reserved_tags(sandbox):
    body = _envelope(
        0,
        json.dumps(
            {"process": {"cmd": "/bin/true"}, "tag": "e2b-context:0123456789abcdef:python"}
        ).encode(),
    )
    error = _stream_error(_raw(sandbox, "Start", body))
    assert error["code"] == "invalid_argument"
    assert "reserved" in error["message"]


def test_connect_to_an_unknown_pid_is_not_found(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999_999)


def test_kill_is_true_then_false(sandbox):
    handle = sandbox.commands.run("sleep 60", background=True)
    assert sandbox.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as raised:
        handle.wait()
    assert raised.value.exit_code == -1
    assert raised.value.error == "signal: killed"
    assert sandbox.commands.kill(handle.pid) is False
    assert handle.kill() is False


def test_kill_reaches_the_whole_process_group(sandbox):
    handle = sandbox.commands.run("sleep 60 & sleep 61 & wait", background=True)
    time.sleep(0.5)
    assert handle.kill() is True
    with pytest.raises(CommandExitException):
        handle.wait()
    left = sandbox.commands.run("ps -eo args | grep -c '^sleep 6[01]' || true")
    assert left.stdout.strip() == "0"


def test_send_stdin_then_close_stdin(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello\n")
    handle.send_stdin(b"world\n")
    handle.close_stdin()
    result = handle.wait()
    assert result.stdout == "hello\nworld\n"


def test_send_stdin_of_megabytes(sandbox):
    handle = sandbox.commands.run("wc -c", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, b"y" * (2 << 20))
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout.strip() == str(2 << 20)


def test_stream_input_writes_chunks_in_order(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.stream_input(handle.pid, ["a", b"b", "c\n"])
    sandbox.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "abc\n"


def test_stdin_of_a_command_started_without_it_is_refused(sandbox):
    handle = sandbox.commands.run("sleep 30", background=True)
    try:
        with pytest.raises(SandboxException) as raised:
            sandbox.commands.send_stdin(handle.pid, "x")
        assert "stdin" in str(raised.value)
    finally:
        handle.kill()


def test_envs_and_cwd(sandbox):
    result = sandbox.commands.run('echo "$H2_VAR:$(pwd)"', envs={"H2_VAR": "v a l"}, cwd="/tmp")
    assert result.stdout == "v a l:/tmp\n"


def test_a_relative_cwd_is_taken_from_the_users_home(sandbox):
    sandbox.commands.run("mkdir -p /root/h2-sub", user="root")
    assert sandbox.commands.run("pwd", cwd="h2-sub", user="root").stdout == "/root/h2-sub\n"
    assert sandbox.commands.run("pwd", cwd="~/h2-sub", user="root").stdout == "/root/h2-sub\n"


def test_a_command_that_cannot_start_is_invalid_argument_as_envd_answers(sandbox):
    with pytest.raises(InvalidArgumentException) as raised:
        sandbox.commands.run("true", cwd="/no/such/dir-h2")
    assert "/no/such/dir-h2" in str(raised.value)
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("true", cwd="/etc/passwd")


def test_user_root(sandbox):
    result = sandbox.commands.run("id -u; pwd", user="root")
    assert result.stdout == "0\n/root\n"


def test_killing_the_sandbox_ends_a_running_command():
    sbx = Sandbox.create(template="base")
    raised = {}

    def run():
        try:
            sbx.commands.run("sleep 30")
        except Exception as e:
            raised["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        time.sleep(1)
    finally:
        Sandbox.kill(sbx.sandbox_id)
    thread.join(20)
    assert not thread.is_alive()
    assert isinstance(raised.get("error"), SandboxNotRunningException), raised
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.list()


async def test_the_async_sdk_runs_commands_too():
    sbx = await AsyncSandbox.create(template="base")
    try:
        seen = []
        result = await sbx.commands.run("echo a; echo b >&2", on_stdout=seen.append)
        assert (result.stdout, result.stderr, seen) == ("a\n", "b\n", ["a\n"])
        handle = await sbx.commands.run("cat", background=True, stdin=True)
        await sbx.commands.send_stdin(handle.pid, "x\n")
        await sbx.commands.close_stdin(handle.pid)
        assert (await handle.wait()).stdout == "x\n"
        handle = await sbx.commands.run("sleep 30", background=True)
        assert await sbx.commands.kill(handle.pid) is True
        with pytest.raises(CommandExitException):
            await handle.wait()
        assert await sbx.commands.kill(handle.pid) is False
    finally:
        await sbx.kill()


def test_an_unknown_user_is_refused_as_envd_does(sandbox):
    with pytest.raises(AuthenticationException) as raised:
        sandbox.commands.run("true", user="nobody-h2")
    assert "nobody-h2" in str(raised.value)
    with pytest.raises(AuthenticationException):
        sandbox.files.list("/", user="nobody-h2")
    # A user added just now is known at once.
    sandbox.commands.run("echo 'h2user:x:4242:4242::/home/h2user:/bin/sh' >> /etc/passwd")
    sandbox.commands.run("mkdir -p /home/h2user && chown 4242 /home/h2user")
    result = sandbox.commands.run("id -u; pwd", user="h2user")
    assert result.stdout == "4242\n/home/h2user\n"
    assert sandbox.files.make_dir("made-by-h2user", user="h2user") is True
    assert sandbox.files.exists("/home/h2user/made-by-h2user") is True


def _raw(sandbox, method, body, content_type="application/connect+json", headers=None):
    """Posts `body` to envd's process service of `sandbox`, as the SDK addresses it."""
    sent = {
        "Content-Type": content_type,
        "Connect-Protocol-Version": "1",
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
    }
    token = sandbox._envd_access_token
    if token:
        sent["X-Access-Token"] = token
    sent.update(headers or {})
    return httpx.post(
        f"{sandbox.envd_api_url}/process.Process/{method}", content=body, headers=sent, timeout=30
    )


def _envelopes(data):
    """The (flags, JSON) envelopes of a streamed answer."""
    out = []
    while data:
        flags, length = struct.unpack(">BI", data[:5])
        out.append((flags, json.loads(data[5 : 5 + length])))
        data = data[5 + length :]
    return out


def _envelope(flags, payload):
    return struct.pack(">BI", flags, len(payload)) + payload


def _stream_error(response):
    """The error of a streamed answer holding only its end-of-stream envelope."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/connect+json"
    envelopes = _envelopes(response.content)
    assert len(envelopes) == 1 and envelopes[0][0] == 2, envelopes
    return envelopes[0][1]["error"]


START = json.dumps({"process": {"cmd": "/bin/echo", "args": ["raw"]}}).encode()


def test_raw_start_streams_envelopes_then_the_end(sandbox):
    response = _raw(sandbox, "Start", _envelope(0, START))
    assert response.status_code == 200
    envelopes = _envelopes(response.content)
    assert all(flags == 0 for flags, _ in envelopes[:-1])
    assert envelopes[0][1]["event"]["start"]["pid"] > 0
    assert {"event": {"data": {"stdout": "cmF3Cg=="}}} in [m for _, m in envelopes]
    assert envelopes[-2][1] == {
        "event": {"end": {"exitCode": 0, "exited": True, "status": "exit status 0"}}
    }
    assert envelopes[-1] == (2, {})


def test_start_without_the_stdin_field_keeps_stdin_open_as_envd(sandbox):
    body = _envelope(0, json.dumps({"process": {"cmd": "/bin/cat"}}).encode())
    holder = {}

    def start():
        holder["response"] = _raw(sandbox, "Start", body)

    thread = threading.Thread(target=start)
    thread.start()
    pid = None
    deadline = time.monotonic() + 10
    while pid is None and time.monotonic() < deadline:
        pid = next((p.pid for p in sandbox.commands.list() if p.cmd == "/bin/cat"), None)
        time.sleep(0.1)
    assert pid is not None
    sandbox.commands.send_stdin(pid, "kept\n")
    sandbox.commands.close_stdin(pid)
    thread.join(15)
    messages = [m for _, m in _envelopes(holder["response"].content)]
    assert {"event": {"data": {"stdout": "a2VwdAo="}}} in messages
    assert messages[-2]["event"]["end"]["exitCode"] == 0


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", "invalid_argument"),
        (b"\x00\x00", "invalid_argument"),
        (_envelope(1, START), "invalid_argument"),
        (_envelope(2, START), "invalid_argument"),
        (_envelope(0x80, START), "invalid_argument"),
        (_envelope(0, b"{not json"), "invalid_argument"),
        (_envelope(0, START) + _envelope(0, START), "invalid_argument"),
        (struct.pack(">BI", 0, 1000) + b"{}", "invalid_argument"),
        (struct.pack(">BI", 0, 0xFFFFFFFF) + b"{}", "resource_exhausted"),
        (_envelope(0, b'{"process":{"cmd":""}}'), "invalid_argument"),
    ],
)
def test_malformed_envelopes_get_connect_errors(sandbox, body, code):
    error = _stream_error(_raw(sandbox, "Start", body))
    assert error["code"] == code
    assert error["message"]


def test_an_oversize_message_is_resource_exhausted(sandbox):
    big = json.dumps({"process": {"cmd": "/bin/true", "args": ["x" * (5 << 20)]}}).encode()
    error = _stream_error(_raw(sandbox, "Start", _envelope(0, big)))
    assert error["code"] == "resource_exhausted"
    unary = _raw(
        sandbox,
        "SendInput",
        json.dumps({"process": {"pid": 1}, "input": {"stdin": "A" * (5 << 20)}}).encode(),
        content_type="application/json",
    )
    assert unary.status_code == 429
    assert unary.json()["code"] == "resource_exhausted"


def test_unary_errors_have_connect_codes_and_statuses(sandbox):
    missing = _raw(
        sandbox,
        "SendSignal",
        b'{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}',
        content_type="application/json",
    )
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json()["code"] == "not_found"
    bad = _raw(sandbox, "SendSignal", b"{", content_type="application/json")
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_argument")
    unknown_signal = _raw(
        sandbox, "SendSignal", b'{"process":{"pid":1},"signal":"SIGHUP"}', "application/json"
    )
    assert (unknown_signal.status_code, unknown_signal.json()["code"]) == (400, "invalid_argument")
    wrong_type = _raw(sandbox, "List", b"{}", content_type="text/plain")
    assert wrong_type.status_code == 415
    assert wrong_type.json()["code"] == "invalid_argument"
    compressed = _raw(
        sandbox, "List", b"{}", content_type="application/json", headers={"Content-Encoding": "gzip"}
    )
    assert (compressed.status_code, compressed.json()["code"]) == (400, "invalid_argument")
    bad_timeout = _raw(
        sandbox, "List", b"{}", "application/json", headers={"Connect-Timeout-Ms": "soon"}
    )
    assert (bad_timeout.status_code, bad_timeout.json()["code"]) == (400, "invalid_argument")
    bad_version = _raw(
        sandbox, "List", b"{}", "application/json", headers={"Connect-Protocol-Version": "2"}
    )
    assert (bad_version.status_code, bad_version.json()["code"]) == (400, "invalid_argument")
    listed = _raw(sandbox, "List", b"", content_type="application/json; charset=utf-8")
    assert listed.status_code == 200
    assert "processes" in listed.json() or listed.json() == {}


def test_keepalive_events_come_after_the_interval(sandbox):
    body = _envelope(0, json.dumps({"process": {"cmd": "/bin/sleep", "args": ["2.5"]}}).encode())
    response = _raw(sandbox, "Start", body, headers={"Keepalive-Ping-Interval": "1"})
    messages = [m for _, m in _envelopes(response.content)]
    assert messages.count({"event": {"keepalive": {}}}) >= 1
    assert messages[-2]["event"]["end"]["exitCode"] == 0


def test_connect_timeout_bounds_a_connect_stream_not_the_process(sandbox):
    handle = sandbox.commands.run("sleep 5; echo survived", background=True)
    body = _envelope(0, json.dumps({"process": {"pid": handle.pid}}).encode())
    started = time.monotonic()
    response = _raw(sandbox, "Connect", body, headers={"Connect-Timeout-Ms": "1000"})
    assert time.monotonic() - started < 4
    envelopes = _envelopes(response.content)
    assert envelopes[0][1] == {"event": {"start": {"pid": handle.pid}}}
    assert envelopes[-1][1]["error"]["code"] == "deadline_exceeded"
    assert handle.wait().stdout == "survived\n"


def test_connect_with_replay_sends_the_output_so_far(sandbox):
    handle = sandbox.commands.run("echo early; sleep 3", background=True)
    time.sleep(0.5)
    body = _envelope(0, json.dumps({"process": {"pid": handle.pid}, "replay": True}).encode())
    response = _raw(sandbox, "Connect", body, headers={"Connect-Timeout-Ms": "1000"})
    messages = [m for _, m in _envelopes(response.content)]
    assert {"event": {"data": {"stdout": "ZWFybHkK"}}} in messages
    handle.kill()


def test_a_client_that_goes_away_leaves_the_command_running(sandbox):
    marker = "/tmp/h2-survivor"
    command = {"process": {"cmd": "/bin/bash", "args": ["-c", f"sleep 2; echo ok > {marker}"]}}
    headers = {
        "Content-Type": "application/connect+json",
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
    }
    if sandbox._envd_access_token:
        headers["X-Access-Token"] = sandbox._envd_access_token
    with httpx.stream(
        "POST",
        f"{sandbox.envd_api_url}/process.Process/Start",
        content=_envelope(0, json.dumps(command).encode()),
        headers=headers,
        timeout=30,
    ) as response:
        first = next(response.iter_raw())
        assert first[0] == 0
    # The connection is closed here, before the command ends.
    assert not sandbox.files.exists(marker)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not sandbox.files.exists(marker):
        time.sleep(0.3)
    assert sandbox.files.exists(marker)
