"""The E2B control plane through the official `e2b` SDK against a live `openrun serve`:
create (templates, metadata, envs, timeout, network), list (filters, paging), get_info,
set_timeout (and expiry), kill, connect, pause and resume through connect, and the errors the
SDK expects: unknown template, bad timeouts, options openrun refuses, killed sandboxes, wrong
keys and tokens.

Run: scripts/python-tests e2b -- -k lifecycle
"""

import socket
import threading
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest
from e2b import (
    AuthenticationException,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)
from e2b.exceptions import SandboxNotRunningException


def _seconds_left(info):
    return (info.end_at - datetime.now(timezone.utc)).total_seconds()


def _killed(*sandboxes):
    for sbx in sandboxes:
        try:
            sbx.kill()
        except Exception:
            pass


def test_lifecycle_create_get_info_and_envs():
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(
        template="base", timeout=180, metadata={"run": tag, "who": "lifecycle"}, envs={"FOO": "bar"}
    )
    try:
        assert sbx.is_running()
        info = sbx.get_info()
        assert info.sandbox_id == sbx.sandbox_id
        assert info.template_id == "base"
        assert info.metadata == {"run": tag, "who": "lifecycle"}
        assert info.state == SandboxState.RUNNING
        assert info.envd_version == "0.5.7"
        assert info.cpu_count >= 1 and info.memory_mb > 0
        # 60 s of margin: a loaded 2-core machine may take a while to get here.
        assert 120 < _seconds_left(info) <= 181
        assert info.started_at <= datetime.now(timezone.utc)
        # envVars are the environment of every process.
        assert sbx.commands.run("echo $FOO").stdout == "bar\n"
        # The class-method form answers the same.
        assert Sandbox.get_info(sbx.sandbox_id).metadata["run"] == tag
    finally:
        sbx.kill()


def test_lifecycle_code_interpreter_template_runs_the_host_image():
    sbx = Sandbox.create(template="code-interpreter-v1")
    try:
        assert sbx.get_info().template_id == "code-interpreter-v1"
        assert sbx.commands.run("python3 -c 'print(6 * 7)'").stdout == "42\n"
    finally:
        sbx.kill()


def test_lifecycle_list_filters_and_pages():
    tag = uuid.uuid4().hex
    first = Sandbox.create(metadata={"run": tag, "n": "1"})
    second = Sandbox.create(metadata={"run": tag, "n": "2"})
    try:
        ids = {first.sandbox_id, second.sandbox_id}
        found = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
        assert {s.sandbox_id for s in found} == ids
        assert all(s.state == SandboxState.RUNNING for s in found)
        one = Sandbox.list(query=SandboxQuery(metadata={"run": tag, "n": "2"})).next_items()
        assert [s.sandbox_id for s in one] == [second.sandbox_id]
        # Pages of one, oldest first, then newest first.
        for order, expected in (("asc", [first, second]), ("desc", [second, first])):
            pages = Sandbox.list(query=SandboxQuery(metadata={"run": tag}), limit=1, order=order)
            seen = []
            while pages.has_next:
                page = pages.next_items()
                assert len(page) <= 1
                seen += [s.sandbox_id for s in page]
            assert seen == [s.sandbox_id for s in expected], order
        paused = Sandbox.list(
            query=SandboxQuery(metadata={"run": tag}, state=[SandboxState.PAUSED])
        ).next_items()
        assert paused == []
        none = Sandbox.list(query=SandboxQuery(metadata={"run": uuid.uuid4().hex})).next_items()
        assert none == []
        template = Sandbox.list(query=SandboxQuery(metadata={"run": tag}, template="base"))
        assert {s.sandbox_id for s in template.next_items()} == ids
    finally:
        _killed(first, second)
    after = Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
    assert after == [], "killed sandboxes are not listed"


