"""Density of idle sandboxes through the HTTP API of a running `openrun serve`.

    python3 bench/density.py BIN DATA URL KEY OUT.json

BIN is the `openrun` binary the server runs, DATA its data dir. Creates idle sandboxes
(POST /v1/sandboxes with a long TTL) up to DENSITY_TARGET (default 1000) and, at 0, 100, 500
and 1,000 live (DENSITY_CHECKPOINTS), measures:

- create latency with probes (DENSITY_PROBES of each kind, default 30, one after another,
  alternating): create, exec `true`, delete. `create_ms` asks for the server defaults (served
  by a warm pool when the server has one); `create_cold_ms` sets one environment variable,
  which a pool cannot serve;
- memory per live sandbox three ways, so nothing hides:
  * what the sandboxes' own memory cgroups are charged (v1 `memory.usage_in_bytes`, of which
    `memory.kmem.usage_in_bytes` is kernel memory; v2 `memory.current`), summed over the
    sandboxes this script created, divided by their number;
  * the system-wide drop of `MemAvailable` over the fills (taken just before and just after
    each fill, so the probes and the time in between add no drift), divided by the number
    created (it also counts what no sandbox cgroup is charged for: memory the agent inherited from
    the helper it was forked from, netns and mount-namespace objects, page tables; it is noisy
    when other processes allocate meanwhile);
  * the growth of the server process's RSS since the 0-live checkpoint, per sandbox;
  plus the agents' own PSS/RSS (from /proc/PID/smaps_rollup) and /proc/meminfo counters
  over the fills (AnonPages, Slab, PageTables, KernelStack, Percpu, VmallocUsed...) per
  sandbox;
- the server's open descriptors and threads, and the load average.

DENSITY_WORKERS (default 2) connections fill; DENSITY_TTL (default 3h) is the idle sandboxes'
TTL; DENSITY_HOLD=FILE (an investigation aid) writes the live ids to FILE at the top
checkpoint and waits until FILE is removed. After the delete, the probes run once more at 0
live (`after_delete`), to tell a slowdown caused by the live sandboxes from the machine's load
drifting meanwhile (each checkpoint records the load average).

Only sandboxes this script created are counted (they carry the label `density=<run>`); a warm
pool's pre-made sandboxes belong to the 0-live baseline. At the end everything it created is
deleted and the leftovers (runtime dirs, cgroups, disk-pool subvolumes, id-range claims) are
counted.

Prints nothing on stdout; errors go to stderr. Writes JSON:
{"checkpoints":[{"live":0,"create_ms":[...],...},...], "per_sandbox_memcg_bytes":...,
 "per_sandbox_memavailable_bytes":..., "server_rss_bytes_per_sandbox":..., "max_live":N,
 "notes":[...], ...}
"""
import http.client
import json
import os
import statistics
import sys
import threading
import time
import urllib.parse

TARGET = int(os.environ.get("DENSITY_TARGET", "1000"))
PROBES = int(os.environ.get("DENSITY_PROBES", "30"))
WORKERS = int(os.environ.get("DENSITY_WORKERS", "2"))
CHECKPOINTS = [
    int(c) for c in os.environ.get("DENSITY_CHECKPOINTS", "0,100,500,1000").split(",") if c
]
TTL = os.environ.get("DENSITY_TTL", "3h")
SETTLE_S = float(os.environ.get("DENSITY_SETTLE", "2"))
RUN = "%x" % (int(time.time() * 1000) & 0xFFFFFFFFFF)

CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory/openrun"


def log(*args):
    print("density:", *args, file=sys.stderr, flush=True)


class Api:
    """One keep-alive connection, like an SDK's."""

    def __init__(self, url, key):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
        self.conn = None

    def call(self, method, path, body=None):
        """(status, headers, body bytes); reconnects once on a dropped connection."""
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            try:
                self.conn.request(method, path, body=body, headers=self.headers)
                res = self.conn.getresponse()
                return res.status, dict(res.getheaders()), res.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")


class ApiError(Exception):
    def __init__(self, what, status, body):
        super().__init__(f"{what}: HTTP {status} {body[:300]!r}")
        self.what, self.status, self.body = what, status, body[:300].decode("utf-8", "replace")


def create(api, body, retry_429=True):
    """Creates a sandbox; returns its id. Waits out 429s (admission's queue is full)."""
    data = json.dumps(body).encode()
    while True:
        status, headers, out = api.call("POST", "/v1/sandboxes", data)
        if status == 201:
            return json.loads(out)["id"]
        if status == 429 and retry_429:
            wait = headers.get("Retry-After") or headers.get("retry-after") or "1"
            time.sleep(min(float(wait), 1.0))
            continue
        raise ApiError("create", status, out)


