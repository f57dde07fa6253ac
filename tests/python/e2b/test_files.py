"""envd's plain-HTTP files (GET and POST /files) through the official `e2b` SDK against a live
`openrun serve`: text and bytes, relative paths (the user's home), parents made, overwrite,
several files in one request, streams (octet-stream), gzip both ways, a missing file, files
larger than one 16 MiB agent frame, and the raw wire shapes.

Run: scripts/python-tests e2b -- -k files
"""

import gzip
import hashlib
import io
import json
import os
import socket
import time
import zlib

import httpx
import pytest
from e2b import FileNotFoundException, InvalidArgumentException, Sandbox
from e2b.sandbox.filesystem.filesystem import WriteEntry


def _envd(sandbox, server_url):
    """A raw client of the sandbox's envd, with the SDK's headers."""
    return httpx.Client(
        base_url=server_url,
        headers={
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sandbox._envd_access_token,
        },
        timeout=120,
    )


def test_files_write_and_read_text_and_bytes(sandbox):
    info = sandbox.files.write("/tmp/hello.txt", "héllo\n")
    assert info.path == "/tmp/hello.txt" and info.name == "hello.txt"
    assert sandbox.files.read("/tmp/hello.txt") == "héllo\n"
    data = bytes(range(256)) * 3
    sandbox.files.write("/tmp/bin.dat", data)
    assert bytes(sandbox.files.read("/tmp/bin.dat", format="bytes")) == data
    streamed = b"".join(sandbox.files.read("/tmp/bin.dat", format="stream"))
    assert streamed == data
    # Overwrite replaces the whole file.
    sandbox.files.write("/tmp/hello.txt", "x")
    assert sandbox.files.read("/tmp/hello.txt") == "x"
    assert sandbox.commands.run("cat /tmp/hello.txt").stdout == "x"


def test_files_parents_are_made_and_relative_paths_are_from_home(sandbox):
    sandbox.files.write("/tmp/a/b/c/deep.txt", "deep")
    assert sandbox.files.read("/tmp/a/b/c/deep.txt") == "deep"
    info = sandbox.files.write("notes/rel.txt", "relative")
    # The run-as user is root (the image's), whose home is /root.
    assert info.path == "/root/notes/rel.txt"
    assert sandbox.files.read("/root/notes/rel.txt") == "relative"
    assert sandbox.files.read("notes/rel.txt") == "relative"
    assert sandbox.commands.run("cat ~/notes/rel.txt").stdout == "relative"


def test_files_missing_file_is_file_not_found(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/tmp/does-not-exist")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("no/such/relative/file")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/tmp")  # a directory


def test_files_write_several_files_in_one_request(sandbox):
    infos = sandbox.files.write_files(
        [
            WriteEntry(path="/tmp/multi/one.txt", data="1"),
            WriteEntry(path="/tmp/multi/two.bin", data=b"\x00\x02"),
            WriteEntry(path="multi/three.txt", data="3"),
        ]
    )
    assert [i.path for i in infos] == [
        "/tmp/multi/one.txt",
        "/tmp/multi/two.bin",
        "/root/multi/three.txt",
    ]
    assert sandbox.files.read("/tmp/multi/one.txt") == "1"
    assert bytes(sandbox.files.read("/tmp/multi/two.bin", format="bytes")) == b"\x00\x02"
    assert sandbox.files.read("/root/multi/three.txt") == "3"


def test_files_streams_and_gzip(sandbox):
    # A file-like object goes as application/octet-stream (envd >= 0.5.7).
    sandbox.files.write("/tmp/stream.txt", io.BytesIO(b"streamed body"))
    assert sandbox.files.read("/tmp/stream.txt") == "streamed body"
    sandbox.files.write("/tmp/gz.txt", "compressed " * 1000, gzip=True)
    assert sandbox.files.read("/tmp/gz.txt") == "compressed " * 1000
    assert sandbox.files.read("/tmp/gz.txt", gzip=True) == "compressed " * 1000


def test_files_larger_than_one_agent_frame_round_trip(sandbox):
    data = os.urandom(20 << 20) + b"end"
    digest = hashlib.sha256(data).hexdigest()
    sandbox.files.write("/tmp/big.bin", data)
    check = sandbox.commands.run("sha256sum /tmp/big.bin; ls -a /tmp")
    assert check.stdout.startswith(digest)
    assert "openrun-upload" not in check.stdout, "no temporary file is left"
    back = bytes(sandbox.files.read("/tmp/big.bin", format="bytes"))
    assert len(back) == len(data) and hashlib.sha256(back).hexdigest() == digest
    gz = bytes(sandbox.files.read("/tmp/big.bin", format="bytes", gzip=True))
    assert hashlib.sha256(gz).hexdigest() == digest
    # Replacing a big file with a big stream keeps it whole too.
    sandbox.files.write("/tmp/big.bin", io.BytesIO(data[::-1]))
    assert sandbox.commands.run("sha256sum /tmp/big.bin").stdout.startswith(
        hashlib.sha256(data[::-1]).hexdigest()
    )


