"""Snapshots, forks and diffs."""

from __future__ import annotations

import uuid

import pytest

import openrun
from openrun import Sandbox


def test_snapshot_fork_and_diff(sbx: Sandbox, client_args: dict, cleanup: list) -> None:
    sbx.files.write("/root/state.txt", "step 1\n")
    sbx.files.write("/etc/motd-sdk", "hello\n")

    diff = sbx.diff()
    kinds = {c.path: c.kind for c in diff.changes}
    assert kinds.get("/root/state.txt") == "added"
    assert kinds.get("/etc/motd-sdk") == "added"
    assert "+step 1" in diff.patch
    assert not diff.truncated
    assert [c.path for c in sbx.diff("/etc").changes] == ["/etc/motd-sdk"]

    name = f"sdk-snap-{uuid.uuid4().hex[:8]}"
    snap = sbx.snapshot(name)
    assert snap.image.startswith(name)
    assert snap.layers and snap.bytes > 0
    with pytest.raises(openrun.AlreadyExistsError) as caught:
        sbx.snapshot(name)
    assert caught.value.status == 409

    from_snapshot = Sandbox.create(image=snap, **client_args)
    cleanup.append(from_snapshot)
    assert from_snapshot.files.read_text("/root/state.txt") == "step 1\n"
    assert from_snapshot.info().image == snap.image
    # Against its own image (the snapshot) nothing changed yet.
    assert from_snapshot.diff().changes == []

    forks = sbx.fork(2, labels={"fork": "yes"})
    cleanup.extend(forks)
    assert len(forks) == 2 and len({f.id for f in forks} | {sbx.id}) == 3
    for i, fork in enumerate(forks):
        assert fork.info().labels == {"fork": "yes"}
        assert fork.files.read_text("/root/state.txt") == "step 1\n"
        fork.files.write("/root/state.txt", f"fork {i}\n")
    # Forks are independent of each other and of their parent.
    assert [f.files.read_text("/root/state.txt") for f in forks] == ["fork 0\n", "fork 1\n"]
    assert sbx.files.read_text("/root/state.txt") == "step 1\n"
    fork_diff = forks[0].diff()
    assert [(c.path, c.kind) for c in fork_diff.changes] == [("/root/state.txt", "modified")]
    assert "-step 1" in fork_diff.patch and "+fork 0" in fork_diff.patch


def test_fork_count_out_of_range_is_invalid(sbx: Sandbox) -> None:
    with pytest.raises(openrun.InvalidArgumentError) as caught:
        sbx.fork(0)
    assert caught.value.status == 400