def exec_true(api, sid):
    status, _, out = api.call("POST", f"/v1/sandboxes/{sid}/exec", b'{"cmd":["true"]}')
    if status != 200:
        raise ApiError("exec", status, out)
    last = json.loads(out.splitlines()[-1])
    if last.get("type") != "exit" or last.get("code") != 0:
        raise ApiError("exec", status, out)


def delete(api, sid):
    status, _, out = api.call("DELETE", f"/v1/sandboxes/{sid}")
    if status not in (204, 404):
        raise ApiError("delete", status, out)


# --- host measurements --------------------------------------------------------------------


def meminfo():
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, rest = line.split(":", 1)
            values[name] = int(rest.split()[0]) * 1024
    return values


def slabinfo():
    """{cache: bytes} from /proc/slabinfo (root only; {} otherwise)."""
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f.readlines()[2:]:
                fields = line.split()
                out[fields[0]] = int(fields[2]) * int(fields[3])
    except (OSError, ValueError, IndexError):
        pass
    return out


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cgroup2_root():
    """Mount point of the unified hierarchy, if it has a memory controller."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    root = fields[4]
                    try:
                        with open(os.path.join(root, "cgroup.controllers")) as c:
                            if "memory" in c.read().split():
                                return root
                    except OSError:
                        pass
    except OSError:
        pass
    return None


CGROUP_V2 = cgroup2_root()


def sandbox_memcg(sid):
    """(usage, kmem or None, pids) of a sandbox's memory cgroup, or None."""
    v1 = os.path.join(CGROUP_V1_MEMORY, sid)
    if os.path.isdir(v1):
        usage = read_int(os.path.join(v1, "memory.usage_in_bytes"))
        kmem = read_int(os.path.join(v1, "memory.kmem.usage_in_bytes"))
        procs = os.path.join(v1, "cgroup.procs")
    elif CGROUP_V2 and os.path.isdir(os.path.join(CGROUP_V2, "openrun", sid)):
        v2 = os.path.join(CGROUP_V2, "openrun", sid)
        usage = read_int(os.path.join(v2, "memory.current"))
        kmem = None
        try:
            with open(os.path.join(v2, "memory.stat")) as f:
                stat = dict(line.split()[:2] for line in f if line.strip())
            kmem = int(stat.get("kernel", 0)) or sum(
                int(stat.get(k, 0)) for k in ("slab", "kernel_stack", "pagetables", "sock")
            )
        except (OSError, ValueError):
            pass
        procs = os.path.join(v2, "cgroup.procs")
    else:
        return None
    try:
        with open(procs) as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        pids = []
    return usage, kmem, pids