def test_lifecycle_set_timeout_moves_the_end_and_expiry_kills(sandbox, v1):
    sandbox.set_timeout(1000)
    assert 990 < _seconds_left(sandbox.get_info()) <= 1000
    Sandbox.set_timeout(sandbox.sandbox_id, 1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            sandbox.get_info()
        except SandboxNotFoundException:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the sandbox outlived its timeout")
    assert not sandbox.is_running()
    assert v1.get(f"/v1/sandboxes/{sandbox.sandbox_id}").json()["state"] == "stopped"
    # Killing it answers False, like E2B, and deletes its record.
    assert sandbox.kill() is False
    assert v1.get(f"/v1/sandboxes/{sandbox.sandbox_id}").status_code == 404


def test_lifecycle_kill_then_everything_says_it_is_gone():
    sbx = Sandbox.create()
    sbx.files.write("/tmp/x", "x")
    assert sbx.kill() is True
    assert not sbx.is_running()
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        sbx.set_timeout(60)
    assert sbx.kill() is False
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotRunningException, match="was not found"):
        sbx.files.read("/tmp/x")
    with pytest.raises(SandboxNotRunningException, match="was not found"):
        sbx.files.write("/tmp/y", "y")
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_lifecycle_connect_to_a_running_sandbox(sandbox):
    sandbox.files.write("/tmp/shared.txt", "from the first client")
    again = Sandbox.connect(sandbox.sandbox_id)
    assert again.sandbox_id == sandbox.sandbox_id
    assert again.files.read("/tmp/shared.txt") == "from the first client"
    # A longer timeout extends it; a shorter one leaves it (E2B: only ever extended).
    Sandbox.connect(sandbox.sandbox_id, timeout=900)
    assert 890 < _seconds_left(sandbox.get_info()) <= 900
    Sandbox.connect(sandbox.sandbox_id, timeout=30)
    assert _seconds_left(sandbox.get_info()) > 800


def test_lifecycle_pause_and_resume_through_connect(sandbox):
    sandbox.files.write("/tmp/state.txt", "kept")
    handle = sandbox.commands.run("sleep 600", background=True)
    assert sandbox.pause() is True
    assert sandbox.pause() is False, "a second pause: already paused (409)"
    assert sandbox.get_info().state == SandboxState.PAUSED
    assert not sandbox.is_running()
    with pytest.raises(SandboxNotRunningException, match="paused"):
        sandbox.files.read("/tmp/state.txt")
    tag_query = SandboxQuery(state=[SandboxState.PAUSED])
    assert sandbox.sandbox_id in {s.sandbox_id for s in Sandbox.list(query=tag_query).next_items()}
    resumed = Sandbox.connect(sandbox.sandbox_id, timeout=600)
    assert resumed.get_info().state == SandboxState.RUNNING
    assert 590 < _seconds_left(resumed.get_info()) <= 600
    assert resumed.is_running()
    assert resumed.files.read("/tmp/state.txt") == "kept"
    assert handle.pid in {p.pid for p in resumed.commands.list()}, "processes survive a pause"
    # The instance method resumes too.
    assert Sandbox.pause(sandbox.sandbox_id) is True
    sandbox.connect()
    assert sandbox.is_running()


def test_lifecycle_unknown_template_is_an_error_naming_it():
    name = "no-such-template-" + uuid.uuid4().hex[:8]
    with pytest.raises(SandboxException, match=f"404.*{name}.*not found") as err:
        Sandbox.create(template=name)
    assert err.value.status_code == 404


@pytest.mark.parametrize("timeout", [0, -5])
def test_lifecycle_bad_create_timeout_is_a_400(timeout):
    with pytest.raises(SandboxException, match="400.*timeout") as err:
        Sandbox.create(timeout=timeout)
    assert err.value.status_code == 400


def test_lifecycle_bad_set_timeout_is_a_400(sandbox):
    with pytest.raises(SandboxException, match="400.*timeout"):
        sandbox.set_timeout(0)
    assert sandbox.is_running()


