"""Times `openrun up` per fixture repository: the first open (set up from scratch, check run)
and RUNS cached re-opens (`--no-check`), and prints the markdown section for BENCHMARKS.md.
Run through bench/up (which starts the server); see its header.

    python3 bench/up.py BIN URL KEY OUT.json RUNS FIXTURE...
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/python/up"))
import up_fixtures  # noqa: E402


# Fixtures whose plan has no test suite: the check their first open runs.
CHECKS = {"devcontainer": ["--check", "python3 check.py"]}


def up(bin_, url, key, target, *args):
    """`openrun up --json ARGS TARGET`: (exit code, result or error object, wall ms)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENRUN_")}
    env["OPENRUN_API_KEY"] = key
    start = time.monotonic()
    done = subprocess.run(
        [bin_, "up", "--json", "--server", url, *args, str(target)],
        capture_output=True, text=True, timeout=1800, env=env,
    )
    wall = (time.monotonic() - start) * 1000
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = {"type": "error", "message": done.stderr[-2000:]}
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
    return done.returncode, out, wall


def delete(url, key, sandbox):
    req = urllib.request.Request(
        f"{url}/v1/sandboxes/{sandbox}", method="DELETE",
        headers={"Authorization": "Bearer " + key},
    )
    urllib.request.urlopen(req, timeout=60).read()


def pct(values, p):
    """The p-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def measure(bin_, url, key, runs, kinds):
    results = []
    with tempfile.TemporaryDirectory(prefix="openrun-bench-up-") as work:
        for kind in kinds:
            root = Path(work) / kind
            root.mkdir()
            up_fixtures.MAKERS[kind](root)
            print(f"bench/up: {kind}: first open", file=sys.stderr)
            code, out, wall = up(bin_, url, key, root, *CHECKS.get(kind, []))
            row = {"fixture": kind, "first": {"exit": code, "wall_ms": wall}}
            if out.get("sandbox_id"):
                delete(url, key, out["sandbox_id"])
            if code != 0:
                row["first"]["error"] = out.get("message") or out.get("code")
                results.append(row)
                continue
            row["first"].update(
                cached=out["cached"],
                check_passed=(out.get("check") or {}).get("passed"),
                **{k: out["timings"].get(k) for k in ("total_ms", "ready_ms", "setup_ms", "check_ms")},
            )
            ready, walls, cached = [], [], 0
            print(f"bench/up: {kind}: {runs} cached re-opens", file=sys.stderr)
            for _ in range(runs):
                code, out, wall = up(bin_, url, key, root, "--no-check")
                if out.get("sandbox_id"):
                    delete(url, key, out["sandbox_id"])
                if code != 0:
                    row["reopen_error"] = out.get("message") or out.get("code")
                    break
                cached += bool(out.get("cached"))
                ready.append(out["timings"]["ready_ms"])
                walls.append(wall)
                time.sleep(0.05)
            row["reopen"] = {"runs": len(ready), "cached": cached, "ready_ms": ready, "wall_ms": walls}
            results.append(row)
    return results


def secs(ms):
    return "–" if ms is None else f"{ms / 1000:.1f}"


def report(results, runs):
    lines = [
        "## `openrun up`: first open and cached re-open",
        "",
        f"`bench/up` ({runs} cached re-opens per fixture), fixture repositories of "
        "tests/python/up/up_fixtures.py, through `openrun serve` on loopback.",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {os.cpu_count()} CPUs, kernel {platform.release()}",
        f"- binary: {os.environ.get('BENCH_UP_BUILD', 'release build')}",
        f"- Debian base (`openrun image build --debian bookworm`, once per server): "
        f"{os.environ.get('BENCH_UP_BASE_S', '?')} s",
        "",
        "| fixture | first open: ready s | check s | total s | check | cached re-opens | ready ms median | ready ms p95 | CLI wall ms median | CLI wall ms p95 |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        f = row["first"]
        if f["exit"] != 0:
            lines.append(f"| {row['fixture']} | failed (exit {f['exit']}): {f.get('error', '')[:80]} | | | | | | | | |")
            continue
        r = row.get("reopen", {})
        ready, walls = r.get("ready_ms") or [0], r.get("wall_ms") or [0]
        check = {True: "passed", False: "FAILED", None: "none"}[f.get("check_passed")]
        cached = f"{r.get('cached', 0)}/{r.get('runs', 0)}"
        lines.append(
            f"| {row['fixture']} | {secs(f.get('ready_ms'))} | {secs(f.get('check_ms'))} | "
            f"{secs(f.get('total_ms'))} | {check} | {cached} | {statistics.median(ready):.0f} | "
            f"{pct(ready, 95):.0f} | {statistics.median(walls):.0f} | {pct(walls, 95):.0f} |"
        )
    lines += [
        "",
        "- first open: the fixture never opened before on this server (its recipe made: the "
        "packages layer, the setup steps, the snapshot), the Debian base image already built "
        "(not counted). Fixtures run in the order of the table and share a packages layer when "
        "their Debian package sets are equal (the devcontainer fixture's is python's). ready = "
        "`timings.ready_ms` (request to a ready sandbox, before the check); total includes the "
        "check (the fixture's test suite).",
        "- cached re-open: `openrun up --json --no-check DIR` of the unchanged fixture, a new "
        "sandbox from the recipe's snapshot each time (deleted between runs, untimed). ready = "
        "the server's `timings.ready_ms`; CLI wall = the whole `openrun up` process (tar of the "
        "directory, upload, workspace sync, answer). Goal: ≤ 1 s to a ready sandbox.",
        "",
    ]
    return "\n".join(lines)


def main():
    bin_, url, key, out_json, runs = sys.argv[1:6]
    kinds = sys.argv[6:] or ["rust", "python", "node", "go", "java", "ruby", "cpp", "devcontainer"]
    runs = int(runs)
    results = measure(bin_, url, key, runs, kinds)
    Path(out_json).write_text(json.dumps(results, indent=1))
    print(report(results, runs))


if __name__ == "__main__":
    main()
