"""Writes an OCI bundle for `runc run` with the same root as bench/run's bwrap command: the
host's /usr read-only, bin/lib/lib64/sbin symlinks into it, /proc, a minimal /dev, a tmpfs /tmp;
new pid, network, ipc, uts, mount and cgroup namespaces; no terminal.

    python3 bench/runc_bundle.py DIR [ARG...]      (default args: /usr/bin/true)
"""
import json
import os
import sys


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    bundle, args = sys.argv[1], sys.argv[2:] or ["/usr/bin/true"]
    root = os.path.join(bundle, "rootfs")
    for d in ["usr", "proc", "dev", "tmp"]:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for name in ["bin", "lib", "lib64", "sbin"]:
        link = os.path.join(root, name)
        if not os.path.lexists(link):
            os.symlink("usr/" + name, link)
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "bench",
        "mounts": [
            {"destination": "/usr", "type": "bind", "source": "/usr",
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in
                           ["pid", "network", "ipc", "uts", "mount", "cgroup"]],
        },
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


main()
