"""The other two ways in: `POST /v1/up` read line by line as a client of the API would (the wire
contract of docs/up.md: a plan line first, step and output lines, a result line last), and the
MCP tool `up` (Streamable HTTP, the bearer key) on a git URL."""

import base64
import io
import json
import tarfile

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def tar_of(root) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".")
    return buf.getvalue()


def post_up(client, root, name, identity):
    """POST /v1/up with `root` as a tar; the NDJSON lines, parsed."""
    with client.v1.stream(
        "POST",
        "/v1/up",
        params={"name": name, "repo": identity},
        content=tar_of(root),
        headers={"Content-Type": "application/x-tar"},
        timeout=900,
    ) as res:
        assert res.status_code == 200, res.read()
        lines = [json.loads(line) for line in res.iter_lines() if line.strip()]
    for line in lines:
        if line.get("type") == "result" and line["result"].get("sandbox_id"):
            client.made.add(line["result"]["sandbox_id"])
    return lines


@pytest.mark.timeout(900)
def test_rest_stream_follows_the_contract(client, repo):
    root = repo("ruby")
    lines = post_up(client, root, "ruby-api", "test:ruby-api")
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "plan", kinds
    assert kinds[-1] == "result", lines[-1]
    assert set(kinds) <= {"plan", "step", "output", "result"}, kinds
    assert "ruby" in lines[0]["plan"]["languages"]

    steps = [line for line in lines if line["type"] == "step"]
    names = [s["step"] for s in steps]
    for name in ("copy", "install", "check"):
        assert name in names, names
    for s in steps:
        assert s["status"] in {"running", "ok", "failed", "rolled_back", "cached"}, s
    # Each step that ran says so before it ends; the check ended ok.
    check = [s for s in steps if s["step"] == "check"]
    assert check[0]["status"] == "running" and check[-1]["status"] == "ok", check
    assert isinstance(check[-1].get("duration_ms"), int), check

    # Output lines carry the commands' bytes: the check's minitest summary.
    out = b"".join(
        base64.b64decode(line["data_b64"]) for line in lines if line["type"] == "output" and line["step"] == "check"
    )
    assert b"1 runs, 1 assertions, 0 failures" in out, out[-2000:]

    result = lines[-1]["result"]
    assert result["cached"] is False
    assert result["check"]["passed"] is True
    assert result["workspace"] == "/workspaces/ruby-api"
    client.delete(result["sandbox_id"])

    # The same identity and tree again: from the recipe.
    again = post_up(client, root, "ruby-api", "test:ruby-api")
    assert again[-1]["type"] == "result", again[-1]
    result = again[-1]["result"]
    assert result["cached"] is True and result["check"]["passed"] is True, result
    client.delete(result["sandbox_id"])


@pytest.mark.timeout(900)
def test_recipes_belong_to_their_tenant(client, repo, server_url, make_key):
    """Another tenant cannot list, delete or start from a tenant's recipe, and the same tree
    under the same identity sets up again for it instead of opening the first one's recipe."""
    root = repo("ruby")
    mine = post_up(client, root, "ruby-tenancy", "test:ruby-tenancy")[-1]
    assert mine["type"] == "result", mine
    key = mine["result"]["recipe"]["key"]
    client.delete(mine["result"]["sandbox_id"])
    recipes = {r["key"]: r for r in client.v1.get("/v1/recipes").json()}
    assert key in recipes, recipes
    image = recipes[key]["image"]

    other = httpx.Client(
        base_url=server_url,
        headers={"Authorization": "Bearer " + make_key("up-other-tenant")},
        timeout=60,
        trust_env=False,
    )
    try:
        assert other.get("/v1/recipes").json() == []
        assert other.delete(f"/v1/recipes/{key}").status_code == 404
        made = other.post("/v1/sandboxes", json={"image": image, "ttl": "2m"})
        assert made.status_code == 400 and image in made.text, made.text
        # The same tree and identity: its own setup, not the first tenant's recipe.
        with other.stream(
            "POST",
            "/v1/up",
            params={"name": "ruby-tenancy", "repo": "test:ruby-tenancy", "no_check": "true"},
            content=tar_of(root),
            headers={"Content-Type": "application/x-tar"},
            timeout=900,
        ) as res:
            assert res.status_code == 200, res.read()
            lines = [json.loads(line) for line in res.iter_lines() if line.strip()]
        theirs = lines[-1]
        assert theirs["type"] == "result", theirs
        assert theirs["result"]["cached"] is False, theirs
        other.delete("/v1/sandboxes/" + theirs["result"]["sandbox_id"])
    finally:
        other.close()
    # The first tenant's recipe is untouched.
    assert key in {r["key"] for r in client.v1.get("/v1/recipes").json()}


@pytest.mark.timeout(900)
async def test_mcp_tool_up(client, server_url, api_key, git_url_for):
    url = git_url_for("smart")
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {api_key}"})
    async with Client(
        streamable_http_client(f"{server_url}/mcp", http_client=http), mode="legacy", read_timeout_seconds=900
    ) as mcp:
        result = await mcp.call_tool("up", {"git": url, "name": "ruby-mcp"})
        text = "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")
        out = result.structured_content or {}
        if out.get("sandbox_id"):
            client.made.add(out["sandbox_id"])
        assert not result.is_error, text
        assert out.get("sandbox_id"), (text, out)
        assert out["check"]["passed"] is True, (text, out)
        assert out["workspace"] == "/workspaces/ruby-mcp", out
        assert out["sandbox_id"] in text, text
        assert client.sandbox(out["sandbox_id"])["state"] == "running"
        client.delete(out["sandbox_id"])
