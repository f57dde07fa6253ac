"""Times snapshots and forks through a running `openrun serve`, and writes its BENCHMARKS.md
section.

    python3 bench/snapshot.py measure BIN DATA_DIR URL KEY OUT.json [RUNS]
    python3 bench/snapshot.py report OUT.json          # the markdown section, on stdout

`measure` imports a small busybox image (an OCI layout this script writes) into the server's
data dir, then, RUNS times each (default 3):
- snapshot of a sandbox that wrote 1 MB, 100 MB and 1 GB of new data (random bytes, so no
  layer is shared between runs): the client's wall time, the server's `duration_ms` and the
  time the sandbox was frozen (`paused_ms`);
- fork of 1, 10 and 100 sandboxes from a sandbox with 100 MB changed: one POST .../fork,
  snapshot included, until every fork runs.
Images and layers made are removed after each run (`openrun image rm`, `image prune`).
"""
import hashlib
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse

CHANGES_MB = [1, 100, 1024]
FORKS = [1, 10, 100]
FORK_CHANGE_MB = 100


def busybox_layout(dest):
    """An OCI layout of one layer: /bin/busybox with sh, dd, rm; /work."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ["bin", "work", "etc", "tmp"]:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        with open("/bin/busybox", "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in ["sh", "dd", "rm", "sync", "true"]:
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    blobs = os.path.join(dest, "blobs", "sha256")
    os.makedirs(blobs)

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + digest, "size": len(data)}

    layer_bytes = layer.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer_bytes)}],
    }).encode()
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest)}]}
    with open(os.path.join(dest, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(dest, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


class Api:
    def __init__(self, url, key):
        parsed = urllib.parse.urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)
        self.headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}

    def call(self, method, path, body=None, expect=200):
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=self.headers)
        res = self.conn.getresponse()
        answer = res.read()
        if res.status != expect:
            raise SystemExit(f"{method} {path}: {res.status} {answer[:300]!r}")
        return answer

    def create(self):
        return json.loads(self.call("POST", "/v1/sandboxes", {"image": "bench-bb"}, 201))["id"]

    def write_mb(self, sid, mb):
        script = f"dd if=/dev/urandom of=/work/blob bs=1M count={mb} 2>/dev/null && sync"
        lines = self.call("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": ["sh", "-c", script]})
        last = json.loads(lines.splitlines()[-1])
        if last.get("type") != "exit" or last.get("code") != 0:
            raise SystemExit(f"writing {mb} MB ended with {last}")

    def delete(self, sid):
        self.call("DELETE", f"/v1/sandboxes/{sid}", expect=204)


def cleanup(binary, data_dir, images):
    run = lambda *args: subprocess.run([binary, "--data-dir", data_dir, *args],
                                       check=True, capture_output=True, text=True)
    if images:
        # A tenant's snapshot is stored as tenants/<tenant>/NAME: the API answers NAME.
        listed = []
        for line in run("image", "ls").stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 2:
                listed.append(f"{cols[0]}:{cols[1]}")
        scoped = [n for image in images for n in listed if n == image or n.endswith("/" + image)]
        run("image", "rm", *(scoped or images))
    run("image", "prune")


def measure(binary, data_dir, url, key, out, runs):
    with tempfile.TemporaryDirectory() as tmp:
        busybox_layout(tmp)
        subprocess.run([binary, "--data-dir", data_dir, "image", "import", tmp, "-t", "bench-bb"],
                       check=True, capture_output=True)
    api = Api(url, key)
    results = {"snapshot": {}, "fork": {}}
    for mb in CHANGES_MB:
        samples = []
        for _ in range(runs):
            sid = api.create()
            api.write_mb(sid, mb)
            t0 = time.perf_counter()
            snap = json.loads(api.call("POST", f"/v1/sandboxes/{sid}/snapshot", {}, 201))
            wall = (time.perf_counter() - t0) * 1000
            samples.append({"wall_ms": wall, "duration_ms": snap["duration_ms"],
                            "paused_ms": snap["paused_ms"], "bytes": snap["bytes"]})
            api.delete(sid)
            cleanup(binary, data_dir, [snap["image"]])
        results["snapshot"][str(mb)] = samples
        print(f"snapshot {mb} MB: {[round(s['wall_ms']) for s in samples]} ms", file=sys.stderr)
    for n in FORKS:
        samples = []
        for _ in range(runs):
            sid = api.create()
            api.write_mb(sid, FORK_CHANGE_MB)
            t0 = time.perf_counter()
            forks = json.loads(api.call("POST", f"/v1/sandboxes/{sid}/fork", {"count": n}, 201))
            wall = (time.perf_counter() - t0) * 1000
            if len(forks) != n or any(f["state"] != "running" for f in forks):
                raise SystemExit(f"fork of {n} answered {forks[:2]}...")
            samples.append({"wall_ms": wall})
            for f in forks:
                api.delete(f["id"])
            api.delete(sid)
            cleanup(binary, data_dir, [forks[0]["image"]])
        results["fork"][str(n)] = samples
        print(f"fork {n}: {[round(s['wall_ms']) for s in samples]} ms", file=sys.stderr)
    results["runs"] = runs
    with open(out, "w") as f:
        json.dump(results, f)


def report(path):
    with open(path) as f:
        results = json.load(f)
    med = lambda samples, key: statistics.median(s[key] for s in samples)
    lines = [
        "## 7. Snapshots and forks",
        "",
        "Through `openrun serve` (`bench/snapshot.py`), a sandbox on a busybox store image, its",
        f"changes random bytes written to `/work`; median of {results['runs']} runs. Wall: the",
        "client's time for `POST .../snapshot`; paused: how long the sandbox was frozen for the",
        "copy of its writable layer (the rest is recording the layer and the image).",
        "",
        "| changed | wall | server | paused | MB/s while paused |",
        "|---|---|---|---|---|",
    ]
    for mb, samples in results["snapshot"].items():
        paused = med(samples, "paused_ms")
        rate = f"{int(mb) / (paused / 1000):.0f}" if paused > 0 else "-"
        size = f"{int(mb) // 1024} GB" if int(mb) >= 1024 else f"{mb} MB"
        shown = f"{paused:.0f} ms" if paused > 0 else "< 1 ms"
        lines.append(f"| {size} | {med(samples, 'wall_ms'):.0f} ms | "
                     f"{med(samples, 'duration_ms'):.0f} ms | {shown} | {rate} |")
    lines += [
        "",
        f"Fork (`POST .../fork`, snapshot of {FORK_CHANGE_MB} MB of changes included, until every",
        "fork runs; creates run concurrently within `--max-creating`):",
        "",
        "| forks | wall | per fork |",
        "|---|---|---|",
    ]
    for n, samples in results["fork"].items():
        wall = med(samples, "wall_ms")
        lines.append(f"| {n} | {wall:.0f} ms | {wall / int(n):.1f} ms |")
    print("\n".join(lines))


def main():
    if len(sys.argv) >= 7 and sys.argv[1] == "measure":
        runs = int(sys.argv[7]) if len(sys.argv) > 7 else 3
        measure(*sys.argv[2:7], runs)
    elif len(sys.argv) == 3 and sys.argv[1] == "report":
        report(sys.argv[2])
    else:
        raise SystemExit(__doc__)


main()
