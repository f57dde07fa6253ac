"""Commands: run, exec streams, background processes, stdin and output reconnects."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import openrun
from openrun import Exit, Sandbox, Started, Stderr, Stdout


def test_run_returns_stdout_stderr_and_exit_code(sbx: Sandbox) -> None:
    result = sbx.run("echo out; echo err >&2; exit 3")
    assert result.exit_code == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.signal is None and not result.timed_out and not result.oom_killed
    assert not result.ok
    assert sbx.run("true").ok


def test_run_takes_argv_cwd_and_env(sbx: Sandbox) -> None:
    result = sbx.run(["sh", "-c", 'printf "%s|%s" "$PWD" "$WHO"'], cwd="/tmp", env={"WHO": "sdk"})
    assert result.stdout == "/tmp|sdk"
    # An argv is not a shell line: no word splitting, no globbing.
    assert sbx.run(["echo", "a  *"]).stdout == "a  *\n"


def test_run_check_raises_command_error(sbx: Sandbox) -> None:
    with pytest.raises(openrun.CommandError) as caught:
        sbx.run("echo nope >&2; exit 7", check=True)
    assert caught.value.exit_code == 7
    assert caught.value.stderr == "nope\n"
    assert "nope" in str(caught.value)
    assert sbx.run("echo fine", check=True).stdout == "fine\n"


def test_run_timeout_kills_the_command(sbx: Sandbox) -> None:
    result = sbx.run("echo started; sleep 30", timeout=2)
    assert result.timed_out
    assert result.stdout == "started\n"
    assert not result.ok


def test_a_missing_program_raises_command_not_found(sbx: Sandbox) -> None:
    with pytest.raises(openrun.CommandNotFoundError) as caught:
        sbx.run(["no-such-program-xyz"])
    assert caught.value.code == "command_not_found"
    assert isinstance(caught.value, openrun.NotFoundError)
    # Through the shell it is the shell's 127.
    assert sbx.run("no-such-program-xyz").exit_code == 127


def test_binary_and_split_utf8_output(sbx: Sandbox) -> None:
    # "é" is split across two writes: the callback still gets it whole.
    chunks: list = []
    result = sbx.run(r"printf '\303'; sleep 0.2; printf '\251\377'", on_stdout=chunks.append)
    assert result.stdout_bytes == b"\xc3\xa9\xff"
    assert "".join(chunks) == "é\ufffd"


def test_streaming_callbacks_arrive_while_the_command_runs(sbx: Sandbox) -> None:
    # The command waits for a file that only the callback writes: it can finish only if the
    # callback saw "ready" while the command was still running.
    seen: list = []
    errors: list = []

    def on_stdout(text: str) -> None:
        seen.append(text)
        if "ready" in text:
            sbx.files.write("/tmp/go", "1")

    result = sbx.run(
        "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo done; echo warn >&2",
        timeout=60,
        on_stdout=on_stdout,
        on_stderr=errors.append,
    )
    assert not result.timed_out
    assert result.exit_code == 0
    assert "".join(seen) == "ready\ndone\n"
    assert errors == ["warn\n"]


def test_exec_yields_events_in_order(sbx: Sandbox) -> None:
    events = list(sbx.exec(["sh", "-c", "echo one; echo two >&2; exit 4"]))
    assert isinstance(events[0], Started) and events[0].pid > 0
    assert isinstance(events[-1], Exit) and events[-1].exit_code == 4
    out = b"".join(e.data for e in events if isinstance(e, Stdout))
    err = b"".join(e.data for e in events if isinstance(e, Stderr))
    assert (out, err) == (b"one\n", b"two\n")


def test_exec_streams_before_the_end(sbx: Sandbox) -> None:
    stream = sbx.exec("echo first; while [ ! -e /tmp/release ]; do sleep 0.05; done; echo second", timeout=60)
    first = next(e for e in stream if isinstance(e, Stdout))
    assert first.data == b"first\n"
    sbx.files.write("/tmp/release", "")
    rest = list(stream)
    assert [e.data for e in rest if isinstance(e, Stdout)] == [b"second\n"]
    assert isinstance(rest[-1], Exit) and rest[-1].exit_code == 0


def test_background_process_with_stdin_and_reconnect(sbx: Sandbox, client_args: dict) -> None:
    proc = sbx.start("cat; echo bye", stdin=True)
    assert proc.pid > 0
    proc.send_stdin("hello\n")
    # Follow until the first chunk, then leave: the process keeps running.
    for event in proc.output(follow=True):
        if isinstance(event, Stdout):
            break
    assert proc.stdout_offset == len("hello\n")
    assert proc.status().running
    proc.send_stdin(b"world\n")
    proc.close_stdin()
    result = proc.wait(timeout=30)
    assert result.exit_code == 0
    assert result.stdout == "hello\nworld\nbye\n"
    assert result.pid == proc.pid

    # Another client picks it up by pid and reads only what came after the first chunk.
    other = Sandbox.connect(sbx.id, **client_args)
    try:
        again = other.process(proc.pid)
        events = list(again.output(stdout_since=len("hello\n")))
        assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"world\nbye\n"
        assert isinstance(events[-1], Exit) and events[-1].exit_code == 0
        info = again.status()
        assert info.state == "exited" and info.status is not None and info.status.exit_code == 0
        assert info.stdout_len == len("hello\nworld\nbye\n")
    finally:
        other.close()


def test_start_with_stdin_bytes_closes_the_pipe(sbx: Sandbox) -> None:
    proc = sbx.start(["wc", "-c"], stdin=b"12345")
    assert proc.wait(timeout=30).stdout.strip() == "5"


def test_kill_a_process_and_list_processes(sbx: Sandbox) -> None:
    proc = sbx.start(["sleep", "300"])
    assert proc.pid in [p.pid for p in sbx.processes() if p.running]
    proc.kill(signal.SIGTERM)
    result = proc.wait(timeout=30)
    assert result.signal == signal.SIGTERM
    assert result.exit_code is None
    listed = {p.pid: p for p in sbx.processes()}
    assert listed[proc.pid].state == "exited"
    assert listed[proc.pid].argv == ["sleep", "300"]
    with pytest.raises(openrun.ProcessNotFoundError):
        sbx.process(999999).status()


def test_wait_timeout_is_client_side(sbx: Sandbox) -> None:
    proc = sbx.start(["sleep", "300"])
    started = time.monotonic()
    with pytest.raises(openrun.TimeoutError):
        proc.wait(timeout=0.5)
    assert time.monotonic() - started < 20
    assert proc.status().running
    proc.kill()


def test_a_handle_can_be_used_from_threads(sbx: Sandbox) -> None:
    results: dict = {}

    def work(i: int) -> None:
        results[i] = sbx.run(f"echo {i}").stdout

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i}\n" for i in range(4)}


def test_run_feeds_stdin(sbx: Sandbox) -> None:
    result = sbx.run("tr a-z A-Z; echo err >&2; exit 2", stdin="shout\n")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "SHOUT\n", "err\n")
    assert sbx.run(["wc", "-c"], stdin=bytes(1000)).stdout.strip() == "1000"
    assert sbx.run("cat", stdin="").stdout == ""


def test_stdin_takes_any_bytes_like(sbx: Sandbox) -> None:
    # bytearray and memoryview are bytes too: they were dropped (stdin stayed /dev/null).
    assert sbx.run("cat", stdin=bytearray(b"from a bytearray")).stdout == "from a bytearray"
    assert sbx.run("cat", stdin=memoryview(b"from a view")).stdout == "from a view"
    proc = sbx.start(["wc", "-c"], stdin=bytearray(b"123"))
    assert proc.wait(timeout=30).stdout.strip() == "3"


def test_send_stdin_refuses_what_is_not_text_or_bytes(sbx: Sandbox) -> None:
    proc = sbx.start("cat", stdin=True)
    with pytest.raises(openrun.InvalidArgumentError):
        proc.send_stdin(5)  # type: ignore[arg-type]  # was bytes(5): five NULs
    proc.send_stdin(bytearray(b"ok"))
    proc.close_stdin()
    result = proc.wait(timeout=30)
    assert result.stdout_bytes == b"ok", "nothing but the valid input reached the process"


def test_wait_timeout_is_a_total_deadline(sbx: Sandbox) -> None:
    # Output arrives just before the deadline, then nothing: with a per-read timeout the wait
    # would last about twice the timeout (the read after that output waits a whole timeout).
    proc = sbx.start("sleep 1; echo late; sleep 300")
    started = time.monotonic()
    with pytest.raises(openrun.TimeoutError):
        proc.wait(timeout=1.5)
    elapsed = time.monotonic() - started
    assert elapsed < 2.2, f"wait(timeout=1.5) took {elapsed:.2f} s"
    assert proc.stdout_offset == len("late\n"), "the output before the deadline was read"
    proc.kill()
    # A process that ends before the deadline is waited for across the reopened streams.
    quick = sbx.start("for i in 1 2 3 4 5; do echo $i; sleep 0.2; done")
    assert quick.wait(timeout=30).stdout == "1\n2\n3\n4\n5\n"
