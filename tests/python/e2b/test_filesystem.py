"""envd's filesystem service (filesystem.Filesystem/* but watchers) through the official e2b
SDK: `files.list` (depth 1 and 2), `exists`, `get_info`, `make_dir`, `rename`, `remove`, and
relative paths; plus a malformed request sent by hand."""

import datetime

import httpx
import pytest
from e2b import AsyncSandbox, FileType, InvalidArgumentException, NotFoundException


@pytest.fixture
def tree(sandbox):
    """/tmp/h2fs with a/b/deep.txt, a/one.txt (5 bytes), top.txt and a symlink to a."""
    sandbox.commands.run(
        "rm -rf /tmp/h2fs && mkdir -p /tmp/h2fs/a/b && printf hello > /tmp/h2fs/a/one.txt"
        " && echo deep > /tmp/h2fs/a/b/deep.txt && touch /tmp/h2fs/top.txt"
        " && ln -s a /tmp/h2fs/link && chmod 750 /tmp/h2fs/a"
    )
    return "/tmp/h2fs"


def test_list_depth_1_gives_the_entries_of_the_dir(sandbox, tree):
    entries = {e.name: e for e in sandbox.files.list(tree)}
    assert set(entries) == {"a", "top.txt", "link"}
    assert entries["a"].type == FileType.DIR
    assert entries["a"].path == f"{tree}/a"
    assert entries["top.txt"].type == FileType.FILE
    assert entries["link"].type == FileType.SYMLINK
    assert entries["link"].symlink_target == f"{tree}/a"


def test_list_depth_2_descends_one_more_level(sandbox, tree):
    paths = {e.path for e in sandbox.files.list(tree, depth=2)}
    assert paths == {
        f"{tree}/a",
        f"{tree}/top.txt",
        f"{tree}/link",
        f"{tree}/a/b",
        f"{tree}/a/one.txt",
    }
    deeper = {e.path for e in sandbox.files.list(tree, depth=3)}
    assert f"{tree}/a/b/deep.txt" in deeper


def test_list_of_a_missing_dir_or_a_file_fails(sandbox, tree):
    with pytest.raises(NotFoundException):
        sandbox.files.list(f"{tree}/nope")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list(f"{tree}/top.txt")


def test_exists(sandbox, tree):
    assert sandbox.files.exists(f"{tree}/a/one.txt") is True
    assert sandbox.files.exists(f"{tree}/a") is True
    assert sandbox.files.exists(f"{tree}/missing") is False


def test_get_info_of_a_file_and_a_dir(sandbox, tree):
    info = sandbox.files.get_info(f"{tree}/a/one.txt")
    assert info.name == "one.txt"
    assert info.type == FileType.FILE
    assert info.path == f"{tree}/a/one.txt"
    assert info.size == 5
    assert info.mode & 0o777 == 0o644
    assert info.permissions == "-rw-r--r--"
    assert info.owner == "root" and info.group == "root"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert abs((now - info.modified_time).total_seconds()) < 120
    directory = sandbox.files.get_info(f"{tree}/a")
    assert directory.type == FileType.DIR
    # As envd: the permission bits in `mode`, the type letter in `permissions`.
    assert directory.mode == 0o750
    assert directory.permissions == "drwxr-x---"
    link = sandbox.files.get_info(f"{tree}/link")
    assert link.type == FileType.SYMLINK
    assert link.symlink_target == f"{tree}/a"
    assert link.permissions.startswith("L")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info(f"{tree}/missing")


def test_make_dir_is_true_then_false(sandbox, tree):
    assert sandbox.files.make_dir(f"{tree}/new/nested/dir") is True
    assert sandbox.files.get_info(f"{tree}/new/nested/dir").type == FileType.DIR
    assert sandbox.files.make_dir(f"{tree}/new/nested/dir") is False
    assert sandbox.files.make_dir(f"{tree}/new") is False
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir(f"{tree}/top.txt")


def test_rename_moves_and_answers_the_new_entry(sandbox, tree):
    info = sandbox.files.rename(f"{tree}/top.txt", f"{tree}/a/moved.txt")
    assert info.path == f"{tree}/a/moved.txt"
    assert info.name == "moved.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.exists(f"{tree}/top.txt") is False
    assert sandbox.files.exists(f"{tree}/a/moved.txt") is True
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{tree}/top.txt", f"{tree}/again.txt")
    assert sandbox.files.exists(f"{tree}/again.txt") is False
    # As envd, the destination's missing parents are made.
    info = sandbox.files.rename(f"{tree}/a/one.txt", f"{tree}/new/dir/one.txt")
    assert (info.path, info.size) == (f"{tree}/new/dir/one.txt", 5)
    with pytest.raises(NotFoundException):
        sandbox.files.rename(f"{tree}/a/one.txt", f"{tree}/other/one.txt")
    assert sandbox.files.exists(f"{tree}/other") is False


def test_remove_a_file_and_a_whole_dir(sandbox, tree):
    sandbox.files.remove(f"{tree}/top.txt")
    assert sandbox.files.exists(f"{tree}/top.txt") is False
    sandbox.files.remove(f"{tree}/a")
    assert sandbox.files.exists(f"{tree}/a") is False
    assert sandbox.files.exists(f"{tree}/link") is True
    # As envd (os.RemoveAll): nothing there is nothing to do.
    sandbox.files.remove(f"{tree}/a")


