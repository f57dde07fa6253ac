"""envd's process service with a terminal, through the official e2b SDK: `pty.create`,
`send_stdin`, `resize`, `connect`, `kill`."""

import threading
import time

import pytest
from e2b import CommandExitException
from e2b.sandbox.commands.command_handle import PtySize


class Reader:
    """Collects a PTY handle's output on a thread."""

    def __init__(self, handle):
        self.output = bytearray()
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(handle,), daemon=True)
        self._thread.start()

    def _run(self, handle):
        try:
            for _, _, pty in handle:
                if pty:
                    self.output.extend(pty)
        except Exception as e:  # the stream ending with an error (a kill) is fine here
            self.error = e

    def wait_for(self, text, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text.encode() in self.output:
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never came; output: {bytes(self.output)!r}")

    def join(self, timeout=15):
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def test_pty_create_send_stdin_resize_and_kill(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), envs={"H2_PTY": "yes"})
    assert handle.pid > 0
    reader = Reader(handle)
    sandbox.pty.send_stdin(handle.pid, b"echo mark-$((6*7)) $H2_PTY; stty size\n")
    reader.wait_for("mark-42 yes")
    reader.wait_for("24 80")
    sandbox.pty.resize(handle.pid, PtySize(rows=40, cols=100))
    sandbox.pty.send_stdin(handle.pid, b"stty size\n")
    reader.wait_for("40 100")
    # A terminal: the shell sees one.
    sandbox.pty.send_stdin(handle.pid, b"test -t 0 && echo is-a-tty\n")
    reader.wait_for("is-a-tty")
    assert sandbox.pty.kill(handle.pid) is True
    reader.join()
    assert sandbox.pty.kill(handle.pid) is False


def test_pty_exit_ends_the_stream_with_the_code(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(handle.pid, b"exit 5\n")
    with pytest.raises(CommandExitException) as raised:
        handle.wait()
    assert raised.value.exit_code == 5


def test_pty_connect_gets_live_output(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80))
    handle.disconnect()
    again = sandbox.pty.connect(handle.pid)
    reader = Reader(again)
    sandbox.pty.send_stdin(handle.pid, b"echo after-$((1+1))\n")
    reader.wait_for("after-2")
    assert sandbox.pty.kill(handle.pid) is True
    reader.join()


def test_pty_timeout_kills_it(sandbox):
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=2)
    started = time.monotonic()
    with pytest.raises(Exception):
        handle.wait()
    assert time.monotonic() - started < 10
    time.sleep(1)
    assert all(p.pid != handle.pid for p in sandbox.commands.list())
