"""The synchronous client: :class:`Sandbox`, its :class:`Files`, :class:`Network` and
:class:`Process` handles. Requests are built in :mod:`openrun._ops`; this module only sends
them (the async twin is :mod:`openrun.async_sandbox`)."""

from __future__ import annotations

import signal as _signal
import time
from types import TracebackType
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Type, Union

from . import _ops
from ._config import resolve
from ._ops import Command, Duration, Size
from ._transport import DEFAULT_TIMEOUT, SyncTransport
from .errors import ClientClosedError, NotFoundError, SandboxNotFoundError, TimeoutError
from .models import (
    CommandResult,
    Diff,
    Environment,
    Event,
    ExecEvent,
    Exit,
    FileChange,
    FileInfo,
    NetworkPolicy,
    OutputCollector,
    PreviewToken,
    ProcessInfo,
    SandboxInfo,
    Snapshot,
    Stderr,
    Stdout,
    UploadResult,
)

__all__ = ["Sandbox", "Files", "Network", "Process"]

OutputCallback = Callable[[str], Any]


class Process:
    """A process started in a sandbox (:meth:`Sandbox.start`, :meth:`Sandbox.process`).

    Its output is kept by the sandbox: :meth:`output` reads it from any offset, also after a
    reconnect, and :meth:`wait` collects all of it with the exit status.
    """

    def __init__(self, sandbox: "Sandbox", pid: int):
        self.sandbox = sandbox
        self.pid = pid
        #: Bytes of standard output seen through this handle (where to resume :meth:`output`).
        self.stdout_offset = 0
        #: Bytes of standard error seen through this handle.
        self.stderr_offset = 0

    def __repr__(self) -> str:
        return f"Process(sandbox={self.sandbox.id!r}, pid={self.pid})"

    def status(self) -> ProcessInfo:
        """The process as the sandbox shows it (argv, state, exit status, output sizes)."""
        return self.sandbox._t.call(_ops.process(self.sandbox.id, self.pid))

    def output(
        self,
        *,
        follow: bool = False,
        stdout_since: Optional[int] = None,
        stderr_since: Optional[int] = None,
    ) -> Iterator[ExecEvent]:
        """Yields its :class:`Stdout`/:class:`Stderr` chunks from the given byte offsets
        (default: 0, everything), then :class:`Exit` if it has ended.

        Without ``follow`` it stops at the output present now; with ``follow`` it goes on
        until the process exits. :attr:`stdout_offset` and :attr:`stderr_offset` advance as
        chunks pass, so ``output(stdout_since=p.stdout_offset, ...)`` resumes after a break.
        """
        call = _ops.output(self.sandbox.id, self.pid, stdout_since or 0, stderr_since or 0, follow)
        for line in self.sandbox._t.stream(call):
            event = _ops.exec_event(line)
            self._advance(event)
            yield event

    def _advance(self, event: ExecEvent) -> None:
        if isinstance(event, Stdout):
            self.stdout_offset = max(self.stdout_offset, event.offset + len(event.data))
        elif isinstance(event, Stderr):
            self.stderr_offset = max(self.stderr_offset, event.offset + len(event.data))

    def wait(
        self,
        timeout: Optional[float] = None,
        *,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        check: bool = False,
    ) -> CommandResult:
        """Waits for the process to exit; its whole output and exit status.

        Args:
            timeout: Seconds to wait at most (client side; the process keeps running): past
                it, :class:`~openrun.TimeoutError` is raised.
            on_stdout: Called with each piece of standard output text as it arrives.
            on_stderr: Called with each piece of standard error text as it arrives.
            check: Raise :class:`~openrun.CommandError` unless it exited with code 0.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        late = TimeoutError(f"process {self.pid} did not exit within {timeout} s")
        collector = OutputCollector(on_stdout, on_stderr, self.pid)
        # The total wait is bounded by the deadline, not each read: httpx's read timeout is
        # per read, so the stream is opened again (from the offsets read so far) whenever the
        # time left has fallen below 90% of the open stream's timeout. No read then outlasts
        # the deadline by more than a ninth of the time that was left.
        since = [0, 0]
        while collector.exit is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise late
            call = _ops.output(self.sandbox.id, self.pid, since[0], since[1], True)
            reopen = False
            try:
                for line in self.sandbox._t.stream(call, read_timeout=left):
                    event = _ops.exec_event(line)
                    self._advance(event)
                    collector.feed(event)
                    if isinstance(event, Stdout):
                        since[0] = event.offset + len(event.data)
                    elif isinstance(event, Stderr):
                        since[1] = event.offset + len(event.data)
                    elif isinstance(event, Exit):
                        break
                    if left is not None and deadline is not None:
                        now_left = deadline - time.monotonic()
                        if now_left <= 0:
                            raise late
                        if now_left < 0.9 * left:
                            reopen = True
                            break
            except TimeoutError:
                if deadline is None:
                    raise
                if time.monotonic() >= deadline:
                    raise late from None
                continue  # a read timed out a hair early: the loop checks the deadline
            if not reopen and collector.exit is None:
                break  # the stream ended without the exit: result() says so
        collector.flush()
        result = collector.result()
        return result.check() if check else result

    def send_stdin(self, data: Union[str, bytes, bytearray, memoryview]) -> None:
        """Writes to its standard input (it must have been started with ``stdin=True``):
        text (as UTF-8) or bytes; anything else raises :class:`~openrun.InvalidArgumentError`."""
        self.sandbox._t.call(_ops.stdin(self.sandbox.id, self.pid, data, False))

    def close_stdin(self) -> None:
        """Closes its standard input (the program reads end of file)."""
        self.sandbox._t.call(_ops.stdin(self.sandbox.id, self.pid, b"", True))

    def kill(self, signal: Union[int, str] = _signal.SIGKILL, *, group: bool = True) -> None:
        """Sends a signal (default ``SIGKILL``; a number, ``signal.SIGTERM`` or a name like
        ``"TERM"``) to it, and to its process group with ``group``."""
        self.sandbox._t.call(_ops.signal(self.sandbox.id, self.pid, signal, group))


class Files:
    """The files of a sandbox (``sbx.files``). Paths are resolved inside the sandbox."""

    def __init__(self, sandbox: "Sandbox"):
        self._sbx = sandbox

    def read(self, path: str, *, offset: Optional[int] = None, limit: Optional[int] = None) -> bytes:
        """The file's bytes (from ``offset``, at most ``limit``). A missing file raises
        :class:`~openrun.NotFoundError`."""
        return self._sbx._t.call(_ops.read_file(self._sbx.id, path, offset, limit))

    def read_text(self, path: str, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file decoded as text."""
        return self.read(path).decode(encoding, errors)

    def write(
        self,
        path: str,
        data: Union[str, bytes, bytearray, memoryview],
        *,
        mode: Optional[int] = None,
        parents: bool = True,
    ) -> None:
        """Writes a file (text as UTF-8), replacing it; ``parents`` makes missing directories
        (without it, a missing directory raises :class:`~openrun.NotFoundError`).

        ``mode`` sets the permission bits (an ``int`` like ``0o755``); without it a new file
        gets ``0o644`` and an existing one keeps its mode. Files over 16 MiB go as a one-file
        tar archive, at most 256 MiB (the server's limit; beyond it
        :class:`~openrun.TooLargeError`); such a write is not atomic.
        """
        self._sbx._t.run(_ops.write(self._sbx.id, path, data, mode, parents))

    def list(self, path: str) -> List[FileInfo]:
        """The entries of a directory."""
        return self._sbx._t.call(_ops.list_dir(self._sbx.id, path))

    def stat(self, path: str) -> FileInfo:
        """What is at ``path`` (a link is not followed)."""
        return self._sbx._t.call(_ops.stat(self._sbx.id, path))

    def exists(self, path: str) -> bool:
        """Whether something is at ``path``."""
        try:
            self.stat(path)
        except NotFoundError:
            return False
        return True

    def mkdir(self, path: str, *, parents: bool = True) -> None:
        """Makes a directory (with ``parents``, missing parents too and no error if it exists)."""
        self._sbx._t.call(_ops.mkdir(self._sbx.id, path, parents))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (a non-empty one with ``recursive``)."""
        self._sbx._t.call(_ops.remove(self._sbx.id, path, recursive))

    def move(self, src: str, dst: str) -> None:
        """Renames ``src`` to ``dst``."""
        self._sbx._t.call(_ops.move(self._sbx.id, src, dst))

    def watch(self, path: str, *, recursive: bool = False) -> Iterator[FileChange]:
        """Yields the changes in directory ``path`` (and its subdirectories with ``recursive``)
        as they happen: :class:`FileChange` ``(name, kind, path)``. It goes on until you stop
        iterating, or ends when the directory is removed or the sandbox stops. A missing
        directory raises :class:`~openrun.NotFoundError`, a file ``not_a_directory``."""
        for line in self._sbx._t.stream(_ops.watch(self._sbx.id, path, recursive)):
            change = _ops.watch_event(path, line)
            if change is None:
                return
            yield change

    def upload_dir(self, local: str, remote: str) -> UploadResult:
        """Copies a local directory's contents into ``remote`` (made if missing) as one tar
        archive (at most 256 MiB, the server's limit: :class:`~openrun.TooLargeError` beyond
        it). Files and directories only; symlinks and devices are skipped, hard-linked files
        go as separate copies."""
        return self._sbx._t.call(_ops.upload_tar(self._sbx.id, remote, _ops.pack_dir(local)))

    def download_dir(self, remote: str, local: str) -> None:
        """Copies a sandbox directory's contents into a local directory (made if missing).
        Links, devices and fifos are left out."""
        _ops.unpack_dir(self._sbx._t.call(_ops.download_tar(self._sbx.id, remote)), local)


class Network:
    """The sandbox's network policy (``sbx.network``)."""

    def __init__(self, sandbox: "Sandbox"):
        self._sbx = sandbox

    def get(self) -> NetworkPolicy:
        """The current policy (secrets without their values)."""
        return self._sbx._t.call(_ops.network_get(self._sbx.id))

    def set(
        self,
        policy: Union[str, Mapping[str, Any], NetworkPolicy, None] = None,
        *,
        mode: Optional[str] = None,
        allow: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> NetworkPolicy:
        """Replaces the policy, e.g. ``set(mode="allowlist", allow=["pypi.org"])``.

        ``policy`` may be a mode, a dict as the API takes it or a :class:`NetworkPolicy`;
        ``mode``, ``allow`` and ``secrets`` (dicts ``{name, value, hosts, header?, format?}``)
        go over it. A policy the server cannot apply raises
        :class:`~openrun.InvalidNetworkPolicyError`.

        The server never shows secret values, so a :class:`NetworkPolicy` from :meth:`get`
        that has secrets cannot be sent back as it is: ``set(network.get(), ...)`` then raises
        :class:`~openrun.InvalidArgumentError` unless ``secrets=`` is given (the secrets with
        their values, or ``[]`` to drop them), instead of dropping them silently.
        """
        body = _ops.network_policy(policy, mode, allow, secrets)
        return self._sbx._t.call(_ops.network_set(self._sbx.id, body))


class Sandbox:
    """A sandbox on an openrun server.

    Make one with :meth:`create` (a context manager: the sandbox is killed on exit), find
    existing ones with :meth:`list` and :meth:`connect`.

    Attributes:
        id: The sandbox id.
        files: Its :class:`Files`.
        network: Its :class:`Network` policy.
    """

    def __init__(self, sandbox_id: str, transport: SyncTransport, info: Optional[SandboxInfo] = None):
        self.id = sandbox_id
        self._transport = transport
        self._info = info
        self._closed = False
        transport.retain()
        self.files = Files(self)
        self.network = Network(self)

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, server={self._transport.target.url!r})"

    @property
    def _t(self) -> SyncTransport:
        if self._closed:
            raise ClientClosedError(
                f"the handle of sandbox {self.id} was closed: use Sandbox.connect({self.id!r})"
            )
        return self._transport

    @property
    def server(self) -> str:
        """The server's URL."""
        return self._transport.target.url

    # ------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls,
        image: Union[str, Snapshot] = "host",
        *,
        memory: Optional[Size] = None,
        cpus: Union[int, float, str, None] = None,
        pids: Optional[int] = None,
        disk: Optional[Size] = None,
        open_files: Optional[int] = None,
        ttl: Optional[Duration] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        network: Union[str, Mapping[str, Any], NetworkPolicy, None] = None,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = DEFAULT_TIMEOUT,
    ) -> "Sandbox":
        """Creates a sandbox.

        Args:
            image: ``host`` (the host's ``/usr``), an image of the server's store, or a
                :class:`Snapshot`.
            memory: Memory limit: bytes or ``"512M"`` (default: the server's).
            cpus: CPU limit, e.g. ``1.5``.
            pids: Process limit.
            disk: Quota of the writable layer: bytes or ``"10G"``.
            open_files: Open files per process.
            ttl: Lifetime: seconds, a ``timedelta`` or ``"15m"`` (default 15 minutes).
            env: Environment of every process.
            labels: Labels to find it by (:meth:`list`).
            network: Network policy: a mode (``"none"``, ``"allowlist"``, ``"open"``) or a
                dict ``{"mode", "allow", "secrets"}``.
            server: The server's URL (else ``$OPENRUN_SERVER``, the config file, the local
                server's ``local.json``).
            api_key: The API key (else ``$OPENRUN_API_KEY``, the config file, ``local.json``).
            request_timeout: Seconds a request may wait for its answer (``None``: forever).
                Streams, and this create itself, wait for their answer however long it
                takes: the server finishes a create whose client left, so a timeout here
                would leave a sandbox nobody has a handle on. For them it bounds connecting
                only. (Interrupted anyway, e.g. by Ctrl-C, the create deletes the sandbox the
                server goes on to make; a second interrupt stops that clean-up.)

        Raises:
            InvalidArgumentError: A value the server refuses (the message names it).
            AuthenticationError: No key, or one the server does not know.
            RateLimitedError: The server is at capacity (see ``retry_after``).
        """
        transport = SyncTransport(resolve(server, api_key), request_timeout)
        try:
            call = _ops.create(
                image=image,  # type: ignore[arg-type]
                memory=memory,
                cpus=cpus,
                pids=pids,
                disk=disk,
                open_files=open_files,
                ttl=ttl,
                env=env,
                labels=labels,
                network=network,
            )
            info = transport.call(call)
        except BaseException:
            transport.close()
            raise
        return cls(info.id, transport, info)

    @classmethod
    def connect(
        cls,
        sandbox_id: Union[str, SandboxInfo],
        *,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = DEFAULT_TIMEOUT,
    ) -> "Sandbox":
        """A handle on an existing sandbox (by id or :class:`SandboxInfo`).

        Raises:
            SandboxNotFoundError: No such sandbox for this key (a :class:`NotFoundError`).
        """
        sid = sandbox_id.id if isinstance(sandbox_id, SandboxInfo) else sandbox_id
        transport = SyncTransport(resolve(server, api_key), request_timeout)
        try:
            info = transport.call(_ops.get(sid))
        except NotFoundError as e:
            transport.close()
            raise SandboxNotFoundError(e.message, code=e.code, status=e.status) from None
        except BaseException:
            transport.close()
            raise
        return cls(info.id, transport, info)

    @classmethod
    def list(
        cls,
        *,
        labels: Optional[Mapping[str, str]] = None,
        state: Optional[str] = None,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        page_size: int = 1000,
        request_timeout: Optional[float] = DEFAULT_TIMEOUT,
    ) -> List[SandboxInfo]:
        """The key's sandboxes, oldest first, all pages: those with every label of
        ``labels`` and, if given, in ``state`` (``running``, ``paused``, ...). The server is
        asked ``page_size`` (1 to 1000) at a time; ``request_timeout`` bounds each page's
        request."""
        transport = SyncTransport(resolve(server, api_key), request_timeout)
        try:
            found: List[SandboxInfo] = []
            cursor: Optional[str] = None
            while True:
                page, cursor = transport.call(_ops.list_page(labels, state, cursor, page_size))
                found.extend(page)
                if cursor is None:
                    return found
        finally:
            transport.close()

    def info(self) -> SandboxInfo:
        """The sandbox resource now (state, limits, expiry, labels, ...)."""
        self._info = self._t.call(_ops.get(self.id))
        return self._info

    def kill(self) -> bool:
        """Destroys the sandbox. ``True`` if it was destroyed now, ``False`` if it was already
        gone. Its timeline stays readable (:meth:`events`)."""
        try:
            self._t.call(_ops.delete(self.id))
        except NotFoundError:
            return False
        return True

    def set_ttl(self, ttl: Duration) -> SandboxInfo:
        """The sandbox is destroyed ``ttl`` from now (seconds, ``timedelta`` or ``"30m"``)."""
        self._info = self._t.call(_ops.set_ttl(self.id, ttl))
        return self._info

    def pause(self) -> SandboxInfo:
        """Freezes every process in it; commands and files then raise
        :class:`~openrun.SandboxPausedError` until :meth:`resume`."""
        self._info = self._t.call(_ops.pause(self.id))
        return self._info

    def resume(self) -> SandboxInfo:
        """Thaws a paused sandbox."""
        self._info = self._t.call(_ops.resume(self.id))
        return self._info

    def close(self) -> None:
        """Releases this handle's connections (the sandbox keeps running); the handle then
        raises :class:`~openrun.ClientClosedError`. A sandbox and its forks share one
        connection pool, closed with the last of their handles: close each handle (or use
        them as context managers). :meth:`kill` does not close the handle, so that the
        killed sandbox's timeline stays readable through it."""
        if not self._closed:
            self._closed = True
            self._transport.release()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            self.kill()
        finally:
            self.close()

    # ------------------------------------------------------------------------- commands

    def exec(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
    ) -> Iterator[ExecEvent]:
        """Runs a command and yields its events as they happen: :class:`Started`, then
        :class:`Stdout`/:class:`Stderr` chunks, then :class:`Exit`.

        ``cmd`` is a shell line (run with ``sh -c``) or an argv list. A program that cannot
        start raises (e.g. :class:`~openrun.CommandNotFoundError`); a sandbox killed while
        it runs raises :class:`~openrun.SandboxLostError` (a
        :class:`~openrun.SandboxNotRunningError`). Leaving the loop early closes the stream
        when the generator is closed: at once with ``break`` in CPython (or call
        ``close()``); the command keeps running either way.
        """
        for line in self._t.stream(_ops.exec_stream(self.id, cmd, cwd, env, timeout)):
            yield _ops.exec_event(line)

    def run(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        check: bool = False,
        stdin: Union[str, bytes, bytearray, memoryview, None] = None,
    ) -> CommandResult:
        """Runs a command to its end.

        Args:
            cmd: A shell line (run with ``sh -c``) or an argv list.
            cwd: Working directory inside the sandbox.
            env: Extra environment variables.
            timeout: The server kills the command after this long (seconds or ``"30s"``);
                the result then has ``timed_out=True``.
            on_stdout: Called with each piece of standard output text as it arrives.
            on_stderr: Called with each piece of standard error text as it arrives.
            check: Raise :class:`~openrun.CommandError` unless it exited with code 0.
            stdin: Text or bytes (``bytes``, ``bytearray``, ``memoryview``) fed to its standard
                input (then closed); without it, stdin is ``/dev/null``. (It then runs as a
                background process that is waited for.) Anything else raises
                :class:`~openrun.InvalidArgumentError`.

        Returns:
            A :class:`CommandResult` (``exit_code``, ``stdout``, ``stderr``, ``signal``,
            ``timed_out``, ``oom_killed``).

        Raises:
            SandboxLostError: The sandbox was killed (or expired) while the command ran; a
                :class:`~openrun.SandboxNotRunningError`, so ``except (NotFoundError,
                SandboxNotRunningError)`` covers a sandbox gone before or during the call.
        """
        if stdin is not None:
            proc = self.start(cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin)
            return proc.wait(on_stdout=on_stdout, on_stderr=on_stderr, check=check)
        collector = OutputCollector(on_stdout, on_stderr)
        for event in self.exec(cmd, cwd=cwd, env=env, timeout=timeout):
            collector.feed(event)
        collector.flush()
        result = collector.result()
        return result.check() if check else result

    def start(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
        stdin: Union[bool, str, bytes, bytearray, memoryview] = False,
    ) -> Process:
        """Starts a command in the background; a :class:`Process` handle.

        ``stdin=True`` keeps a pipe open for :meth:`Process.send_stdin`; text or bytes are
        written to it and the pipe is closed. With ``False`` (or ``None``) stdin is
        ``/dev/null``. Anything else raises :class:`~openrun.InvalidArgumentError`.
        """
        data = None if isinstance(stdin, bool) or stdin is None else _ops.stdin_bytes(stdin)
        pid = self._t.call(_ops.start(self.id, cmd, cwd, env, timeout, stdin is True or data is not None))
        proc = Process(self, pid)
        if data is not None:
            self._t.call(_ops.stdin(self.id, pid, data, True))
        return proc

    def process(self, pid: int) -> Process:
        """A handle on a process of this sandbox by pid (e.g. after a reconnect)."""
        return Process(self, pid)

    def processes(self) -> List[ProcessInfo]:
        """The sandbox's processes started through the API, running and exited."""
        return self._t.call(_ops.processes(self.id))

    # ------------------------------------------------------------------------- images

    def snapshot(self, name: Optional[str] = None) -> Snapshot:
        """Saves the sandbox's file system as a new image (``name[:tag]``, default
        ``snap-<id>-<n>``); ``Sandbox.create(image=snapshot)`` starts from it.

        Raises:
            AlreadyExistsError: ``name`` is taken.
        """
        return self._t.call(_ops.snapshot(self.id, name))

    def fork(
        self,
        count: int = 1,
        *,
        name: Optional[str] = None,
        memory: Optional[Size] = None,
        cpus: Union[int, float, str, None] = None,
        pids: Optional[int] = None,
        ttl: Optional[Duration] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        network: Union[str, Mapping[str, Any], NetworkPolicy, None] = None,
    ) -> List["Sandbox"]:
        """Snapshots the sandbox and creates ``count`` (1 to 100) sandboxes from it, all or
        none. Limits and env default to this sandbox's; the network to ``none``. The forks
        are not killed with this sandbox: kill them (or use them as context managers). Their
        handles share this handle's connection pool: it closes once every one of them is
        closed (``close()`` or the context manager), so close each fork's handle too."""
        call = _ops.fork(
            self.id,
            count=count,
            name=name,
            memory=memory,
            cpus=cpus,
            pids=pids,
            ttl=ttl,
            env=env,
            labels=labels,
            network=network,
        )
        return [Sandbox(info.id, self._t, info) for info in self._t.call(call)]

    def diff(self, path: Optional[str] = None, *, against: Optional[str] = None) -> Diff:
        """What changed in the file system (under ``path``) against its image (or the image
        ``against``): the changed paths and a unified patch of text files."""
        return self._t.call(_ops.diff(self.id, path, against))

    # ------------------------------------------------------------------------- the rest

    def events(self, since: int = 0, *, follow: bool = False) -> Iterator[Event]:
        """The sandbox's timeline after sequence number ``since``: creates, commands, file
        writes, network decisions, ... With ``follow`` it goes on live and ends when the
        sandbox is deleted or stopped (or when you stop iterating and the generator is
        closed)."""
        call = _ops.events(self.id, since, follow)
        if follow:
            for line in self._t.stream(call):
                yield _ops.event(line)
        else:
            yield from self._t.call(call)

    def environment(self, *, refresh: bool = False) -> Environment:
        """OS, architecture, limits, network, ``PATH`` and tools inside the sandbox (probed
        once and cached by the server; ``refresh`` probes again)."""
        return self._t.call(_ops.environment(self.id, refresh))

    def preview(self, port: int, *, ttl: Optional[Duration] = None) -> PreviewToken:
        """A token opening ``port`` of this sandbox over HTTP to anyone holding it (default
        1 hour, at most 7 days), with its URLs."""
        return self._t.call(_ops.preview(self.id, port, ttl))

    def preview_url(self, port: int, *, ttl: Optional[Duration] = None) -> str:
        """A URL that opens ``port`` of this sandbox in a browser (see :meth:`preview`)."""
        return _preview_url(self.server, self.preview(port, ttl=ttl))


def _preview_url(server: str, token: PreviewToken) -> str:
    url = token.host_url or token.path_url
    return url if "://" in url else server + url
