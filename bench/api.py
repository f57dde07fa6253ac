"""Times the HTTP API of a running `openrun serve`: create, exec `true`, delete, one sandbox
after another over one keep-alive connection, like an SDK would. Writes the samples (ms) as JSON.

    python3 bench/api.py URL KEY RUNS OUT.json
"""
import http.client
import json
import sys
import time
import urllib.parse


def main():
    url, key, runs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}

    def call(method, path, body=None, expect=200):
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        data = res.read()
        if res.status != expect:
            raise SystemExit(f"{method} {path}: {res.status} {data[:200]!r}")
        return data

    samples = {"create": [], "exec true": [], "create + exec true": [], "delete": []}
    for i in range(runs + 5):
        t0 = time.perf_counter()
        sandbox = json.loads(call("POST", "/v1/sandboxes", b"{}", 201))
        t1 = time.perf_counter()
        lines = call("POST", f"/v1/sandboxes/{sandbox['id']}/exec", b'{"cmd":["true"]}')
        t2 = time.perf_counter()
        last = json.loads(lines.splitlines()[-1])
        if last.get("type") != "exit" or last.get("code") != 0:
            raise SystemExit(f"exec true ended with {last}")
        call("DELETE", f"/v1/sandboxes/{sandbox['id']}", expect=204)
        t3 = time.perf_counter()
        if i < 5:  # warm-up
            continue
        samples["create"].append((t1 - t0) * 1000)
        samples["exec true"].append((t2 - t1) * 1000)
        samples["create + exec true"].append((t2 - t0) * 1000)
        samples["delete"].append((t3 - t2) * 1000)
        time.sleep(0.02)  # like --prepare in bench/run: let asynchronous teardown settle
    with open(out, "w") as f:
        json.dump(samples, f)


main()
