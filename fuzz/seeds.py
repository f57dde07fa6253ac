#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*).

Seeds are small, meaningful inputs: real agent frames, small layer tars with links,
whiteouts, long names and escape attempts, OCI layouts and docker save archives in the
oci_manifest input format, and the Dockerfiles of the project's tests. Run from the
repository root: python3 fuzz/seeds.py (needs the zstd command for the zstd seeds).
"""

import gzip
import io
import json
import os
import re
import struct
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- frame_decode: a shape byte, then frames ------------------------------------------

def frame(header, data=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<II", len(h), len(data)) + h + data


def req(i, request, data=b""):
    return frame({"id": i, "request": request}, data)


requests = [
    req(1, {"op": "hello", "version": 1}),
    req(2, {"op": "exec", "argv": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/tmp",
            "user": "1000:1000", "stdin": True, "pty": {"rows": 24, "cols": 80},
            "timeout_ms": 5000, "attach": True, "tag": "build"}, b"input\n"),
    req(3, {"op": "exec", "argv": ["true"]}),
    req(4, {"op": "attach", "pid": 7, "stdout_since": 10, "stderr_since": 0, "follow": True}),
    req(5, {"op": "detach", "pid": 7}),
    req(6, {"op": "signal", "pid": 7, "signal": 15, "group": True}),
    req(7, {"op": "stdin", "pid": 7, "eof": True}, b"bytes\x00\xff"),
    req(8, {"op": "resize", "pid": 7, "size": {"rows": 50, "cols": 132}}),
    req(9, {"op": "list_processes"}),
    req(10, {"op": "process_status", "pid": 7}),
    req(11, {"op": "release", "pid": 7}),
    req(12, {"op": "read_file", "path": "/etc/hosts", "offset": 5, "limit": 100}),
    req(13, {"op": "write_file", "path": "/tmp/x", "mode": 420, "parents": True, "append": False},
        b"contents"),
    req(14, {"op": "list_dir", "path": "/"}),
    req(15, {"op": "stat", "path": "/bin/sh"}),
    req(16, {"op": "mkdir", "path": "/a/b", "parents": True, "mode": 493}),
    req(17, {"op": "remove", "path": "/a", "recursive": True}),
    req(18, {"op": "rename", "from": "/a", "to": "/b"}),
    req(19, {"op": "info"}),
    req(20, {"op": "set_lifetime", "remaining_ms": 60000}),
    req(21, {"op": "set_lifetime", "remaining_ms": None}),
    req(22, {"op": "connect_port", "port": 8080}),
    req(23, {"op": "relay_egress", "port": 3128}),
    req(24, {"op": "take_connection", "conn": 1}),
    req(18446744073709551615, {"op": "shutdown"}),
    req(25, {"op": "watch", "path": "/home/user", "recursive": True}),
    req(26, {"op": "unwatch", "watch": 3}),
]

proc = {"pid": 7, "argv": ["sleep", "1"], "cwd": "/", "uid": 0, "pty": False, "tag": None,
        "started_at_ms": 1700000000000, "state": "running", "stdout_len": 3, "stderr_len": 0}
exited = dict(proc, state="exited",
              status={"code": None, "signal": 9, "core_dumped": False, "timed_out": True,
                      "oom_killed": False})
stat = {"name": "/x", "file_type": "symlink", "size": 1, "mode": 511, "uid": 0, "gid": 0,
        "modified_ms": -5, "symlink_target": "y"}
info = {"version": 1, "sandbox_id": "sb-1", "uptime_ms": 12, "running": 2}


def resp(i, result, data=b""):
    return frame({"type": "response", "id": i, "result": result}, data)


messages = [
    resp(1, {"Ok": dict({"kind": "hello"}, **info)}),
    resp(2, {"Ok": {"kind": "started", "pid": 7}}),
    resp(3, {"Ok": {"kind": "attached", "process": proc, "dropped": 0}}),
    resp(4, {"Ok": {"kind": "processes", "processes": [proc, exited]}}),
    resp(5, {"Ok": dict({"kind": "process"}, **exited)}),
    resp(6, {"Ok": {"kind": "file_data", "size": 8, "offset": 0}}, b"contents"),
    resp(7, {"Ok": {"kind": "entries", "entries": [stat, dict(stat, file_type="dir")]}}),
    resp(8, {"Ok": dict({"kind": "stat"}, **stat)}),
    resp(9, {"Ok": {"kind": "done"}}),
    resp(10, {"Ok": dict({"kind": "info"}, **info)}),
    resp(11, {"Err": {"code": "not_found", "message": "no such file /x"}}),
    resp(12, {"Err": {"code": "connection_refused", "message": "nothing listens on 8080"}}),
    frame({"type": "output", "pid": 7, "stream": "stdout", "offset": 0}, b"hello\n"),
    frame({"type": "output", "pid": 7, "stream": "stderr", "offset": 6}, b"\x1b[31merr"),
    frame({"type": "exit", "pid": 7, "status": {"code": 0, "signal": None}}),
    frame({"type": "incoming", "conn": 3}),
    resp(13, {"Ok": {"kind": "watching", "watch": 3}}),
    frame({"type": "file_event", "watch": 3, "name": "sub/a.txt", "kind": "create"}),
    frame({"type": "file_event", "watch": 3, "name": "", "kind": "overflow"}),
    frame({"type": "watch_ended", "watch": 3, "reason": "the watched directory was removed"}),
]

for shape in (0, 5, 255):
    write("frame_decode", f"requests-{shape}", bytes([shape]) + b"".join(requests))
    write("frame_decode", f"messages-{shape}", bytes([shape]) + b"".join(messages))
for i, r in enumerate(requests):
    write("frame_decode", f"request-{i}", bytes([i]) + r)
for i, m in enumerate(messages):
    write("frame_decode", f"message-{i}", bytes([i + 100]) + m)
write("frame_decode", "torn-prefix", b"\x01" + requests[0] + requests[1][:5])
write("frame_decode", "torn-body", b"\x02" + requests[1][:-3])
write("frame_decode", "too-large", b"\x03" + struct.pack("<II", 1 << 20 | 1, 0))
pretty = b'{ "request" : {"op": "read_file", "path": "/\\u00e9t\\u00e9"}, "id": 1e0 }'
write("frame_decode", "pretty-json", b"\x04" + struct.pack("<II", len(pretty), 0) + pretty)


# --- tar_unpack: layer blobs ------------------------------------------------------------

def tar_bytes(entries, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.mtime = e.get("mtime", 1600000000)
            info.linkname = e.get("link", "")
            info.devmajor = e.get("major", 0)
            info.devminor = e.get("minor", 0)
            data = e.get("data", b"")
            if info.type == tarfile.REGTYPE:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(info)
    return buf.getvalue()


D, L, H, F = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE
basic = tar_bytes([
    {"name": "./", "type": D, "mode": 0o755},
    {"name": "bin/", "type": D, "mode": 0o755},
    {"name": "bin/busybox", "mode": 0o755, "data": b"\x7fELF busybox"},
    {"name": "bin/sh", "type": L, "link": "busybox"},
    {"name": "bin/ls", "type": H, "link": "bin/busybox"},
    {"name": "bin/su", "mode": 0o4755, "data": b"su"},
    {"name": "home/alice/notes", "uid": 1000, "gid": 1000, "mode": 0o600, "data": b"hi"},
    {"name": "run/pipe", "type": F, "mode": 0o620},
    {"name": "tmp/", "type": D, "mode": 0o1777},
    {"name": "etc/abs-link", "type": L, "link": "/etc/passwd"},
])
write("tar_unpack", "basic", basic)
write("tar_unpack", "basic-gzip", gzip.compress(basic, mtime=0))
zst = subprocess.run(["zstd", "-q", "-c", "-3"], input=basic, capture_output=True, check=True).stdout
write("tar_unpack", "basic-zstd", zst)
# Two zstd frames around a skippable one.
half = len(basic) // 1024 * 512
z1 = subprocess.run(["zstd", "-q", "-c"], input=basic[:half], capture_output=True, check=True).stdout
z2 = subprocess.run(["zstd", "-q", "-c"], input=basic[half:], capture_output=True, check=True).stdout
write("tar_unpack", "zstd-frames", z1 + bytes([0x50, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 1, 2, 3]) + z2)
write("tar_unpack", "whiteouts", tar_bytes([
    {"name": "dir/", "type": D, "mode": 0o755},
    {"name": "dir/.wh..wh..opq", "data": b""},
    {"name": "dir/kept", "data": b"k"},
    {"name": ".wh.gone", "data": b""},
    {"name": "both", "data": b"a"},
    {"name": ".wh.both", "data": b""},
    {"name": ".wh..wh.plnk", "type": D},
    {"name": "again/", "type": D},
    {"name": ".wh.again", "data": b""},
    {"name": "again/x", "data": b"x"},
]))
long = "d" * 90 + "/" + "e" * 120 + "/" + "f" * 200
write("tar_unpack", "long-names-gnu", tar_bytes([
    {"name": long, "data": b"deep"},
    {"name": "l" * 150, "type": L, "link": "t" * 300},
    {"name": "h" * 120, "type": H, "link": long},
]))
write("tar_unpack", "long-names-pax", tar_bytes([
    {"name": long, "data": b"deep", "uid": 3_000_000, "gid": 70_000},
    {"name": "p" * 150, "type": L, "link": "t" * 300},
], fmt=tarfile.PAX_FORMAT))
escapes = [
    [{"name": "../sentinel/evil", "data": b"x"}],
    [{"name": "/abs", "data": b"x"}],
    [{"name": "up", "type": L, "link": "../sentinel"}, {"name": "up/evil", "data": b"x"}],
    [{"name": "hard", "type": H, "link": "../sentinel/file"}],
    [{"name": "dl", "type": L, "link": "../sentinel/dir"}, {"name": "h2", "type": H, "link": "dl/inner"}],
    [{"name": "a/b/../../../sentinel/x", "data": b"x"}],
    [{"name": "d/", "type": D}, {"name": "d/l", "type": L, "link": "/"}, {"name": "d/l/etc/x", "data": b"x"}],
    [{"name": "w", "type": L, "link": ".."}, {"name": "w/.wh.sentinel", "data": b""}],
    [{"name": "o", "type": L, "link": "../sentinel/dir"}, {"name": "o/.wh..wh..opq", "data": b""}],
]
for i, rows in enumerate(escapes):
    write("tar_unpack", f"escape-{i}", tar_bytes(rows))
write("tar_unpack", "escape-via-link-dir", tar_bytes([
    {"name": "x", "type": L, "link": "../sentinel"},
    {"name": "x/", "type": D},
    {"name": "x/y", "data": b"y"},
]))
write("tar_unpack", "devices", tar_bytes([
    {"name": "null", "type": tarfile.CHRTYPE, "major": 1, "minor": 3},
    {"name": "sda", "type": tarfile.BLKTYPE, "major": 8, "minor": 0},
    {"name": "wh", "type": tarfile.CHRTYPE},
]))
write("tar_unpack", "replacements", tar_bytes([
    {"name": "a/inner", "data": b"x"},
    {"name": "a", "data": b"now a file"},
    {"name": "a/", "type": D},
    {"name": "b", "type": L, "link": "a"},
    {"name": "b", "data": b"two"},
    {"name": "c/", "type": D, "mode": 0},
    {"name": "c/d", "type": H, "link": "b"},
    {"name": "b", "type": H, "link": "c/d"},
]))
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                  pax_headers={"comment": "global"}) as t:
    info = tarfile.TarInfo("f")
    info.size = 1
    info.pax_headers = {"uid": "70000", "gid": "80000", "mtime": "1.5"}
    t.addfile(info, io.BytesIO(b"f"))
write("tar_unpack", "global-pax", buf.getvalue())


# --- oci_manifest: 'o'/'d' documents or a raw archive -------------------------------------

layer_text = b"not really a tar, never unpacked by this target"
config = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"], "Entrypoint": None,
                     "WorkingDir": "/app", "User": "1000:1000", "Labels": {"a": "b"}},
          "rootfs": {"type": "layers", "diff_ids": ["@d3@"]}}
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "@d2@", "size": "@s2@"},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": "@d3@", "size": "@s3@"}]}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": "@d1@", "size": "@s1@",
                        "platform": {"os": "linux", "architecture": "amd64"}}]}


def doc(v):
    # Sizes are numbers: the placeholders go in unquoted.
    return re.sub(rb'"(@s\d+@)"', rb"\1", json.dumps(v).encode())


write("oci_manifest", "oci", b"o" + b"\0".join([doc(index), doc(manifest), doc(config), layer_text]))
nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
          "manifests": [
              {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "@d2@",
               "size": "@s2@", "platform": {"os": "linux", "architecture": "arm64"}},
              {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
               "digest": "@d2@", "size": "@s2@",
               "platform": {"os": "linux", "architecture": "amd64"}},
              {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "@d2@",
               "size": "@s2@", "platform": {"os": "unknown", "architecture": "unknown"}}]}
top = {"schemaVersion": 2, "manifests": [
    {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "@d1@", "size": "@s1@"}]}
m2 = dict(manifest)
m2["config"] = {"mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "@d3@", "size": "@s3@"}
m2["layers"] = [{"mediaType": t, "digest": "@d4@", "size": "@s4@"} for t in (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip")]
m2["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
c2 = json.loads(json.dumps(config))
c2["rootfs"]["diff_ids"] = ["@d4@"] * 3
write("oci_manifest", "oci-nested", b"o" + b"\0".join(
    [doc(top), doc(nested), doc(m2), doc(c2), layer_text]))
dmanifest = [{"Config": "@h1@.json", "RepoTags": ["demo:latest"],
              "Layers": ["blobs/sha256/@h2@", "layer/../blobs/sha256/@h2@"]}]
dconfig = json.loads(json.dumps(config))
dconfig["rootfs"]["diff_ids"] = ["@d2@", "@d2@"]
write("oci_manifest", "docker", b"d" + b"\0".join([doc(dmanifest), doc(dconfig), layer_text]))

# A real docker save archive (new layout: blobs plus a symlinked layer.tar), raw.
layer_tar = tar_bytes([{"name": "hello", "data": b"world"}])
import hashlib  # noqa: E402
lhex = hashlib.sha256(layer_tar).hexdigest()
rconfig = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"]},
                      "rootfs": {"type": "layers", "diff_ids": ["sha256:" + lhex]}}).encode()
chex = hashlib.sha256(rconfig).hexdigest()
rmanifest = json.dumps([{"Config": "blobs/sha256/" + chex, "RepoTags": ["hello:latest"],
                         "Layers": ["abc/layer.tar"]}]).encode()
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    for name, data in [("blobs/sha256/" + lhex, layer_tar), ("blobs/sha256/" + chex, rconfig),
                       ("manifest.json", rmanifest)]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo("abc/layer.tar")
    info.type = tarfile.SYMTYPE
    info.linkname = "../blobs/sha256/" + lhex
    t.addfile(info)
    info = tarfile.TarInfo("loop")
    info.type = tarfile.SYMTYPE
    info.linkname = "loop"
    t.addfile(info)
write("oci_manifest", "docker-save-raw", b"r" + buf.getvalue())


# --- dockerfile_parse: the Dockerfiles of the tests ---------------------------------------

def rust_strings(path):
    text = open(path, encoding="utf-8").read()
    out = [m.group(1) for m in re.finditer(r'r#"(.*?)"#', text, re.S)]
    for m in re.finditer(r'"((?:[^"\\\n]|\\.)*)"', text):
        s = m.group(1)
        if re.match(r"(#|FROM|from|RUN|ARG)", s) and "\\n" in s:
            out.append(s.encode().decode("unicode_escape"))
    return out


seen = set()
n = 0
for path in ["crates/openrun-image/src/dockerfile/tests.rs", "crates/openrun/tests/builds.rs"]:
    for s in rust_strings(os.path.join(ROOT, path)):
        if s in seen:
            continue
        seen.add(s)
        write("dockerfile_parse", f"test-{n:02}", s)
        n += 1
write("dockerfile_parse", "escape-backtick",
      "# escape=`\r\nFROM scratch\r\nRUN echo `\r\n  a b\r\nCOPY [\"C:\\\\x\", \"/y\"]\r\n")
write("dockerfile_parse", "substitutions",
      "ARG A=1\nFROM x${A:-y}:${B:+t}\nENV P=\"${A:?need A}\" Q='${lit}' R=\\$S\n"
      "LABEL \"k v\"=\"${A-${B-${C}}}\"\nWORKDIR ${HOME}/w\nUSER ${U:-0}:0\n"
      "EXPOSE 80/tcp 443\nMAINTAINER a 'b' \"c\"\nSHELL [\"/bin/bash\", \"-euo\", \"pipefail\", \"-c\"]\n"
      "CMD exec \"$@\"\nENTRYPOINT [\"/init\"]\nADD --chown=1:2 --chmod=0755 --link a*.tar /opt/\n")