def test_lifecycle_bad_timeouts_over_raw_http(api):
    for body in ({"templateID": "base", "timeout": 1.5}, {"templateID": "base", "timeout": "60"}):
        r = api.post("/v2/sandboxes", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == 400 and "timeout" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"timeout": 60})
    assert r.status_code == 400 and "templateID" in r.json()["message"]
    r = api.post("/v2/sandboxes", json={"templateID": "base", "bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["message"]


def test_lifecycle_options_openrun_does_not_have_are_refused_by_name():
    with pytest.raises(SandboxException, match="400.*autoPause"):
        Sandbox.create(lifecycle={"on_timeout": "pause"})
    with pytest.raises(SandboxException, match="400.*network.dnsServers"):
        Sandbox.create(network={"dns_servers": ["1.1.1.1"]})
    with pytest.raises(SandboxException, match="400.*denyOut"):
        Sandbox.create(network={"deny_out": ["8.8.8.8"]})
    # Open internet needs an operator's consent (openrun serve --allow-open-network).
    with pytest.raises(SandboxException, match="403.*open") as err:
        Sandbox.create(allow_internet_access=True)
    assert err.value.status_code == 403


def test_lifecycle_metadata_keys_are_checked():
    with pytest.raises(SandboxException, match="400.*bad key!"):
        Sandbox.create(metadata={"bad key!": "x"})
    with pytest.raises(SandboxException, match="400.*e2b.template"):
        Sandbox.create(metadata={"e2b.template": "x"})


def test_lifecycle_network_allowlist_maps_to_an_openrun_policy(v1):
    sbx = Sandbox.create(
        allow_internet_access=False,
        network={"deny_out": ["0.0.0.0/0"], "allow_out": ["example.com"]},
    )
    try:
        policy = v1.get(f"/v1/sandboxes/{sbx.sandbox_id}/network").json()
        assert policy["mode"] == "allowlist"
        assert policy["allow"] == ["example.com"]
        info = sbx.get_info()
        assert info.allow_internet_access is False
        assert info.network["allow_out"] == ["example.com"]
        assert info.network["deny_out"] == ["0.0.0.0/0"]
        # update_network replaces it the same way.
        sbx.update_network({"deny_out": ["0.0.0.0/0"], "allow_out": ["example.org", "10.1.2.0/24"]})
        policy = v1.get(f"/v1/sandboxes/{sbx.sandbox_id}/network").json()
        assert (policy["mode"], policy["allow"]) == ("allowlist", ["example.org", "10.1.2.0/24"])
        sbx.update_network({"allow_internet_access": False})
        assert v1.get(f"/v1/sandboxes/{sbx.sandbox_id}/network").json()["mode"] == "none"
        with pytest.raises(SandboxException, match="400.*denyOut"):
            sbx.update_network({"deny_out": ["8.8.8.8"]})
        with pytest.raises(SandboxException, match="403.*open"):
            sbx.update_network({"allow_internet_access": True})
        assert v1.get(f"/v1/sandboxes/{sbx.sandbox_id}/network").json()["mode"] == "none"
    finally:
        sbx.kill()
    plain = Sandbox.create()
    try:
        assert v1.get(f"/v1/sandboxes/{plain.sandbox_id}/network").json()["mode"] == "none"
        assert plain.get_info().allow_internet_access is False
    finally:
        plain.kill()


def test_lifecycle_wrong_api_key_is_an_authentication_error():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="or_not_a_key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="or_not_a_key").next_items()


def test_lifecycle_errors_have_the_e2b_shape(api, server_url):
    r = api.get("/sandboxes/doesnotexist")
    assert r.status_code == 404
    body = r.json()
    assert body["code"] == 404 and isinstance(body["message"], str)
    r = httpx.get(f"{server_url}/v2/sandboxes")
    assert r.status_code == 401 and r.json()["code"] == 401
    r = api.get("/v2/sandboxes", params={"state": "stopped"})
    assert r.status_code == 400 and "stopped" in r.json()["message"]
    # The /v1 API is not shadowed by the E2B routes, nor the other way round.
    assert httpx.get(f"{server_url}/v1/health").json() == {"status": "ok"}


def test_lifecycle_sandbox_traffic_needs_its_token(sandbox, server_url):
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983"}
    assert httpx.get(f"{server_url}/health", headers=headers).status_code == 401
    bad = httpx.get(f"{server_url}/health", headers={**headers, "X-Access-Token": "AAAA"})
    assert bad.status_code == 401 and bad.json()["code"] == 401
    good = {**headers, "X-Access-Token": sandbox._envd_access_token}
    assert httpx.get(f"{server_url}/health", headers=good).status_code == 204
    # The traffic token opens the interpreter's port only.
    traffic = {**headers, "E2B-Traffic-Access-Token": sandbox.traffic_access_token}
    assert httpx.get(f"{server_url}/health", headers=traffic).status_code == 401
    # Ports other than envd's and the interpreter's are not open (E2B's wording).
    closed = httpx.get(f"{server_url}/health", headers={**good, "E2b-Sandbox-Port": "8080"})
    assert closed.status_code == 502 and "port is not open" in closed.json()["message"]
    bad_port = httpx.get(f"{server_url}/health", headers={**good, "E2b-Sandbox-Port": "x"})
    assert bad_port.status_code == 400 and bad_port.json()["code"] == 400
    # Another sandbox's token does not open this one.
    other = Sandbox.create()
    try:
        stolen = {**headers, "X-Access-Token": other._envd_access_token}
        assert httpx.get(f"{server_url}/health", headers=stolen).status_code == 401
    finally:
        other.kill()
    sandbox.kill()
    gone = httpx.get(f"{server_url}/health", headers=good)
    assert gone.status_code == 502
    assert "was not found" in gone.json()["message"] and gone.json()["code"] == 502
    assert gone.headers["should-retry"] == "false"


@pytest.fixture()
def domain_server(start_server):
    """A second `openrun serve` with a preview domain (`sbx.test`): its URL and key."""
    server = start_server("--preview-domain", "sbx.test")
    return server.url, server.key


def test_lifecycle_hosts_of_the_preview_domain_reach_envd(domain_server):
    url, key = domain_server
    sbx = Sandbox.create(api_url=url, sandbox_url=url, api_key=key)
    info = sbx.get_info()
    assert info.sandbox_domain == "sbx.test", "create reports the domain: get_host uses it"
    assert sbx.get_host(8080) == f"8080-{sbx.sandbox_id}.sbx.test"
    sbx.files.write("/tmp/by-host.txt", "host routed")
    token = {"X-Access-Token": sbx._envd_access_token}
    envd = {"Host": f"49983-{sbx.sandbox_id}.sbx.test", **token}
    # No E2b-Sandbox-Id header: the Host names the sandbox and the port.
    assert httpx.get(f"{url}/health", headers=envd).status_code == 204
    r = httpx.get(f"{url}/files", params={"path": "/tmp/by-host.txt"}, headers=envd)
    assert r.status_code == 200 and r.content == b"host routed"
    assert httpx.get(f"{url}/health", headers={"Host": envd["Host"]}).status_code == 401
    # Other ports of the same host are previews (which want a preview token), not envd.
    other = httpx.get(f"{url}/health", headers={"Host": f"8080-{sbx.sandbox_id}.sbx.test", **token})
    assert other.status_code == 401 and "preview token" in other.text
    # The API host is the API.
    api_host = httpx.get(f"{url}/v1/health", headers={"Host": "api.sbx.test"})
    assert api_host.json() == {"status": "ok"}
    sbx.kill()
    gone = httpx.get(f"{url}/health", headers=envd)
    assert gone.status_code == 502 and "was not found" in gone.json()["message"]


def test_lifecycle_fork_copies_files_metadata_and_envs():
    tag = uuid.uuid4().hex
    parent = Sandbox.create(metadata={"run": tag}, envs={"FOO": "bar"})
    forks = []
    try:
        parent.files.write("/root/fork-me.txt", "state")
        forks = parent.fork(count=2, timeout=180)
        assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
        assert len({f.sandbox_id for f in forks} | {parent.sandbox_id}) == 3
        for child in forks:
            assert child.files.read("/root/fork-me.txt") == "state"
            assert child.commands.run("echo $FOO").stdout == "bar\n"
            info = child.get_info()
            assert info.metadata == {"run": tag}
            assert 120 < _seconds_left(info) <= 181
        # They are apart: a change in one is in no other.
        forks[0].files.write("/root/fork-me.txt", "changed")
        assert forks[1].files.read("/root/fork-me.txt") == "state"
        assert parent.files.read("/root/fork-me.txt") == "state"
        with pytest.raises(SandboxNotFoundException):
            Sandbox.fork("doesnotexist")
    finally:
        _killed(parent, *[f for f in forks if isinstance(f, Sandbox)])


def test_lifecycle_snapshot_is_a_template():
    parent = Sandbox.create()
    child = None
    try:
        parent.files.write("/opt/snapped.txt", "in the image")
        snap = parent.create_snapshot()
        assert snap.snapshot_id and snap.names == [snap.snapshot_id]
        child = Sandbox.create(template=snap.snapshot_id)
        assert child.files.read("/opt/snapped.txt") == "in the image"
        assert child.get_info().template_id == snap.snapshot_id
        with pytest.raises(SandboxException, match="400.*memory snapshot"):
            parent.create_snapshot(mode="full")
    finally:
        _killed(parent, *([child] if child else []))


def test_lifecycle_reboot_of_a_paused_sandbox_is_refused(sandbox):
    sandbox.connect(on_resume="reboot")  # running: a no-op, as in E2B
    sandbox.pause()
    with pytest.raises(SandboxException, match="400.*reboot"):
        Sandbox.connect(sandbox.sandbox_id, on_resume="reboot")
    assert sandbox.get_info().state == SandboxState.PAUSED
    Sandbox.connect(sandbox.sandbox_id)
    assert sandbox.is_running()


def test_lifecycle_what_openrun_lacks_is_a_501_naming_it(sandbox):
    with pytest.raises(SandboxException, match="501.*metrics.*not implemented") as err:
        sandbox.get_metrics()
    assert err.value.status_code == 501


async def test_lifecycle_async_sdk():
    from e2b import AsyncSandbox

    tag = uuid.uuid4().hex
    sbx = await AsyncSandbox.create(metadata={"run": tag}, timeout=120)
    try:
        assert await sbx.is_running()
        info = await sbx.get_info()
        assert info.metadata == {"run": tag} and info.state == SandboxState.RUNNING
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        await sbx.set_timeout(600)
        assert 590 < _seconds_left(await sbx.get_info()) <= 600
        assert await sbx.pause() is True
        assert not await sbx.is_running()
        again = await AsyncSandbox.connect(sbx.sandbox_id)
        assert await again.is_running()
    finally:
        assert await sbx.kill() is True
    assert not await sbx.is_running()
    assert await sbx.kill() is False


def test_lifecycle_another_tenant_sees_nothing(sandbox, make_key):
    other = make_key("other-tenant")
    sid = sandbox.sandbox_id
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sid, api_key=other)
    assert Sandbox.kill(sid, api_key=other) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sid, api_key=other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sid, 30, api_key=other)
    assert sid not in {s.sandbox_id for s in Sandbox.list(api_key=other).next_items()}
    # The owner's sandbox is untouched.
    assert sandbox.is_running()
    assert 200 < _seconds_left(sandbox.get_info()) <= 300


