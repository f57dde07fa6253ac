"""The timeline: what was done shows up, in order, also live."""

from __future__ import annotations

from openrun import Sandbox


def test_events_record_what_was_done(sbx: Sandbox) -> None:
    sbx.run(["sh", "-c", "exit 5"])
    sbx.files.write("/root/note.txt", "abc")
    sbx.files.mkdir("/root/dir")
    sbx.files.move("/root/note.txt", "/root/dir/note.txt")
    events = list(sbx.events())
    kinds = [e.kind for e in events]
    assert kinds[0] == "sandbox.create"
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    execs = [e for e in events if e.kind == "process.exec"]
    assert execs and execs[-1].payload["argv"] == ["sh", "-c", "exit 5"]
    exits = [e for e in events if e.kind == "process.exit"]
    assert exits and exits[-1].payload["code"] == 5
    writes = [e for e in events if e.kind == "file.write"]
    assert writes[-1].payload == {"path": "/root/note.txt", "bytes": 3}
    assert "file.mkdir" in kinds and "file.move" in kinds
    assert all(e.time is not None and e.actor for e in events)
    # `since` skips what was already seen.
    last = events[-1].seq
    sbx.run("true")
    newer = list(sbx.events(since=last))
    assert newer and all(e.seq > last for e in newer)
    assert [e.kind for e in newer][:2] == ["process.exec", "process.exit"]


def test_followed_events_arrive_live_and_end_with_the_sandbox(sbx: Sandbox) -> None:
    seen = []
    for event in sbx.events(follow=True):
        seen.append(event.kind)
        if event.kind == "sandbox.create":
            # Written after the stream began: it must arrive through it.
            sbx.files.write("/root/live.txt", "x")
        elif event.kind == "file.write":
            # The stream ends on its own once the sandbox is deleted.
            assert sbx.kill()
    assert seen[0] == "sandbox.create"
    assert "file.write" in seen
    assert seen[-1] == "sandbox.delete"