def smaps(pid):
    """{Rss, Pss, Pss_Anon, Pss_File, ...} in bytes from /proc/PID/smaps_rollup."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def find_server(data):
    """Pid of `... --data-dir DATA serve` (the newest if several)."""
    found = []
    data = os.path.realpath(data)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in argv if a]
        if "serve" not in args or "--data-dir" not in args:
            continue
        i = args.index("--data-dir")
        if i + 1 < len(args) and os.path.realpath(args[i + 1]) == data:
            found.append(int(entry))
    return max(found) if found else None


def process_status(pid):
    out = {}
    if pid is None:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, rest = line.split(":", 1)
                if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[name] = int(rest.split()[0]) * 1024
                elif name == "Threads":
                    out[name] = int(rest)
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def quantiles(samples):
    if not samples:
        return {}
    s = sorted(samples)

    def q(p):
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return {"median": statistics.median(s), "p95": q(0.95), "p99": q(0.99), "n": len(s)}


# --- the run ------------------------------------------------------------------------------


def describe(e, live):
    out = {"error": str(e)}
    if isinstance(e, ApiError):
        out |= {"what": e.what, "status": e.status, "body": e.body}
    if live is not None:
        out["live"] = live
    return out


class Fleet:
    """The idle sandboxes created so far."""

    def __init__(self, url, key):
        self.url, self.key = url, key
        self.ids = []
        self.lock = threading.Lock()
        self.error = None
        self.fill_ms = []
        self.pending = 0

    def fill(self, upto):
        """Creates sandboxes with WORKERS connections until `upto` live or an error."""
        body = {"ttl": TTL, "labels": {"density": RUN}}

        def worker():
            api = Api(self.url, self.key)
            while True:
                with self.lock:
                    if self.error or len(self.ids) + self.pending >= upto:
                        return
                    self.pending += 1
                t0 = time.perf_counter()
                try:
                    sid = create(api, body)
                except Exception as e:  # noqa: BLE001 -- recorded, the fill stops
                    with self.lock:
                        self.pending -= 1
                        self.error = self.error or describe(e, len(self.ids))
                    return
                ms = (time.perf_counter() - t0) * 1000
                with self.lock:
                    self.pending -= 1
                    self.ids.append(sid)
                    self.fill_ms.append(ms)

        threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def delete_all(self):
        """Deletes every created sandbox; returns (ms, errors)."""
        ids = list(self.ids)
        errors = []
        t0 = time.perf_counter()

        def worker(part):
            api = Api(self.url, self.key)
            for sid in part:
                try:
                    delete(api, sid)
                except Exception as e:  # noqa: BLE001
                    errors.append(describe(e, None) | {"id": sid})

        threads = [
            threading.Thread(target=worker, args=(ids[i::WORKERS],)) for i in range(WORKERS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.ids = []
        return (time.perf_counter() - t0) * 1000, errors


def probe(api, checkpoint):
    """Probes one after another, alternating a create with the defaults and a cold one (so
    both see the same machine), each followed by exec `true` and delete."""
    samples = {"create_ms": [], "exec_ms": [], "delete_ms": [], "create_cold_ms": []}
    errors = []
    for i in range(2 * PROBES):
        kind = "create_ms" if i % 2 == 0 else "create_cold_ms"
        body = {"ttl": "10m", "labels": {"density-probe": RUN}}
        if kind == "create_cold_ms":
            body["env"] = {"OPENRUN_DENSITY_PROBE": "1"}
        try:
            t0 = time.perf_counter()
            sid = create(api, body, retry_429=False)
            t1 = time.perf_counter()
            exec_true(api, sid)
            t2 = time.perf_counter()
            delete(api, sid)
            t3 = time.perf_counter()
        except Exception as e:  # noqa: BLE001
            errors.append(describe(e, checkpoint))
            if len(errors) >= 3:
                break
            continue
        samples[kind].append((t1 - t0) * 1000)
        samples["exec_ms"].append((t2 - t1) * 1000)
        samples["delete_ms"].append((t3 - t2) * 1000)
        time.sleep(0.02)  # like bench/api.py: let asynchronous teardown settle
    return samples, errors


# /proc/meminfo counters reported per sandbox (AnonPages holds the agents' private memory,
# wherever it is charged; the rest is the kernel's).
KERNEL_COUNTERS = (
    "AnonPages",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "PageTables",
    "KernelStack",
    "Percpu",
    "VmallocUsed",
    "Shmem",
)


def measure_memory(ids, server_pid):
    mem = meminfo()
    usage = kmem = 0
    agents = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    counted = processes = 0
    for sid in ids:
        cg = sandbox_memcg(sid)
        if cg is None:
            continue
        counted += 1
        usage += cg[0] or 0
        kmem += cg[1] or 0
        for pid in cg[2]:
            processes += 1
            s = smaps(pid)
            for k in agents:
                agents[k] += s.get(k, 0)
    return {
        "memavailable": mem.get("MemAvailable"),
        "kernel": {k: mem.get(k) for k in KERNEL_COUNTERS},
        "memcg_sum": usage,
        "memcg_kmem_sum": kmem,
        "memcg_counted": counted,
        "processes": processes,
        "agents": agents,
        "server": process_status(server_pid),
    }


def per_sandbox(cp, base, segments):
    """Per live sandbox. System-wide counters come from the fill segments (each measured just
    before and just after its creates, so the probes and the time between checkpoints add no
    drift); the server's RSS from the 0-live checkpoint."""
    n = cp["live"]
    if n == 0:
        return {}
    m, b = cp["memory"], base["memory"]
    made = sum(seg["made"] for seg in segments) or n
    out = {
        "memcg_bytes": m["memcg_sum"] / max(m["memcg_counted"], 1),
        "memcg_kmem_bytes": m["memcg_kmem_sum"] / max(m["memcg_counted"], 1),
        "memavailable_drop_bytes": sum(seg["memavailable_drop"] for seg in segments) / made,
        "memavailable_drop_since_0_bytes": (b["memavailable"] - m["memavailable"]) / n,
        "processes": m["processes"] / n,
        "agent_pss_bytes": m["agents"]["Pss"] / n,
        "agent_pss_anon_bytes": m["agents"]["Pss_Anon"] / n,
        "agent_rss_bytes": m["agents"]["Rss"] / n,
    }
    for k in KERNEL_COUNTERS:
        deltas = [seg["kernel"].get(k) for seg in segments]
        if deltas and None not in deltas:
            out["kernel_" + k + "_bytes"] = sum(deltas) / made
    slab = {}
    for seg in segments:
        for k, v in seg["slab"].items():
            slab[k] = slab.get(k, 0) + v
    top = sorted(slab.items(), key=lambda kv: -kv[1])[:20]
    out["slab_caches_bytes"] = {k: v / made for k, v in top if v > 0}
    if m["server"].get("VmRSS") is not None and b["server"].get("VmRSS") is not None:
        out["server_rss_bytes"] = (m["server"]["VmRSS"] - b["server"]["VmRSS"]) / n
        out["server_fds"] = (m["server"]["fds"] - b["server"]["fds"]) / n
    return out