def test_lifecycle_creates_beyond_the_slots_and_queue_are_429(start_server):
    # One create at a time and no queue: concurrent creates are refused, not piled up. Cold
    # creates (no warm pool): a claim from the pool takes ~2 ms, so under load six threads
    # released together could each find the slot free again (seen: none refused), while a
    # cold create holds it for a fork's whole time.
    server = start_server("--max-creating", "1", "--create-queue", "0", "--warm-pool", "0")
    opts = dict(api_url=server.url, sandbox_url=server.url, api_key=server.key)
    made, refused, other = [], [], []
    barrier = threading.Barrier(6)

    def create():
        barrier.wait()
        try:
            made.append(Sandbox.create(**opts))
        except RateLimitException as e:
            refused.append(e)
        except Exception as e:  # noqa: BLE001 - reported below
            other.append(e)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    try:
        assert not other, other
        assert made, "at least one create got the slot"
        assert refused, "creates beyond the one slot and an empty queue are 429"
        assert "too many sandbox creates" in str(refused[0])
        with httpx.Client(base_url=server.url, headers={"X-API-KEY": server.key}) as api:
            r = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60})
            assert r.status_code == 201, r.text  # the slot is free again
            api.delete(f"/sandboxes/{r.json()['sandboxID']}")
            metrics = api.get("/metrics", headers={"Authorization": f"Bearer {server.key}"})
        rejected = [
            l for l in metrics.text.splitlines() if l.startswith("openrun_creates_rejected_total")
        ]
        assert rejected and float(rejected[0].split()[-1]) >= len(refused), rejected
    finally:
        _killed(*made)


