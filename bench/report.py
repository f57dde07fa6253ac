"""Turns hyperfine's JSON export into BENCHMARKS.md: machine, date, median/p95 and ratios."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_gib():
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return kib / (1 << 20)


def main():
    path, runs = sys.argv[1], sys.argv[2]
    with open(path) as f:
        results = json.load(f)["results"]
    rows = {}
    for r in results:
        times = [t * 1000 for t in r["times"]]
        rows[r["command"]] = (statistics.median(times), percentile(times, 0.95), len(times))
    bwrap = rows.get("bwrap", (None,))[0]
    hv = subprocess.run(["hyperfine", "--version"], capture_output=True, text=True).stdout.strip()
    print("# Benchmarks\n")
    print("Produced by `bench/run` (see the README). Each command is timed by hyperfine")
    print(f"(`-N`, 20 warm-up runs, {runs} timed runs, 20 ms untimed pause before each run so")
    print("asynchronous teardown of the previous run does not count against the next) in the")
    print("same run, on the same machine.\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {mem_gib():.0f} GiB RAM")
    print(f"- kernel: {platform.release()}; {hv}\n")
    print("## Run `true` in a fresh sandbox\n")
    print("| command | median ms | p95 ms | runs | median vs bwrap |")
    print("|---|---:|---:|---:|---:|")
    for name, (med, p95, n) in rows.items():
        ratio = f"{med / bwrap:.2f}x" if bwrap else "-"
        print(f"| {name} | {med:.2f} | {p95:.2f} | {n} | {ratio} |")
    print()
    print("- openrun: `openrun run -- true`: new user (own 65,536-id range), mount, pid, net,")
    print("  uts, ipc and cgroup namespaces, cgroup with a pids limit, overlay root over the")
    print("  idmapped host image with a writable layer (its own tmpfs), /proc, /dev, /sys, /tmp,")
    print("  the agent as pid 1 running `true` as its child and streaming the result back.")
    print("  The time is until `openrun` exits: the sandbox is killed before that, and the rest")
    print("  of its teardown (cgroup, runtime files, id claim) runs in a background process")
    print("  that overlaps the next run, so its CPU shows up as load, not as latency here.")
    print("- openrun --storage disk: the same with the writable layer on disk in the data dir")
    print("  (the default for `openrun create`).")
    print("- bwrap: `bwrap --unshare-all` with the host /usr read-only, /proc, /dev, tmpfs /tmp.")
    print("- unshare: `unshare --user --map-root-user --mount --pid --fork --net true` (no root")
    print("  filesystem of its own: the floor for namespace creation).")
    print("\nTarget: openrun within 1.5x of bwrap at the median.")
    if len(sys.argv) > 3:
        api_table(sys.argv[3], bwrap)


def api_table(path, bwrap):
    """The HTTP API's figures, with the same bwrap median as the yardstick."""
    with open(path) as f:
        samples = json.load(f)
    n = len(samples["create"])
    print("\n## Through the HTTP API\n")
    print("| operation | median ms | p95 ms | runs | median vs bwrap `true` |")
    print("|---|---:|---:|---:|---:|")
    for name, times in samples.items():
        med = statistics.median(times)
        ratio = f"{med / bwrap:.2f}x" if bwrap else "-"
        print(f"| {name} | {med:.2f} | {percentile(times, 0.95):.2f} | {len(times)} | {ratio} |")
    print()
    print(f"- {n} sandboxes one after another, each: `POST /v1/sandboxes` `{{}}` (disk layer,")
    print("  15 min TTL; the answer comes once the agent answers), `POST .../exec`")
    print("  `{\"cmd\":[\"true\"]}` read to its exit line, `DELETE`. One keep-alive HTTP")
    print("  connection on loopback (Python http.client), 20 ms pause between sandboxes.")
    print("- create runs the single-threaded `openrun __create` helper (the server is")
    print("  multi-threaded and must not fork namespaces itself) and records the sandbox")
    print("  and its event in SQLite before answering; exec records `process.exec` and")
    print("  `process.exit` too.")


main()