def leftovers(ids, data):
    """What is left of the given sandboxes after their delete."""
    left = {"runtime_dirs": 0, "cgroups": 0, "subvolumes": 0, "id_claims": 0}
    idset = set(ids)
    try:
        for scope in os.listdir("/run/openrun"):
            d = os.path.join("/run/openrun", scope)
            if scope in ("dev", "idmap") or not os.path.isdir(d):
                continue
            left["runtime_dirs"] += sum(1 for e in os.listdir(d) if e in idset)
    except OSError:
        pass
    try:
        for slot in os.listdir("/run/openrun/idmap"):
            try:
                with open(os.path.join("/run/openrun/idmap", slot)) as f:
                    if f.read().strip() in idset:
                        left["id_claims"] += 1
            except OSError:
                pass
    except OSError:
        pass
    for sid in ids:
        if sandbox_memcg(sid) is not None or os.path.isdir(f"/sys/fs/cgroup/pids/openrun/{sid}"):
            left["cgroups"] += 1
        if os.path.isdir(os.path.join(data, "disk-pool", sid)):
            left["subvolumes"] += 1
    return left


BREAKDOWN = (
    ("agent_private_anon", "agent_pss_anon_bytes"),
    ("kernel_slab_unreclaimable", "kernel_SUnreclaim_bytes"),
    ("kernel_page_tables", "kernel_PageTables_bytes"),
    ("kernel_stacks", "kernel_KernelStack_bytes"),
    ("kernel_percpu", "kernel_Percpu_bytes"),
    ("kernel_vmalloc", "kernel_VmallocUsed_bytes"),
    ("kernel_slab_reclaimable", "kernel_SReclaimable_bytes"),
)


def unreclaimable(ps):
    parts = [ps.get(v) for k, v in BREAKDOWN if k != "kernel_slab_reclaimable"]
    if not ps or any(p is None for p in parts):
        return None
    return sum(max(p, 0) for p in parts)


def ratio_of(first, top, kind):
    a, b = first["summary"].get(kind), top["summary"].get(kind)
    if not a or not b:
        return None
    return b["median"] / a["median"]


