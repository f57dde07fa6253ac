"""Files: round trips (text, binary, large), listing, stat, moves, removal, directories."""

from __future__ import annotations

import hashlib
import os

import pytest

import openrun
from openrun import Sandbox

BINARY = bytes(range(256)) * 4 + b"\xff\xfe\x00not utf-8\x80"


def test_text_and_binary_round_trip(sbx: Sandbox) -> None:
    sbx.files.write("/root/hello.txt", "héllo wörld\n")
    assert sbx.files.read_text("/root/hello.txt") == "héllo wörld\n"
    assert sbx.files.read("/root/hello.txt") == "héllo wörld\n".encode()
    sbx.files.write("/root/blob.bin", BINARY)
    assert sbx.files.read("/root/blob.bin") == BINARY
    # What the sandbox sees is the same bytes.
    digest = sbx.run(["sha256sum", "/root/blob.bin"]).stdout.split()[0]
    assert digest == hashlib.sha256(BINARY).hexdigest()
    assert sbx.files.read("/root/blob.bin", offset=256, limit=4) == bytes(range(4))


def test_write_makes_parents_and_sets_the_mode(sbx: Sandbox) -> None:
    sbx.files.write("/root/a/b/c/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    info = sbx.files.stat("/root/a/b/c/run.sh")
    assert info.is_file and info.mode & 0o777 == 0o755 and info.size == 19
    assert info.name == "run.sh" and info.path == "/root/a/b/c/run.sh"
    assert sbx.run("/root/a/b/c/run.sh").stdout == "ran\n"
    with pytest.raises(openrun.NotFoundError):
        sbx.files.write("/root/nope/x.txt", "x", parents=False)


def test_missing_file_raises_not_found(sbx: Sandbox) -> None:
    with pytest.raises(openrun.NotFoundError) as caught:
        sbx.files.read("/root/does-not-exist")
    assert caught.value.status == 404
    assert "/root/does-not-exist" in caught.value.message
    assert not sbx.files.exists("/root/does-not-exist")
    with pytest.raises(openrun.NotFoundError):
        sbx.files.stat("/root/does-not-exist")


def test_list_stat_mkdir_move_remove(sbx: Sandbox) -> None:
    sbx.files.mkdir("/root/d/e")
    sbx.files.write("/root/d/one.txt", "1")
    sbx.files.write("/root/d/two.txt", "22")
    entries = {e.name: e for e in sbx.files.list("/root/d")}
    assert set(entries) == {"e", "one.txt", "two.txt"}
    assert entries["e"].is_dir and entries["e"].path == "/root/d/e"
    assert entries["two.txt"].size == 2
    assert sbx.files.exists("/root/d/e")
    sbx.files.move("/root/d/one.txt", "/root/d/e/uno.txt")
    assert not sbx.files.exists("/root/d/one.txt")
    assert sbx.files.read_text("/root/d/e/uno.txt") == "1"
    with pytest.raises(openrun.DirectoryNotEmptyError) as caught:
        sbx.files.remove("/root/d")
    assert caught.value.status == 409
    sbx.files.remove("/root/d/two.txt")
    sbx.files.remove("/root/d", recursive=True)
    assert not sbx.files.exists("/root/d")


def test_a_directory_is_not_a_file(sbx: Sandbox) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        sbx.files.read("/root")
    assert caught.value.code == "is_a_directory"
    sbx.files.write("/root/plain", "x")
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        sbx.files.list("/root/plain")
    assert caught.value.code == "not_a_directory"


def test_upload_and_download_a_directory(sbx: Sandbox, tmp_path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_text("top\n")
    (src / "sub" / "data.bin").write_bytes(BINARY)
    (src / "sub" / "deeper" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(src / "sub" / "deeper" / "tool.sh", 0o755)
    result = sbx.files.upload_dir(str(src), "/root/proj")
    assert result.files == 3
    assert result.bytes == len("top\n") + len(BINARY) + len("#!/bin/sh\necho tool\n")
    assert sbx.run("/root/proj/sub/deeper/tool.sh").stdout == "tool\n"
    sbx.run("echo made-inside > /root/proj/sub/new.txt", check=True)

    dst = tmp_path / "dst"
    sbx.files.download_dir("/root/proj", str(dst))
    assert (dst / "top.txt").read_text() == "top\n"
    assert (dst / "sub" / "data.bin").read_bytes() == BINARY
    assert (dst / "sub" / "new.txt").read_text() == "made-inside\n"
    assert os.stat(dst / "sub" / "deeper" / "tool.sh").st_mode & 0o777 == 0o755


def test_a_file_over_16_mib_goes_through(sbx: Sandbox) -> None:
    data = os.urandom(1024) * (17 * 1024)  # 17 MiB
    sbx.files.write("/root/big/blob", data)
    assert sbx.files.stat("/root/big/blob").size == len(data)
    digest = sbx.run(["sha256sum", "/root/big/blob"]).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    assert sbx.files.read("/root/big/blob", offset=len(data) - 10) == data[-10:]


def test_watch_reports_changes_and_ends_with_the_directory(sbx: Sandbox) -> None:
    sbx.files.mkdir("/root/w/sub")
    # The writer keeps making files until it is stopped, so the first change arrives whenever
    # the watch is in place: no assumption about when that is.
    writer = sbx.start("i=0; while true; do i=$((i+1)); echo x > /root/w/sub/f$i; sleep 0.05; done")
    seen = []
    for change in sbx.files.watch("/root/w", recursive=True):
        seen.append(change)
        if len(seen) == 1:
            # The writer stops before the directory goes (a file it makes meanwhile would
            # make the recursive removal fail with directory_not_empty).
            writer.kill()
            assert writer.wait(timeout=30).signal == 9
            sbx.files.remove("/root/w", recursive=True)
    # The loop ended by itself: the watched directory was removed.
    first = seen[0]
    assert first.name.startswith("sub/f") and first.kind in ("create", "write")
    assert first.path == "/root/w/" + first.name
    assert any(c.kind == "remove" for c in seen)


def test_watch_refuses_what_is_not_a_directory(sbx: Sandbox) -> None:
    with pytest.raises(openrun.NotFoundError):
        next(iter(sbx.files.watch("/root/no-such-dir")))
    sbx.files.write("/root/file", "x")
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        next(iter(sbx.files.watch("/root/file")))
    assert caught.value.code == "not_a_directory"


def test_upload_a_directory_with_hard_links(sbx: Sandbox, tmp_path) -> None:
    # tarfile writes a second name of an inode as a hard-link entry, which the server refuses:
    # each name goes as a file of its own.
    src = tmp_path / "linked"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("shared\n")
    os.link(src / "a.txt", src / "sub" / "b.txt")
    os.link(src / "a.txt", src / "c.txt")
    result = sbx.files.upload_dir(str(src), "/root/linked")
    assert result.files == 3
    for name in ("a.txt", "sub/b.txt", "c.txt"):
        assert sbx.files.read_text(f"/root/linked/{name}") == "shared\n"
        assert sbx.files.stat(f"/root/linked/{name}").is_file


def test_a_large_write_keeps_the_mode_and_honours_parents(sbx: Sandbox) -> None:
    data = b"\x01" * (17 << 20)
    sbx.files.write("/root/tool.bin", "small", mode=0o751)
    # Over 16 MiB (the tar path), without mode: the existing file keeps its mode, as a
    # plain write keeps it.
    sbx.files.write("/root/tool.bin", data)
    info = sbx.files.stat("/root/tool.bin")
    assert (info.size, info.mode & 0o7777) == (len(data), 0o751)
    sbx.files.write("/root/tool.bin", data, mode=0o600)
    assert sbx.files.stat("/root/tool.bin").mode & 0o7777 == 0o600
    sbx.files.write("/root/fresh.bin", data)
    assert sbx.files.stat("/root/fresh.bin").mode & 0o7777 == 0o644
    # parents=False: a missing directory is an error, as for a small write, and nothing is made.
    with pytest.raises(openrun.NotFoundError) as caught:
        sbx.files.write("/root/no-dir/big.bin", data, parents=False)
    assert "/root/no-dir" in caught.value.message
    assert not sbx.files.exists("/root/no-dir")
    sbx.files.mkdir("/root/big-dir")
    sbx.files.write("/root/big-dir/big.bin", data, parents=False)
    assert sbx.files.stat("/root/big-dir/big.bin").size == len(data)


def test_writes_over_the_tar_limit_are_refused_before_sending(
    sbx: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openrun._ops as ops

    # The server extracts at most 256 MiB of tar; the limit is lowered here so the test does
    # not hold 256 MiB: the client refuses what the server would cut off mid-upload.
    monkeypatch.setattr(ops, "MAX_TAR_UPLOAD", 17 << 20)
    with pytest.raises(openrun.TooLargeError) as caught:
        sbx.files.write("/root/huge.bin", b"x" * (17 << 20))
    assert "MiB" in caught.value.message
    assert not sbx.files.exists("/root/huge.bin")
