"""Typed exceptions: what the server refuses arrives as the class of its code."""

from __future__ import annotations

import builtins
import math
import re
from pathlib import Path
from typing import Type

import httpx
import pytest

import openrun
from openrun import Sandbox
from openrun._ops import exec_event, raise_for_error
from openrun.errors import CODES

CRATES = Path(__file__).resolve().parents[3] / "crates"
ERROR_RS = CRATES / "openrun-server" / "src" / "error.rs"
MESSAGE_RS = CRATES / "openrun-protocol" / "src" / "message.rs"
SERVER_SRC = CRATES / "openrun-server" / "src"


def test_bad_memory_value_is_invalid_argument(client_args: dict) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        Sandbox.create(memory="lots", **client_args)
    err = caught.value
    assert (err.status, err.code) == (400, "invalid_argument")
    assert "lots" in err.message
    assert isinstance(err, ValueError)


def test_unknown_image_and_bad_ttl_are_invalid(client_args: dict) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        Sandbox.create(image="no-such-image-sdk", **client_args)
    assert "no-such-image-sdk" in caught.value.message
    with pytest.raises(openrun.InvalidArgumentError):
        Sandbox.create(ttl="forever", **client_args)


def test_unknown_sandbox_is_not_found(client_args: dict) -> None:
    with pytest.raises(openrun.SandboxNotFoundError) as caught:
        Sandbox.connect("0123456789ab", **client_args)
    assert isinstance(caught.value, openrun.NotFoundError)
    assert caught.value.status == 404


def test_bad_key_is_an_authentication_error(server_url: str) -> None:
    with pytest.raises(openrun.AuthenticationError) as caught:
        Sandbox.create(server=server_url, api_key="or_not_a_key")
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    with pytest.raises(openrun.AuthenticationError):
        Sandbox.list(server=server_url, api_key="or_not_a_key")


def test_a_killed_sandbox_refuses_work(client_args: dict) -> None:
    sandbox = Sandbox.create(**client_args)
    try:
        sandbox.files.write("/root/x", "x")
        assert sandbox.kill()
        for action in (
            lambda: sandbox.run("true"),
            lambda: sandbox.files.read("/root/x"),
            lambda: sandbox.start("sleep 1"),
            lambda: sandbox.info(),
        ):
            with pytest.raises((openrun.NotFoundError, openrun.SandboxNotRunningError)):
                action()
        # Its timeline stays readable, ending with the delete.
        assert [e.kind for e in sandbox.events()][-1] == "sandbox.delete"
    finally:
        sandbox.kill()
        sandbox.close()


def test_bad_command_timeout_is_invalid(sbx: Sandbox) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        sbx.run("true", timeout=0)
    assert "timeout" in caught.value.message or "0ms" in caught.value.message
    with pytest.raises(openrun.InvalidArgumentError):
        sbx.run([])


def test_open_network_needs_the_operator(client_args: dict) -> None:
    # scripts/python-tests starts the server without --allow-open-network.
    with pytest.raises(openrun.OpenNetworkDisabledError) as caught:
        Sandbox.create(network="open", **client_args)
    assert caught.value.status == 403
    assert isinstance(caught.value, openrun.PermissionDeniedError)


def test_a_cidr_with_host_bits_is_an_invalid_policy(sbx: Sandbox) -> None:
    with pytest.raises(openrun.InvalidNetworkPolicyError):
        sbx.network.set({"mode": "allowlist", "allow": ["10.0.0.1/8"]})


def test_unreachable_server_is_a_connection_error() -> None:
    with pytest.raises(openrun.ConnectionError) as caught:
        Sandbox.create(server="http://127.0.0.1:1", api_key="or_x")
    assert isinstance(caught.value, builtins.ConnectionError)
    assert caught.value.code == "connection_error"