def main():
    if len(sys.argv) != 6:
        sys.exit("usage: python3 bench/density.py BIN DATA URL KEY OUT.json")
    _binary, data, url, key, out = sys.argv[1:]
    server_pid = find_server(data)
    notes = []
    if server_pid is None:
        notes.append("server process not found: no server RSS/fd figures")
    api = Api(url, key)
    fleet = Fleet(url, key)
    checkpoints = sorted({c for c in CHECKPOINTS if c <= TARGET} | {TARGET})
    results = []
    segments = []
    base = None
    all_ids = []
    t_start = time.time()
    try:
        for target in checkpoints:
            made, fill_s = 0, 0.0
            if len(fleet.ids) < target:
                t0 = time.perf_counter()
                before = len(fleet.ids)
                mem_before, slab_before = meminfo(), slabinfo()
                fleet.fill(target)
                made = len(fleet.ids) - before
                fill_s = time.perf_counter() - t0
                time.sleep(SETTLE_S)
                mem_after, slab_after = meminfo(), slabinfo()
                segments.append(
                    {
                        "made": made,
                        "slab": {
                            k: slab_after[k] - slab_before[k]
                            for k in slab_after
                            if k in slab_before
                        },
                        "memavailable_drop": mem_before["MemAvailable"]
                        - mem_after["MemAvailable"],
                        "kernel": {
                            k: mem_after[k] - mem_before[k]
                            for k in KERNEL_COUNTERS
                            if k in mem_after and k in mem_before
                        },
                    }
                )
                all_ids = list(fleet.ids)
                if fleet.error:
                    log("fill stopped:", fleet.error)
            live = len(fleet.ids)
            if live < target and results and results[-1]["live"] == live:
                break  # nothing new since the last checkpoint
            else:
                time.sleep(SETTLE_S)
            cp = {
                "live": live,
                "target": target,
                "loadavg": loadavg(),
                "fill": {
                    "created": made,
                    "seconds": fill_s,
                    "per_second": made / fill_s if fill_s else None,
                    "create_ms": quantiles(fleet.fill_ms[-made:] if made else []),
                },
                "memory": measure_memory(fleet.ids, server_pid),
            }
            samples, errors = probe(api, live)
            cp.update(samples)
            cp["summary"] = {k: quantiles(v) for k, v in samples.items()}
            if errors:
                cp["probe_errors"] = errors
                for e in errors:
                    log("probe at", live, "live:", e.get("error"))
            if base is None:
                base = cp
            cp["per_sandbox"] = per_sandbox(cp, base, segments)
            results.append(cp)
            hold = os.environ.get("DENSITY_HOLD")
            if hold and target == checkpoints[-1]:
                # Investigation aid: keep the sandboxes until the file is removed.
                with open(hold, "w") as f:
                    f.write(" ".join(fleet.ids))
                while os.path.exists(hold):
                    time.sleep(1)
            if live < target:
                break
    finally:
        pre_delete = meminfo().get("MemAvailable")
        n_deleted = len(fleet.ids)
        all_ids = list(fleet.ids) or all_ids
        delete_ms, delete_errors = fleet.delete_all()
        for e in delete_errors[:5]:
            log("delete:", e.get("error"))
        time.sleep(max(SETTLE_S, 5))
        post_delete = meminfo().get("MemAvailable")
        left = leftovers(all_ids, data)
    # The same probes once everything is deleted again: how much of a slowdown at the top
    # was the machine's load drifting (other processes) rather than the live sandboxes.
    after = None
    if results:
        samples, errors = probe(api, 0)
        after = {"live": 0, "after_delete": True, "loadavg": loadavg()}
        after.update(samples)
        after["summary"] = {k: quantiles(v) for k, v in samples.items()}
        if errors:
            after["probe_errors"] = errors
    top = results[-1] if results else None
    first = results[0] if results else None
    ps = top["per_sandbox"] if top else {}
    max_live = max((c["live"] for c in results), default=0)
    if fleet.error:
        notes.append(f"fill stopped at {fleet.error.get('live')} live: {fleet.error.get('error')}")
    if any(left.values()):
        notes.append(f"leftovers after deleting all: {left}")
    notes.append(
        "per_sandbox_unreclaimable_bytes = the agents' private anonymous memory (smaps Pss_Anon; "
        "mostly NOT charged to the sandbox's memcg: the helper faulted it before the fork) + "
        "the growth of SUnreclaim, PageTables, KernelStack, Percpu and VmallocUsed over the fills"
    )
    notes.append(
        "MemAvailable is system-wide: other processes allocating during the run add noise; "
        "memavailable_freed_on_delete is the same measure taken over the teardown"
    )
    report = {
        "run": RUN,
        "target": TARGET,
        "workers": WORKERS,
        "probes": PROBES,
        "started_at": t_start,
        "seconds": time.time() - t_start,
        "checkpoints": results,
        "after_delete": after,
        "max_live": max_live,
        "per_sandbox_memcg_bytes": ps.get("memcg_bytes"),
        "per_sandbox_memcg_kmem_bytes": ps.get("memcg_kmem_bytes"),
        "per_sandbox_memavailable_bytes": ps.get("memavailable_drop_bytes"),
        "server_rss_bytes_per_sandbox": ps.get("server_rss_bytes"),
        # The headline: what one idle sandbox holds that nothing can reclaim — its agent's
        # private memory (wherever it is charged) plus the kernel's unreclaimable growth.
        "per_sandbox_unreclaimable_bytes": unreclaimable(ps),
        "per_sandbox_breakdown_bytes": {
            k: ps.get(v) for k, v in BREAKDOWN if ps.get(v) is not None
        },
        "per_sandbox": ps,
        "create_median_ratio_top_vs_0": ratio_of(first, top, "create_ms") if top else None,
        "create_cold_median_ratio_top_vs_0": (
            ratio_of(first, top, "create_cold_ms") if top else None
        ),
        "exec_median_ratio_top_vs_0": ratio_of(first, top, "exec_ms") if top else None,
        "delete_all": {
            "sandboxes": n_deleted,
            "ms": delete_ms,
            "errors": delete_errors[:20],
            "memavailable_freed_on_delete_per_sandbox": (
                (post_delete - pre_delete) / n_deleted if n_deleted else None
            ),
        },
        "leftovers": left,
        "fill_error": fleet.error,
        "notes": notes,
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


main()