def test_relative_paths_are_taken_from_the_users_home(sandbox):
    assert sandbox.files.make_dir("h2-relative/inner", user="root") is True
    try:
        info = sandbox.files.get_info("/root/h2-relative/inner")
        assert info.type == FileType.DIR
        assert sandbox.files.exists("h2-relative", user="root") is True
        assert [e.path for e in sandbox.files.list("h2-relative", user="root")] == [
            "/root/h2-relative/inner"
        ]
        assert sandbox.files.get_info("~/h2-relative", user="root").path == "/root/h2-relative"
    finally:
        sandbox.files.remove("/root/h2-relative")


async def test_the_async_sdk_uses_the_same_service():
    sbx = await AsyncSandbox.create(template="base")
    try:
        assert await sbx.files.make_dir("/tmp/h2-async/d") is True
        assert await sbx.files.make_dir("/tmp/h2-async/d") is False
        assert [e.name for e in await sbx.files.list("/tmp/h2-async")] == ["d"]
        assert await sbx.files.exists("/tmp/h2-async/nope") is False
        info = await sbx.files.rename("/tmp/h2-async/d", "/tmp/h2-async/e")
        assert (info.path, info.type) == ("/tmp/h2-async/e", FileType.DIR)
        await sbx.files.remove("/tmp/h2-async")
        assert await sbx.files.exists("/tmp/h2-async") is False
    finally:
        await sbx.kill()


def _unary(sandbox, extra=None):
    """Headers of a unary call to `sandbox`'s envd, and the filesystem service's URL."""
    headers = {
        "Content-Type": "application/json",
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
    }
    if sandbox._envd_access_token:
        headers["X-Access-Token"] = sandbox._envd_access_token
    headers.update(extra or {})
    return headers, f"{sandbox.envd_api_url}/filesystem.Filesystem"


def test_malformed_unary_requests_get_connect_errors(sandbox):
    headers, url = _unary(sandbox)
    bad_json = httpx.post(f"{url}/Stat", content=b'{"path":', headers=headers, timeout=30)
    assert (bad_json.status_code, bad_json.json()["code"]) == (400, "invalid_argument")
    no_path = httpx.post(f"{url}/Stat", content=b"{}", headers=headers, timeout=30)
    assert (no_path.status_code, no_path.json()["code"]) == (400, "invalid_argument")
    bad_depth = httpx.post(
        f"{url}/ListDir", content=b'{"path":"/","depth":-1}', headers=headers, timeout=30
    )
    assert (bad_depth.status_code, bad_depth.json()["code"]) == (400, "invalid_argument")
    snake = httpx.post(
        f"{url}/Stat", content=b'{"path":"/tmp","unknown_field":1}', headers=headers, timeout=30
    )
    assert snake.status_code == 200
    entry = snake.json()["entry"]
    assert entry["type"] == "FILE_TYPE_DIRECTORY"
    assert isinstance(entry["size"], str)
    assert entry["modifiedTime"].endswith("Z")


def test_a_unary_call_ends_at_its_connect_timeout(sandbox):
    """Connect-Timeout-Ms bounds a unary call: a deep listing of /usr is cut off with
    deadline_exceeded (504) instead of running on."""
    headers, url = _unary(sandbox, {"Connect-Timeout-Ms": "150"})
    started = datetime.datetime.now()
    answer = httpx.post(
        f"{url}/ListDir", content=b'{"path":"/usr","depth":40}', headers=headers, timeout=60
    )
    elapsed = (datetime.datetime.now() - started).total_seconds()
    assert (answer.status_code, answer.json()["code"]) == (504, "deadline_exceeded"), answer.text
    assert elapsed < 5
    # The sandbox serves the next call as usual.
    headers, url = _unary(sandbox)
    ok = httpx.post(f"{url}/Stat", content=b'{"path":"/usr"}', headers=headers, timeout=30)
    assert ok.status_code == 200


def test_a_listing_beyond_its_memory_budget_is_resource_exhausted(sandbox):
    """Entries with long paths are counted by their bytes (64 MiB), not their number: ~25,000
    entries of ~3 KiB paths are refused with a clear resource_exhausted."""
    script = (
        "import os\n"
        "d = '/tmp/h2big/' + '/'.join(c * 250 for c in 'abcdefghi')\n"
        "for k in range(10):\n"
        "    sub = f'{d}/{k}'\n"
        "    os.makedirs(sub)\n"
        "    for i in range(2500):\n"
        "        os.close(os.open(f'{sub}/{i:05}' + 'x' * 240, os.O_CREAT | os.O_WRONLY))\n"
    )
    sandbox.files.write("/tmp/h2big.py", script)
    sandbox.commands.run("rm -rf /tmp/h2big; python3 /tmp/h2big.py", timeout=120)
    try:
        headers, url = _unary(sandbox)
        answer = httpx.post(
            f"{url}/ListDir",
            content=b'{"path":"/tmp/h2big","depth":12}',
            headers=headers,
            timeout=120,
        )
        assert answer.status_code == 429, answer.text[:300]
        error = answer.json()
        assert error["code"] == "resource_exhausted"
        assert "larger than 64 MiB" in error["message"]
        # A listing within the budget still works.
        small = sandbox.files.list("/tmp/h2big", depth=3)
        assert [e.name for e in small][:1] == ["a" * 250]
    finally:
        sandbox.commands.run("rm -rf /tmp/h2big /tmp/h2big.py", timeout=120)