def test_every_server_code_has_a_class() -> None:
    source = ERROR_RS.read_text()
    codes = set(re.findall(r'StatusCode::[A-Z_]+,\s*"([a-z_]+)"', source))
    assert {"not_found", "sandbox_paused", "too_many_requests", "port_closed"} <= codes
    assert codes <= set(CODES), f"codes without a class: {codes - set(CODES)}"


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_every_agent_error_code_has_a_class() -> None:
    # A stream's `error` line carries the agent's own code when the agent refused the command
    # (exec.rs serializes `AgentError.code`): every variant of the protocol's ErrorCode.
    source = MESSAGE_RS.read_text()
    body = re.search(r"pub enum ErrorCode \{(.*?)\n\}", source, re.S)
    assert body is not None, "ErrorCode not found in message.rs"
    variants = re.findall(r"^\s*([A-Z][A-Za-z]+),", body.group(1), re.M)
    codes = {_snake(v) for v in variants}
    assert {"permission_denied", "outside_sandbox", "connection_refused", "version_mismatch"} <= codes
    assert codes <= set(CODES), f"agent codes without a class: {codes - set(CODES)}"


def test_every_stream_code_of_the_server_has_a_class() -> None:
    # Codes the server writes itself into streams: `.fail("code", ..)` of exec.rs and
    # `Line::Error { code: "code".into(), .. }` (the e2b and mcp surfaces are not this API's).
    codes = set()
    for path in SERVER_SRC.rglob("*.rs"):
        if {"e2b", "mcp"} & set(path.relative_to(SERVER_SRC).parts):
            continue
        text = path.read_text()
        codes |= set(re.findall(r'\.fail\(\s*"([a-z_]+)"', text))
        codes |= set(re.findall(r'\bcode:\s*"([a-z_]+)"', text))
    assert {"agent_lost", "agent_failed"} <= codes
    assert codes <= set(CODES), f"stream codes without a class: {codes - set(CODES)}"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("agent_lost", openrun.SandboxLostError),
        ("permission_denied", openrun.PermissionDeniedError),
        ("outside_sandbox", openrun.PermissionDeniedError),
        ("agent_failed", openrun.ServerError),
        ("version_mismatch", openrun.ServerError),
        ("connection_refused", openrun.PortClosedError),
        ("no_such_process", openrun.ProcessNotFoundError),
    ],
)
def test_stream_error_lines_map_to_classes(code: str, cls: Type[openrun.OpenrunError]) -> None:
    with pytest.raises(cls) as caught:
        exec_event({"type": "error", "code": code, "message": "m"})
    assert type(caught.value) is cls and caught.value.code == code


def test_a_sandbox_killed_mid_run_is_not_running(client_args: dict) -> None:
    # The docs promise that (NotFoundError, SandboxNotRunningError) covers a sandbox killed
    # before or during a call: killed while the command runs, the stream ends with agent_lost.
    sandbox = Sandbox.create(**client_args)
    try:
        with pytest.raises(openrun.SandboxLostError) as caught:
            sandbox.run("echo up; sleep 60", on_stdout=lambda _: sandbox.kill())
        assert isinstance(caught.value, openrun.SandboxNotRunningError)
        assert caught.value.code == "agent_lost"
        other = Sandbox.create(**client_args)
        try:
            proc = other.start("echo up; sleep 60")
            with pytest.raises((openrun.NotFoundError, openrun.SandboxNotRunningError)):
                proc.wait(timeout=60, on_stdout=lambda _: other.kill())
        finally:
            other.kill()
            other.close()
    finally:
        sandbox.kill()
        sandbox.close()


def test_a_closed_handle_raises_a_typed_error(client_args: dict) -> None:
    sandbox = Sandbox.create(**client_args)
    sandbox_id = sandbox.id
    sandbox.close()
    for action in (
        lambda: sandbox.run("true"),
        lambda: sandbox.files.read("/etc/hostname"),
        lambda: sandbox.info(),
        lambda: list(sandbox.exec("true")),
    ):
        with pytest.raises(openrun.ClientClosedError) as caught:
            action()
        assert sandbox_id in caught.value.message
    again = Sandbox.connect(sandbox_id, **client_args)
    assert again.kill()
    again.close()