def test_lifecycle_a_create_whose_client_leaves_is_finished_not_stuck(start_server):
    # Cold creates (no warm pool): the client leaves while its sandbox is being made.
    server = start_server("--warm-pool", "0")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    body = b'{"templateID": "base", "timeout": 120}'
    v1 = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"})
    api = httpx.Client(base_url=server.url, headers={"X-API-KEY": server.key})
    with v1, api:
        deadline = time.monotonic() + 60
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(
                f"POST /v2/sandboxes HTTP/1.1\r\nHost: {host}\r\nX-API-KEY: {server.key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            # The client leaves once the create has begun (its row exists). Not after a fixed
            # pause: a create still waiting for a slot when its client leaves is dropped with
            # nothing made, by design (admission), which is not what this test is about.
            while not v1.get("/v1/sandboxes").json():
                assert time.monotonic() < deadline, "the create never began"
                time.sleep(0.002)
        # The create goes on without its client and the sandbox ends up running; while it is
        # being made, the E2B list does not call it running. The E2B list is read first: a
        # sandbox it shows must not be `creating` in the rows read after it (states only move
        # forward; read the other way round, a create that finishes between the two reads
        # would look like a running sandbox listed while creating).
        while True:
            listed = api.get("/v2/sandboxes").json()
            rows = v1.get("/v1/sandboxes").json()
            states = {r["id"]: r["state"] for r in rows}
            for entry in listed:
                assert states.get(entry["sandboxID"]) != "creating", (entry, rows)
            if rows and rows[0]["state"] == "running":
                break
            assert time.monotonic() < deadline, f"the abandoned create is stuck: {rows}"
            time.sleep(0.1)
        assert [e["sandboxID"] for e in api.get("/v2/sandboxes").json()] == [rows[0]["id"]]


def test_lifecycle_pause_and_create_options_are_checked(sandbox, api):
    # A filesystem-only pause (resumed by rebooting) is not what openrun does: refused by name.
    with pytest.raises(SandboxException, match="400.*memory: false"):
        sandbox.pause(mode="filesystem")
    assert sandbox.is_running()
    # A full pause that needs a healthy guest is what openrun does.
    assert sandbox.pause(strict=True) is True
    assert sandbox.get_info().state == SandboxState.PAUSED
    Sandbox.connect(sandbox.sandbox_id)
    r = api.post(f"/sandboxes/{sandbox.sandbox_id}/pause", json={"bogus": 1})
    assert r.status_code == 400 and "bogus" in r.json()["message"]
    # secure: every sandbox is; asking for an insecure one is refused by name.
    r = api.post("/sandboxes", json={"templateID": "base", "secure": False})
    assert r.status_code == 400 and "secure=false" in r.json()["message"], r.text
    r = api.post("/sandboxes", json={"templateID": "base", "secure": True, "timeout": 60})
    assert r.status_code == 201, r.text
    assert api.delete(f"/sandboxes/{r.json()['sandboxID']}").status_code == 204


def test_lifecycle_tokens_open_only_what_they_were_made_for(sandbox, server_url, v1, domain_server):
    sid = sandbox.sandbox_id
    preview = v1.post(f"/v1/sandboxes/{sid}/ports/8080/preview", json={})
    assert preview.status_code in (200, 201), preview.text
    preview_token = preview.json()["token"]
    envd = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983"}
    # A preview token is not an access token...
    r = httpx.get(f"{server_url}/health", headers={**envd, "X-Access-Token": preview_token})
    assert r.status_code == 401, r.text
    # ...and an access token is not a preview token.
    r = httpx.get(
        f"{server_url}/v1/sandboxes/{sid}/ports/8080/",
        headers={"X-Openrun-Token": sandbox._envd_access_token},
    )
    assert r.status_code == 401, r.text
    # A token of another server (its own secret) opens nothing here: not its sandbox's id,
    # not this server's sandbox.
    url, key = domain_server
    elsewhere = Sandbox.create(api_url=url, sandbox_url=url, api_key=key)
    try:
        theirs = {
            "E2b-Sandbox-Id": elsewhere.sandbox_id,
            "X-Access-Token": elsewhere._envd_access_token,
        }
        assert httpx.get(f"{url}/health", headers=theirs).status_code == 204
        assert httpx.get(f"{server_url}/health", headers=theirs).status_code == 401
        r = httpx.get(
            f"{server_url}/health", headers={**envd, "X-Access-Token": elsewhere._envd_access_token}
        )
        assert r.status_code == 401
    finally:
        elsewhere.kill()
    # A request naming a sandbox is that sandbox's traffic whatever its path: /v1 is not
    # served there (no API answer leaks through it, with or without the API key).
    api_key = v1.headers["Authorization"]
    r = httpx.get(f"{server_url}/v1/sandboxes", headers={**envd, "Authorization": api_key})
    assert r.status_code == 401 and "access token" in r.json()["message"]
    r = httpx.get(
        f"{server_url}/v1/sandboxes",
        headers={**envd, "X-Access-Token": sandbox._envd_access_token},
    )
    assert r.status_code == 404 and r.json() == {
        "code": 404,
        "message": "no such endpoint: GET /v1/sandboxes",
    }


def test_lifecycle_sandbox_traffic_is_counted_in_the_metrics(sandbox, server_url, v1):
    def health_count():
        text = v1.get("/metrics").text
        for line in text.splitlines():
            if line.startswith("openrun_http_requests_total") and 'route="/health"' in line:
                if 'status="204"' in line:
                    return float(line.split()[-1])
        return 0.0

    before = health_count()
    headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": sandbox._envd_access_token}
    for _ in range(3):
        assert httpx.get(f"{server_url}/health", headers=headers).status_code == 204
    assert health_count() >= before + 3


def test_lifecycle_another_tenant_never_waits_on_a_sandbox_lock(sandbox, v1, make_key):
    # The owner's snapshot holds the sandbox's change lock while it copies the files; another
    # tenant's timeout change is told "not found" at once, not after the lock (a timing
    # oracle and a way to hold the owner up).
    other = make_key("lock-prober")
    assert Sandbox.list(api_key=other).next_items() == [], "the new key works and sees nothing"
    sandbox.commands.run(
        "for i in $(seq 64); do head -c 8M /dev/urandom > /root/fill.$i; done", timeout=300
    )
    done = threading.Event()

    def snapshot():
        try:
            v1.post(f"/v1/sandboxes/{sandbox.sandbox_id}/snapshot", json={}, timeout=300)
        finally:
            done.set()

    taker = threading.Thread(target=snapshot)
    taker.start()
    try:
        time.sleep(0.3)
        assert not done.is_set(), "the snapshot was too quick to hold the lock for this test"
        with pytest.raises(SandboxNotFoundException):
            Sandbox.set_timeout(sandbox.sandbox_id, 30, api_key=other)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.pause(sandbox.sandbox_id, api_key=other)
        # The core calls themselves (/v1 reaches them without the E2B surface's own lookup).
        base = str(v1.base_url)
        stranger = {"Authorization": f"Bearer {other}"}
        for path, body in (("ttl", {"ttl": "30s"}), ("pause", {}), ("resume", {})):
            r = httpx.post(
                f"{base}/v1/sandboxes/{sandbox.sandbox_id}/{path}",
                json=body,
                headers=stranger,
                timeout=120,
            )
            assert r.status_code == 404, (path, r.text)
        assert not done.is_set(), "the other tenant's calls waited for the owner's lock"
    finally:
        taker.join(timeout=300)
