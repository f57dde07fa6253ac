"""Typed exceptions: what the server refuses arrives as the class of its code."""

from __future__ import annotations

import builtins
import re
from pathlib import Path
from typing import Type

import httpx
import pytest

import openrun
from openrun import Sandbox
from openrun._ops import raise_for_error
from openrun.errors import CODES

ERROR_RS = Path(__file__).resolve().parents[3] / "crates" / "openrun-server" / "src" / "error.rs"


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
    transport.client = httpx.Client(
        base_url="http://127.0.0.1:9",
        headers=transport.client.headers,
        transport=httpx.MockTransport(handler),
    )
    assert transport.call(get("abc")).id == "abc"
    assert seen == ["Bearer or_k"] * 3
    answers[:] = [429] * (MAX_RETRIES + 1)
    with pytest.raises(openrun.RateLimitedError) as caught:
        transport.call(get("abc"))
    assert caught.value.retry_after == 0.0 and not answers