@pytest.mark.parametrize(
    "action",
    [
        lambda s: s.run(None),
        lambda s: s.run(123),
        lambda s: s.run([b"echo"]),
        lambda s: s.files.write("/root/x", "x", mode="755"),
        lambda s: s.files.write("/root/x", "x", mode=0o17777),
        lambda s: s.files.write("/root/x", 5),
        lambda s: s.files.read("/etc/hostname", offset="a"),
        lambda s: s.files.read("/etc/hostname", limit=-1),
        lambda s: s.set_ttl(math.nan),
        lambda s: s.set_ttl(math.inf),
        lambda s: s.set_ttl(-5),
        lambda s: s.process(1).kill("NOT-A-SIGNAL"),
        lambda s: s.process(1).kill(1.5),
        lambda s: s.process("x").status(),
        lambda s: s.preview("eighty"),
        lambda s: s.fork("2"),
        lambda s: s.start("cat", stdin=123),
        lambda s: s.run("cat", stdin=123),
        lambda s: s.run("cat", stdin=["a"]),
    ],
)
def test_bad_arguments_are_invalid_argument_errors(sbx: Sandbox, action) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        action(sbx)
    assert caught.value.status is None, "refused before anything was sent"
    # Nothing was started by a refused start.
    assert not [p for p in sbx.processes() if p.argv[-1:] == ["cat"]]


def test_signal_names_are_accepted(sbx: Sandbox) -> None:
    proc = sbx.start(["sleep", "300"])
    proc.kill("TERM")
    assert proc.wait(timeout=30).signal == 15
    proc = sbx.start(["sleep", "300"])
    proc.kill("sigint")
    assert proc.wait(timeout=30).signal == 2


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (
            429,
            {"code": "too_many_requests", "message": "busy"},
            openrun.RateLimitedError,
            "too_many_requests",
        ),
        (
            409,
            {"code": "sandbox_not_running", "message": "gone"},
            openrun.SandboxNotRunningError,
            "sandbox_not_running",
        ),
        (413, {"code": "body_too_large", "message": "big"}, openrun.TooLargeError, "body_too_large"),
        (503, {"code": "something_new", "message": "later"}, openrun.ServerError, "something_new"),
        (409, {"code": "brand_new_conflict", "message": "?"}, openrun.ConflictError, "brand_new_conflict"),
    ],
)
def test_answers_map_to_classes(status: int, body: dict, cls: Type[openrun.OpenrunError], code: str) -> None:
    response = httpx.Response(status, json=body, headers={"retry-after": "3"})
    with pytest.raises(cls) as caught:
        raise_for_error(response)
    err = caught.value
    assert type(err) is cls
    assert err.code == code and err.status == status
    assert err.message == body["message"]
    if isinstance(err, openrun.RateLimitedError):
        assert err.retry_after == 3.0


def test_an_answer_that_is_not_json_keeps_its_status() -> None:
    with pytest.raises(openrun.ServerError) as caught:
        raise_for_error(httpx.Response(502, text="upstream broke"))
    assert caught.value.status == 502 and "upstream broke" in caught.value.message


def test_check_raises_command_error_with_the_result() -> None:
    result = openrun.CommandResult(exit_code=None, stdout="", stderr="", signal=9)
    with pytest.raises(openrun.CommandError) as caught:
        result.check()
    assert "signal 9" in str(caught.value)
    assert caught.value.result is result


def test_a_429_is_retried_after_its_retry_after() -> None:
    # The server refuses with 429 before doing anything, so the client may send it again.
    # (The live server cannot be made to refuse on demand: a stand-in answers here.)
    from openrun._config import Target
    from openrun._ops import get
    from openrun._transport import MAX_RETRIES, SyncTransport

    answers = [429, 429, 200]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        status = answers.pop(0)
        if status == 429:
            return httpx.Response(
                429, json={"code": "too_many_requests", "message": "full"}, headers={"retry-after": "0"}
            )
        return httpx.Response(200, json={"id": "abc", "state": "running"})

    transport = SyncTransport(Target("http://127.0.0.1:9", "or_k"))
    transport.client.close()  # replaced by the stand-in, which is closed at the end
    transport.client = httpx.Client(
        base_url="http://127.0.0.1:9",
        headers=transport.client.headers,
        transport=httpx.MockTransport(handler),
    )
    try:
        assert transport.call(get("abc")).id == "abc"
        assert seen == ["Bearer or_k"] * 3
        answers[:] = [429] * (MAX_RETRIES + 1)
        with pytest.raises(openrun.RateLimitedError) as caught:
            transport.call(get("abc"))
        assert caught.value.retry_after == 0.0 and not answers
    finally:
        transport.close()
    assert transport.client.is_closed
