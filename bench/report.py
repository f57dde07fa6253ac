"""Turns bench/run's samples (bench/results/*.json: hyperfine's export and openrun-bench's
JSON) into BENCHMARKS.md on stdout: machine, kernel, date, command lines, and for every figure
the median, p95 and p99 and the ratio openrun / peer measured in the same run.

    python3 bench/report.py bench/results

A figure whose samples are missing is printed as "not measured" with the reason; nothing is
made up.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

OUT = None
EXPECTED_BYTES = 512 << 20  # what bench/run's pipe commands write


def load(name):
    path = os.path.join(OUT, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def percentile(values, q):
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def stats(values):
    """(median, p95, p99, n) of a list of numbers."""
    return (statistics.median(values), percentile(values, 0.95), percentile(values, 0.99),
            len(values))


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


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


def version(*cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        return out.splitlines()[0] if out else "?"
    except OSError:
        return "not installed"


def git_head():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def p(*lines):
    for line in lines:
        print(line)


def header(cmds):
    runs = cmds.get("runs", "?") if cmds else "?"
    p("# Benchmarks", "",
      "Produced by `bench/run` (see the README): openrun and its peers measured in one run on",
      "one machine. Times in ms; p95/p99 are percentiles of the samples (linear interpolation);",
      "a ratio is openrun's figure divided by the peer's at the same percentile (below 1.0:",
      "openrun is faster; for rates, above 1.0: openrun does more per second).", "")
    p(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, {mem_gib():.0f} GiB RAM",
      f"- kernel: {platform.release()}",
      (f"- openrun: `{cmds['bin']}` (OPENRUN_BIN; harness of {git_head()})"
       if cmds.get("bin_override") else f"- openrun: release build of {git_head()}"),
      f"- peers: {version('hyperfine', '--version')}; {version('bwrap', '--version')}; "
      f"{version('runc', '--version')}; {version('unshare', '--version')}",
      f"- runs: `bench/run {runs}`", "")


def section_cold(cmds):
    p("## 1. Create → first command output, cold", "")
    rounds = [hf for hf in (load(f"run-true-{i}.json") for i in range(1000)) if hf]
    if not rounds:
        p("Not measured (no bench/results/run-true-*.json).", "")
        return {}
    # One hyperfine export per round (bench/run); a command's samples are all its rounds'.
    order = ("openrun", "bwrap", "unshare", "runc", "openrun --storage disk", "host true")
    rows = {}
    for hf in rounds:
        for r in hf["results"]:
            rows.setdefault(r["command"], []).extend(t * 1000 for t in r["times"])
    rows = dict(sorted(rows.items(),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    base = {name: stats(t) for name, t in rows.items()}
    o = base.get("openrun")
    p("| command | median | p95 | p99 | runs | openrun ÷ this, median | p95 | p99 |",
      "|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (med, p95, p99, n) in base.items():
        r = [ratio(o[i], x) if o else "-" for i, x in enumerate((med, p95, p99))]
        p(f"| {name} | {med:.2f} | {p95:.2f} | {p99:.2f} | {n} | {r[0]} | {r[1]} | {r[2]} |")
    p("")
    if o and "bwrap" in base:
        verdict = "met" if o[0] <= base["bwrap"][0] else "not met"
        p(f"Target: openrun ÷ bwrap ≤ 1.0 at the median: {o[0] / base['bwrap'][0]:.2f} ({verdict}).",
          "")
    p(f"hyperfine `-N` (no shell) in {len(rounds)} rounds, each one invocation over every command",
      "with the commands' order rotated by one, so that each command's samples spread over the",
      "whole measurement and a drift of the machine weighs on all of them alike; 20 warm-up runs",
      "per command in the first round, 3 in the others; a 20 ms untimed `--prepare` pause before",
      "each run (openrun finishes its teardown in a background process, and the kernel frees",
      "network namespaces asynchronously for all of them; back-to-back runs would measure the",
      "previous run's leftovers). Command lines:", "", "```")
    for name in ("openrun", "bwrap", "unshare", "runc", "openrun --storage disk", "host true"):
        if cmds and name in cmds:
            p(f"{name}: {cmds[name]}")
    p("```", "")
    p("- openrun: new user (own 65,536-id range), mount, pid, net, uts, ipc and cgroup",
      "  namespaces, cgroup with a pids limit, overlay root over the idmapped host image with a",
      "  writable layer (its own tmpfs; `--storage disk`: in the data dir), /proc, /dev, /sys,",
      "  /tmp, seccomp and landlock, the agent as pid 1 running `true` and streaming its result.",
      "- bwrap: `--unshare-all` (user, mount, pid, net, ipc, uts, cgroup) with the host /usr",
      "  read-only, /proc, /dev, tmpfs /tmp.",
      "- unshare: user, mount, pid and net namespaces, no root filesystem of its own: the floor.",
      "- runc: an OCI bundle of the same root as bwrap (`bench/runc_bundle.py`: /usr bind",
      "  read-only, bin/lib/lib64/sbin symlinks, /proc, tmpfs /dev, tmpfs /tmp; pid, net, ipc,",
      "  uts, mount, cgroup namespaces, no user namespace, run as root, cgroup v1), `runc run`",
      "  in the foreground (it deletes the container before it exits).",
      "- host true: `/usr/bin/true` with no sandbox: what starting a process costs here.", "")
    config = load("runc-config.json")
    if config:
        p("<details><summary>runc's config.json (bench/runc_bundle.py)</summary>", "", "```json",
          "{", ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in config.items()),
          "}", "```", "", "</details>", "")
    return {name: s for name, s in base.items()}


def api_table(rows, yard, yard_name):
    p(f"| figure | median | p95 | p99 | runs | ÷ {yard_name} median |",
      "|---|---:|---:|---:|---:|---:|")
    for label, values in rows:
        if not values:
            continue
        med, p95, p99, n = stats(values)
        p(f"| {label} | {med:.2f} | {p95:.2f} | {p99:.2f} | {n} | {ratio(med, yard)} |")
    p("")


def section_api(cmds, cold):
    p("## 2. Create → first output through the HTTP API", "")
    unshare = cold.get("unshare", (None,))[0]
    warm, coldapi = load("api-warm.json"), load("api-cold.json")
    if not warm and not coldapi:
        p("Not measured (no bench/results/api-*.json).", "")
        return
    pool = cmds.get("warm_pool_flag") if cmds else False
    for title, data in ((("server defaults (warm pool of 4)" if pool else
                          "server defaults (this build has no warm pool)"), warm),
                        ("`--warm-pool 0` (cold API)", coldapi)):
        if not data:
            if pool or data is warm:
                p(f"{title}: not measured.", "")
            continue
        p(f"**{title}**", "")
        api_table([
            ("create → first output (create + exec `true` to its exit line)",
             data["create_first_output_ms"]),
            ("create (`POST /v1/sandboxes` `{}` → 201)", data["create_ms"]),
            ("exec `true` on the new sandbox, to its exit line", data["exec_true_ms"]),
            ("delete (untimed in create → first output)", data["delete_ms"]),
        ], unshare, "unshare")
    if warm and unshare:
        med = statistics.median(warm["create_first_output_ms"])
        verdict = "met" if med <= unshare else "not met"
        pooled = "with the warm pool" if pool else "(this build has no warm pool)"
        p(f"Target: API create → first output {pooled} ≤ `unshare … true` at the "
          f"median: {med:.2f} ÷ {unshare:.2f} = {med / unshare:.2f} ({verdict}).", "")
    if not pool:
        p("`--warm-pool 0` (cold API): not measured (`openrun serve` has no --warm-pool flag in"
          " this build).", "")
    n = (warm or coldapi)["runs"]
    p(f"{n} sandboxes one after another (5 untimed first), one keep-alive HTTP/1.1 connection on",
      "loopback from `openrun-bench api` (a blocking Rust client, times from CLOCK_MONOTONIC",
      "around the requests: client time included). Each: `POST /v1/sandboxes` `{}`, `POST",
      ".../exec` `{\"cmd\":[\"true\"]}` read to its exit line, `DELETE`, 20 ms pause. unshare is",
      "section 1's median (process start included there).", "")


def section_exec(cmds):
    p("## 3. Exec round trip on a live sandbox", "")
    d = load("exec-rt.json")
    if not d:
        p("Not measured (no bench/results/exec-rt.json).", "")
        return
    fork = statistics.median(d["host_fork_exec_ms"])
    api_table([
        ("API exec `true` on a live sandbox, to its exit line", d["api_exec_true_ms"]),
        ("host `fork` + `execve` /usr/bin/true + `waitpid`", d["host_fork_exec_ms"]),
        ("host `std::process::Command` (posix_spawn) /usr/bin/true", d["host_posix_spawn_ms"]),
    ], fork, "host fork+exec")
    med = statistics.median(d["api_exec_true_ms"])
    verdict = "met" if med <= 2 * fork else "not met"
    p(f"Target: within 2× of a host fork+exec at the median: {med / fork:.2f}× ({verdict}).", "")
    p(f"`openrun-bench exec-rt`: one sandbox, {d['runs']} rounds (after {d['warmup']} untimed),",
      "each round one of every row back to back from the same single-threaded client process,",
      "so they share the machine's noise.", "")


def section_throughput(cmds):
    p("## 4. Create throughput, 2 workers", "")
    rows = [(label, load(f)) for label, f in (
        ("openrun run -- true", "spawn-openrun.json"),
        ("bwrap --unshare-all … true", "spawn-bwrap.json"),
        ("unshare … true", "spawn-unshare.json"),
        ("runc run (unique id per run)", "spawn-runc.json"),
        ("API create + delete, server defaults", "api-throughput-warm.json"),
        ("API create + delete, `--warm-pool 0`", "api-throughput-cold.json"),
    )]
    if not any(d for _, d in rows):
        p("Not measured.", "")
        return
    o, bw = rows[0][1], rows[1][1]
    p("| what | per second | this ÷ bwrap | each: median | p95 | p99 | runs | wall s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, d in rows:
        if not d:
            continue
        med, p95, p99, n = stats(d["op_ms"])
        r = ratio(d["per_s"], bw["per_s"]) if bw else "-"
        p(f"| {label} | {d['per_s']:.0f} | {r} | {med:.2f} | {p95:.2f} | {p99:.2f} | {n} | "
          f"{d['seconds']:.2f} |")
    p("")
    if o and bw:
        verdict = "met" if o["per_s"] >= bw["per_s"] else "not met"
        p(f"Target: openrun ≥ bwrap: {o['per_s']:.0f}/s vs {bw['per_s']:.0f}/s "
          f"({o['per_s'] / bw['per_s']:.2f}, {verdict}).", "")
    p("`openrun-bench spawn --workers 2`: two threads each run the command to completion (stdout",
      "to /dev/null), taking the next run number until the total is done; per second = runs ÷",
      "wall time from the start barrier to the last exit (10 untimed runs first; no pause, so",
      "openrun's background teardown competes for the CPUs as it would in production). The",
      "command lines are section 1's; runc's id is `bench-runc-N`. API: `openrun-bench",
      "api-throughput --clients 2`, two keep-alive connections, each `POST /v1/sandboxes` `{}`",
      "then `DELETE`.", "")


def section_density():
    p("## 5. Density: idle sandboxes", "")
    d = load("density.json")
    if not d:
        reason = ("bench/density.py is not in this tree" if not os.path.exists("bench/density.py")
                  else "bench/density.py wrote no bench/results/density.json (see bench/run's log)")
        p(f"Not measured ({reason}).", "")
        return
    cps = d.get("checkpoints") or []
    if not cps:
        p("Not measured (bench/density.py recorded no checkpoint).", "")
    kinds = [("create_ms", "create (server defaults)"), ("create_cold_ms", "create, cold path")]
    base = {k: statistics.median(cps[0][k]) for k, _ in kinds if cps and cps[0].get(k)}
    for k, label in kinds:
        if not any(cp.get(k) for cp in cps):
            continue
        p(f"**{label}** (`POST /v1/sandboxes` with that many idle sandboxes live)", "",
          "| live | median | p95 | p99 | probes | median ÷ at 0 live |",
          "|---:|---:|---:|---:|---:|---:|")
        for cp in cps:
            if not cp.get(k):
                continue
            med, p95, p99, n = stats(cp[k])
            p(f"| {cp['live']} | {med:.2f} | {p95:.2f} | {p99:.2f} | {n} | "
              f"{ratio(med, base.get(k))} |")
        p("")

    def mib(v):
        return f"{v / (1 << 20):.2f} MiB" if isinstance(v, (int, float)) else "not measured"
    top = cps[-1] if cps else None
    unrecl = d.get("per_sandbox_unreclaimable_bytes")
    goals = []
    if isinstance(d.get("max_live"), int):
        goals.append(f"≥ 1,000 live: {d['max_live']} "
                     f"({'met' if d['max_live'] >= 1000 else 'not met'})")
    if isinstance(unrecl, (int, float)):
        goals.append(f"≤ 1 MiB each: {mib(unrecl)} ({'met' if unrecl <= 1 << 20 else 'not met'})")
    if top and top.get("create_ms") and base.get("create_ms"):
        r = statistics.median(top["create_ms"]) / base["create_ms"]
        goals.append(f"create at {top['live']} live within 2× of 0 live: {r:.2f}× "
                     f"({'met' if r <= 2 else 'not met'})")
    if goals:
        p("Targets: " + "; ".join(goals) + ".", "")
    breakdown = d.get("per_sandbox_breakdown_bytes") or {}
    p(f"- most live at once: {d.get('max_live', 'not measured')}"
      f" (target {d.get('target', '?')})",
      f"- memory per idle sandbox, unreclaimable (agent private memory + kernel growth): "
      f"{mib(unrecl)}"
      + (" (of which " + ", ".join(f"{k} {mib(v)}" for k, v in breakdown.items()) + ")"
         if breakdown else ""),
      f"- memory per idle sandbox, charged to its memory cgroup: "
      f"{mib(d.get('per_sandbox_memcg_bytes'))}"
      + (f" (of which kernel {mib(d.get('per_sandbox_memcg_kmem_bytes'))})"
         if d.get("per_sandbox_memcg_kmem_bytes") is not None else ""),
      f"- system MemAvailable drop per sandbox: {mib(d.get('per_sandbox_memavailable_bytes'))}",
      f"- server RSS growth per sandbox: {mib(d.get('server_rss_bytes_per_sandbox'))}")
    for note in d.get("notes") or []:
        p(f"- note: {note}")
    p("", "`bench/density.py` (through the warm-pool server of sections 2-4): see its docstring for"
      " the method.", "")


def section_output(cmds):
    p("## 6. Output throughput", "")
    piped = (load("pipe.json") or {}).get("commands") or []
    piped += [None] * (4 - len(piped))
    rows = [
        ("API exec `head -c 512M /dev/zero`, base64 NDJSON decoded by the client",
         load("api-output.json")),
        ("`openrun run -- head -c 512M /dev/zero` into a pipe", piped[1]),
        ("bwrap … `head -c 512M /dev/zero` into a pipe", piped[2]),
        ("runc run (`head -c 512M /dev/zero`) into a pipe", piped[3]),
        ("host `head -c 512M /dev/zero` into a pipe, no sandbox", piped[0]),
    ]
    if not any(d for _, d in rows):
        p("Not measured.", "")
        return
    host = rows[4][1]
    bw = rows[2][1]
    hmed = statistics.median(host["mb_s"]) if host else None
    bmed = statistics.median(bw["mb_s"]) if bw else None
    p("| what | MB/s median | slowest | runs | delivered | reader CPU | ÷ bwrap | ÷ no sandbox |",
      "|---|---:|---:|---:|---:|---:|---:|---:|")
    lossy = False
    for label, d in rows:
        if not d:
            p(f"| {label} | not measured | | | | | | |")
            continue
        med = statistics.median(d["mb_s"])
        got = d.get("delivered") or d.get("bytes") or []
        want = d["bytes"] if isinstance(d["bytes"], int) else EXPECTED_BYTES
        share = sum(got) / (want * len(got)) if got else None
        lossy = lossy or (share is not None and share < 1)
        shown = f"{share:.1%}" if share is not None else "?"
        cpu = d.get("client_cpu_seconds")
        busy = (f"{statistics.median(c / t for c, t in zip(cpu, d['seconds'])):.0%}"
                if cpu else "?")
        p(f"| {label} | {med:.0f} | {min(d['mb_s']):.0f} | {len(d['mb_s'])} | {shown} | "
          f"{busy} | {ratio(med, bmed)} | {ratio(med, hmed)} |")
    p("", "MB = 10^6 bytes, counted by the reader (`openrun-bench api-output` / `pipe`) and",
      "divided by the time from the request (or spawn) to the exit line (or exit); one untimed",
      "run first; the pipe commands run in turn, round after round, so they share the",
      "machine's noise. With a few runs of 512 MiB each, the slowest run stands in for p95/p99.",
      "delivered: the share of the 512 MiB written that reached the reader. reader CPU: the",
      "reading process's own CPU time (user + system) over the wall time, median: well below",
      "100% means the reader was not what limited the rate.")
    if lossy:
        p("**Output was lost** where delivered is below 100%: the agent keeps a bounded buffer",
          "per stream and drops the oldest bytes when its reader falls behind (the API marks",
          "the gap with offsets). MB/s counts only delivered bytes.")
    p("")


def main():
    global OUT
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    OUT = sys.argv[1]
    cmds = load("commands.json") or {}
    header(cmds)
    cold = section_cold(cmds)
    section_api(cmds, cold)
    section_exec(cmds)
    section_throughput(cmds)
    section_density()
    section_output(cmds)


main()