def test_files_raw_wire_shapes(sandbox, server_url):
    with _envd(sandbox, server_url) as envd:
        # Multipart: the raw filename is the destination (absolute, not sanitised).
        r = envd.post("/files", files=[("file", ("/tmp/raw/a.txt", b"A"))])
        assert r.status_code == 200, r.text
        assert r.json() == [{"name": "a.txt", "path": "/tmp/raw/a.txt", "type": "file"}]
        r = envd.get("/files", params={"path": "/tmp/raw/a.txt"})
        assert r.status_code == 200 and r.content == b"A"
        assert r.headers["content-type"] == "application/octet-stream"
        # Octet-stream with a gzip body.
        r = envd.post(
            "/files",
            params={"path": "/tmp/raw/b.txt"},
            content=gzip.compress(b"B" * 100),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 200 and r.json()[0]["path"] == "/tmp/raw/b.txt"
        assert envd.get("/files", params={"path": "/tmp/raw/b.txt"}).content == b"B" * 100
        # Errors: {code: int, message}.
        r = envd.get("/files", params={"path": "/tmp/raw/missing"})
        assert r.status_code == 404 and r.json()["code"] == 404
        r = envd.post("/files", content=b"x", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 400 and "path" in r.json()["message"]
        r = envd.post(
            "/files",
            params={"path": "/tmp/raw/c.txt"},
            content=b"not gzip",
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
        assert r.status_code == 400 and "gzip" in r.json()["message"]
        assert sandbox.commands.run("ls /tmp/raw").stdout.split() == ["a.txt", "b.txt"]
        r = envd.get("/no-such-envd-path")
        assert r.status_code == 404 and r.json()["code"] == 404


def test_files_an_upload_announced_too_large_is_413(sandbox, server_url):
    host, port = server_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /files?path=/tmp/huge.bin HTTP/1.1\r\nHost: {host}\r\n"
        f"E2b-Sandbox-Id: {sandbox.sandbox_id}\r\nE2b-Sandbox-Port: 49983\r\n"
        f"X-Access-Token: {sandbox._envd_access_token}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {2 << 30}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode() + b"x" * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status, answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == 413 and "larger than" in body["message"]
    assert not sandbox.files.exists("/tmp/huge.bin")


async def test_files_async_sdk():
    from e2b import AsyncSandbox

    sbx = await AsyncSandbox.create()
    try:
        await sbx.files.write("async/a.txt", "from async")
        assert await sbx.files.read("/root/async/a.txt") == "from async"
        data = os.urandom(17 << 20)
        await sbx.files.write("/root/async/big.bin", data)
        assert bytes(await sbx.files.read("/root/async/big.bin", format="bytes")) == data
        with pytest.raises(FileNotFoundException):
            await sbx.files.read("/root/async/missing")
    finally:
        await sbx.kill()


def _raw_post(url, sandbox, path, head_extra, body_parts, close_early=False):
    """POSTs /files?path= over a raw socket, sending `body_parts` (ignoring a connection the
    server closed meanwhile); `close_early`: hang up after the parts. The status line and
    body of the answer, or None."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /files?path={path} HTTP/1.1\r\nHost: {host}\r\n"
        f"E2b-Sandbox-Id: {sandbox.sandbox_id}\r\nE2b-Sandbox-Port: 49983\r\n"
        f"X-Access-Token: {sandbox._envd_access_token}\r\n"
        "Content-Type: application/octet-stream\r\n" + head_extra + "\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=300) as conn:
        try:
            conn.sendall(head.encode())
            for part in body_parts:
                conn.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if close_early:
            return None
        answer = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
        except ConnectionResetError:
            pass
    status, _, rest = answer.partition(b"\r\n")
    return status, rest.split(b"\r\n\r\n", 1)[-1]


def _chunked(parts):
    for part in parts:
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield b"0\r\n\r\n"


def _no_temporary_file(sandbox, directory="/tmp"):
    """Waits (a removal may run after the answer) until no upload temporary file is left."""
    for _ in range(100):
        listing = sandbox.commands.run(f"ls -a {directory}").stdout
        if "openrun-upload" not in listing:
            return
        time.sleep(0.1)
    raise AssertionError(f"a temporary file is left: {listing}")


def test_files_a_gzip_bomb_is_413_without_the_memory(start_server):
    server = start_server()
    sbx = Sandbox.create(api_url=server.url, sandbox_url=server.url, api_key=server.key)
    try:
        sbx.files.write("/tmp/bomb.txt", "old")
        # A little over 1 GiB of zeros in about 1 MB of gzip.
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)
        zeros = bytes(1 << 20)
        bomb = b"".join(packer.compress(zeros) for _ in range(1024 + 16)) + packer.flush()
        assert len(bomb) < 2 << 20
        answer = _raw_post(
            server.url,
            sbx,
            "/tmp/bomb.txt",
            f"Content-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n",
            [bomb],
        )
        assert answer and b" 413 " in answer[0], answer
        assert json.loads(answer[1])["code"] == 413
        assert sbx.files.read("/tmp/bomb.txt") == "old"
        _no_temporary_file(sbx)
        # Decoded a few MiB at a time, never a whole body frame at once.
        assert server.peak_rss_kib() < 300 << 10, server.peak_rss_kib()
    finally:
        sbx.kill()


def test_files_a_truncated_gzip_body_is_400_and_writes_nothing(sandbox, server_url):
    cut = gzip.compress(b"some text " * 1000)[:-6]
    with _envd(sandbox, server_url) as envd:
        r = envd.post(
            "/files",
            params={"path": "/tmp/cut.txt"},
            content=cut,
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )
    assert r.status_code == 400 and "gzip" in r.json()["message"], r.text
    assert not sandbox.files.exists("/tmp/cut.txt")
    _no_temporary_file(sandbox)


def test_files_a_large_upload_keeps_the_mode_of_the_file_it_replaces(sandbox):
    sandbox.files.write("/tmp/keep.bin", "small")
    sandbox.commands.run("chmod 751 /tmp/keep.bin")
    data = os.urandom(17 << 20)
    sandbox.files.write("/tmp/keep.bin", data)
    assert sandbox.commands.run("stat -c %a /tmp/keep.bin").stdout.strip() == "751"
    assert sandbox.files.get_info("/tmp/keep.bin").size == len(data)
    # A small one (one agent write) keeps it too; a new file gets the default.
    sandbox.files.write("/tmp/keep.bin", "small again")
    assert sandbox.commands.run("stat -c %a /tmp/keep.bin").stdout.strip() == "751"
    sandbox.files.write("/tmp/new.bin", data)
    assert sandbox.commands.run("stat -c %a /tmp/new.bin").stdout.strip() == "644"


def test_files_an_upload_cut_mid_body_keeps_the_old_file(sandbox, server_url):
    sandbox.files.write("/tmp/cut-mid.bin", "old")
    # 40 MiB announced, 20 MiB sent (more than one agent write: a temporary file exists),
    # then the client hangs up.
    part = os.urandom(1 << 20)
    _raw_post(
        server_url,
        sandbox,
        "/tmp/cut-mid.bin",
        f"Content-Length: {40 << 20}\r\n",
        [part] * 20,
        close_early=True,
    )
    _no_temporary_file(sandbox)
    assert sandbox.files.read("/tmp/cut-mid.bin") == "old"


def test_files_a_chunked_upload_too_large_keeps_the_old_file(sandbox, server_url):
    sandbox.files.write("/tmp/too-big.bin", "old")
    part = bytes(4 << 20)
    answer = _raw_post(
        server_url,
        sandbox,
        "/tmp/too-big.bin",
        "Transfer-Encoding: chunked\r\n",
        _chunked([part] * (256 + 2)),
    )
    assert answer and b" 413 " in answer[0], answer
    assert sandbox.files.read("/tmp/too-big.bin") == "old"
    _no_temporary_file(sandbox)


def test_files_a_stalled_upload_is_cut_off_and_keeps_the_old_file(sandbox, server_url):
    sandbox.files.write("/tmp/stalled.bin", "old")
    host, port = server_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /files?path=/tmp/stalled.bin HTTP/1.1\r\nHost: {host}\r\n"
        f"E2b-Sandbox-Id: {sandbox.sandbox_id}\r\nE2b-Sandbox-Port: 49983\r\n"
        f"X-Access-Token: {sandbox._envd_access_token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {40 << 20}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=180) as conn:
        # More than one agent write (a temporary file exists), then nothing: the server cuts
        # the upload off after 60 s without data.
        conn.sendall(head.encode() + os.urandom(20 << 20))
        started = time.monotonic()
        answer = b""
        while not (b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}")):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - started
    assert b" 400 " in answer.split(b"\r\n", 1)[0], answer
    assert b"stalled" in answer
    assert 50 < waited < 150, waited
    assert sandbox.files.read("/tmp/stalled.bin") == "old"
    _no_temporary_file(sandbox)
