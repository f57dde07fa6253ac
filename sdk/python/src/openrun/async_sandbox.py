"""The asyncio client: :class:`AsyncSandbox` and its :class:`AsyncFiles`,
:class:`AsyncNetwork` and :class:`AsyncProcess` handles. Same surface as
:mod:`openrun.sandbox` (see its docstrings for details); requests are built in
:mod:`openrun._ops`, this module only awaits them.

Output callbacks (``on_stdout``, ``on_stderr``) may be plain functions or coroutine functions.

The streams (``exec``, ``Process.output``, ``files.watch``, ``events(follow=True)``) are async
generators: leaving an ``async for`` early does not close one at once (Python closes an
abandoned async generator only when it is garbage-collected, or at loop shutdown), so its
connection stays open until then. To close it deterministically, wrap it::

    async with contextlib.aclosing(sbx.exec("...")) as events:   # Python 3.10+
        async for event in events:
            break

(or call ``await gen.aclose()``). The command itself keeps running either way.
"""

from __future__ import annotations

import asyncio
import inspect
import signal as _signal
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    Union,
)

from . import _ops
from ._config import resolve
from ._ops import Command, Duration, Size
from ._transport import DEFAULT_TIMEOUT, AsyncTransport
from .errors import ClientClosedError, NotFoundError, SandboxNotFoundError, TimeoutError
from .models import (
    CommandResult,
    Diff,
    Environment,
    Event,
    ExecEvent,
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
from .sandbox import _preview_url

__all__ = ["AsyncSandbox", "AsyncFiles", "AsyncNetwork", "AsyncProcess"]

OutputCallback = Callable[[str], Any]


async def _settle(value: Any) -> None:
    """Awaits what an async output callback returned."""
    if inspect.isawaitable(value):
        await value


class AsyncProcess:
    """A process started in a sandbox (:meth:`AsyncSandbox.start`); see :class:`openrun.Process`."""

    def __init__(self, sandbox: "AsyncSandbox", pid: int):
        self.sandbox = sandbox
        self.pid = pid
        #: Bytes of standard output seen through this handle (where to resume :meth:`output`).
        self.stdout_offset = 0
        #: Bytes of standard error seen through this handle.
        self.stderr_offset = 0

    def __repr__(self) -> str:
        return f"AsyncProcess(sandbox={self.sandbox.id!r}, pid={self.pid})"

    async def status(self) -> ProcessInfo:
        """The process as the sandbox shows it (argv, state, exit status, output sizes)."""
        return await self.sandbox._t.call(_ops.process(self.sandbox.id, self.pid))

    async def output(
        self,
        *,
        follow: bool = False,
        stdout_since: Optional[int] = None,
        stderr_since: Optional[int] = None,
    ) -> AsyncIterator[ExecEvent]:
        """Yields its output chunks from the given byte offsets (default 0), then
        :class:`~openrun.Exit` if it has ended; with ``follow`` until it exits. See
        :meth:`openrun.Process.output`."""
        call = _ops.output(self.sandbox.id, self.pid, stdout_since or 0, stderr_since or 0, follow)
        async for line in self.sandbox._t.stream(call):
            event = _ops.exec_event(line)
            self._advance(event)
            yield event

    def _advance(self, event: ExecEvent) -> None:
        if isinstance(event, Stdout):
            self.stdout_offset = max(self.stdout_offset, event.offset + len(event.data))
        elif isinstance(event, Stderr):
            self.stderr_offset = max(self.stderr_offset, event.offset + len(event.data))

    async def wait(
        self,
        timeout: Optional[float] = None,
        *,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        check: bool = False,
    ) -> CommandResult:
        """Waits for the process to exit; its whole output and exit status. Past ``timeout``
        seconds :class:`~openrun.TimeoutError` is raised (the process keeps running)."""
        collector = OutputCollector(on_stdout, on_stderr, self.pid)

        async def follow() -> None:
            async for event in self.output(follow=True):
                await _settle(collector.feed(event))

        try:
            await asyncio.wait_for(follow(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"process {self.pid} did not exit within {timeout} s") from None
        for value in collector.flush():
            await _settle(value)
        result = collector.result()
        return result.check() if check else result

    async def send_stdin(self, data: Union[str, bytes, bytearray, memoryview]) -> None:
        """Writes to its standard input (it must have been started with ``stdin=True``):
        text or bytes; anything else raises :class:`~openrun.InvalidArgumentError`."""
        await self.sandbox._t.call(_ops.stdin(self.sandbox.id, self.pid, data, False))

    async def close_stdin(self) -> None:
        """Closes its standard input (the program reads end of file)."""
        await self.sandbox._t.call(_ops.stdin(self.sandbox.id, self.pid, b"", True))

    async def kill(self, signal: Union[int, str] = _signal.SIGKILL, *, group: bool = True) -> None:
        """Sends a signal (default ``SIGKILL``; a number or a name like ``"TERM"``) to it, and
        to its process group with ``group``."""
        await self.sandbox._t.call(_ops.signal(self.sandbox.id, self.pid, signal, group))


class AsyncFiles:
    """The files of a sandbox (``sbx.files``); see :class:`openrun.Files`."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sbx = sandbox

    async def read(self, path: str, *, offset: Optional[int] = None, limit: Optional[int] = None) -> bytes:
        """The file's bytes (from ``offset``, at most ``limit``); a missing file raises
        :class:`~openrun.NotFoundError`."""
        return await self._sbx._t.call(_ops.read_file(self._sbx.id, path, offset, limit))

    async def read_text(self, path: str, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file decoded as text."""
        return (await self.read(path)).decode(encoding, errors)

    async def write(
        self,
        path: str,
        data: Union[str, bytes, bytearray, memoryview],
        *,
        mode: Optional[int] = None,
        parents: bool = True,
    ) -> None:
        """Writes a file (text as UTF-8), replacing it; ``parents`` makes missing directories.
        See :meth:`openrun.Files.write` (mode, files over 16 MiB, the 256 MiB limit)."""
        await self._sbx._t.run(_ops.write(self._sbx.id, path, data, mode, parents))

    async def list(self, path: str) -> List[FileInfo]:
        """The entries of a directory."""
        return await self._sbx._t.call(_ops.list_dir(self._sbx.id, path))

    async def stat(self, path: str) -> FileInfo:
        """What is at ``path`` (a link is not followed)."""
        return await self._sbx._t.call(_ops.stat(self._sbx.id, path))

    async def exists(self, path: str) -> bool:
        """Whether something is at ``path``."""
        try:
            await self.stat(path)
        except NotFoundError:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = True) -> None:
        """Makes a directory (with ``parents``, missing parents too and no error if it exists)."""
        await self._sbx._t.call(_ops.mkdir(self._sbx.id, path, parents))

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (a non-empty one with ``recursive``)."""
        await self._sbx._t.call(_ops.remove(self._sbx.id, path, recursive))

    async def move(self, src: str, dst: str) -> None:
        """Renames ``src`` to ``dst``."""
        await self._sbx._t.call(_ops.move(self._sbx.id, src, dst))

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncIterator[FileChange]:
        """Yields the changes in directory ``path`` as they happen (``async for``); see
        :meth:`openrun.Files.watch`."""
        async for line in self._sbx._t.stream(_ops.watch(self._sbx.id, path, recursive)):
            change = _ops.watch_event(path, line)
            if change is None:
                return
            yield change

    async def upload_dir(self, local: str, remote: str) -> UploadResult:
        """Copies a local directory's contents into ``remote`` as one tar archive."""
        return await self._sbx._t.call(_ops.upload_tar(self._sbx.id, remote, _ops.pack_dir(local)))

    async def download_dir(self, remote: str, local: str) -> None:
        """Copies a sandbox directory's contents into a local directory (made if missing)."""
        _ops.unpack_dir(await self._sbx._t.call(_ops.download_tar(self._sbx.id, remote)), local)


class AsyncNetwork:
    """The sandbox's network policy (``sbx.network``); see :class:`openrun.Network`."""

    def __init__(self, sandbox: "AsyncSandbox"):
        self._sbx = sandbox

    async def get(self) -> NetworkPolicy:
        """The current policy (secrets without their values)."""
        return await self._sbx._t.call(_ops.network_get(self._sbx.id))

    async def set(
        self,
        policy: Union[str, Mapping[str, Any], NetworkPolicy, None] = None,
        *,
        mode: Optional[str] = None,
        allow: Optional[Sequence[str]] = None,
        secrets: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> NetworkPolicy:
        """Replaces the policy, e.g. ``await set(mode="allowlist", allow=["pypi.org"])``. A
        :class:`NetworkPolicy` with secrets needs ``secrets=`` (see :meth:`openrun.Network.set`)."""
        body = _ops.network_policy(policy, mode, allow, secrets)
        return await self._sbx._t.call(_ops.network_set(self._sbx.id, body))


class _Creating:
    """What :meth:`AsyncSandbox.create` returns: await it for the sandbox, or use it as
    ``async with AsyncSandbox.create() as sbx:`` (killed on exit)."""

    def __init__(self, coro: Coroutine[Any, Any, "AsyncSandbox"]):
        self._coro = coro
        self._sandbox: Optional[AsyncSandbox] = None

    def __await__(self) -> Generator[Any, None, "AsyncSandbox"]:
        return self._coro.__await__()

    async def __aenter__(self) -> "AsyncSandbox":
        self._sandbox = await self._coro
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


class AsyncSandbox:
    """A sandbox on an openrun server, for asyncio; see :class:`openrun.Sandbox`.

    ``sbx = await AsyncSandbox.create()`` or ``async with AsyncSandbox.create() as sbx:``.
    """

    def __init__(self, sandbox_id: str, transport: AsyncTransport, info: Optional[SandboxInfo] = None):
        self.id = sandbox_id
        self._transport = transport
        self._info = info
        self._closed = False
        transport.retain()
        self.files = AsyncFiles(self)
        self.network = AsyncNetwork(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, server={self._transport.target.url!r})"

    @property
    def _t(self) -> AsyncTransport:
        if self._closed:
            raise ClientClosedError(
                f"the handle of sandbox {self.id} was closed: use AsyncSandbox.connect({self.id!r})"
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
    ) -> _Creating:
        """Creates a sandbox (arguments as :meth:`openrun.Sandbox.create`). Await the result,
        or use it with ``async with``."""
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
        target = resolve(server, api_key)

        async def make() -> AsyncSandbox:
            transport = AsyncTransport(target, request_timeout)
            try:
                info = await transport.call(call)
            except BaseException:
                await transport.close()
                raise
            return cls(info.id, transport, info)

        return _Creating(make())

    @classmethod
    async def connect(
        cls,
        sandbox_id: Union[str, SandboxInfo],
        *,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        request_timeout: Optional[float] = DEFAULT_TIMEOUT,
    ) -> "AsyncSandbox":
        """A handle on an existing sandbox; :class:`~openrun.SandboxNotFoundError` if none."""
        sid = sandbox_id.id if isinstance(sandbox_id, SandboxInfo) else sandbox_id
        transport = AsyncTransport(resolve(server, api_key), request_timeout)
        try:
            info = await transport.call(_ops.get(sid))
        except NotFoundError as e:
            await transport.close()
            raise SandboxNotFoundError(e.message, code=e.code, status=e.status) from None
        except BaseException:
            await transport.close()
            raise
        return cls(info.id, transport, info)

    @classmethod
    async def list(
        cls,
        *,
        labels: Optional[Mapping[str, str]] = None,
        state: Optional[str] = None,
        server: Optional[str] = None,
        api_key: Optional[str] = None,
        page_size: int = 1000,
        request_timeout: Optional[float] = DEFAULT_TIMEOUT,
    ) -> List[SandboxInfo]:
        """The key's sandboxes, oldest first, all pages, filtered by ``labels`` and ``state``;
        ``request_timeout`` bounds each page's request."""
        transport = AsyncTransport(resolve(server, api_key), request_timeout)
        try:
            found: List[SandboxInfo] = []
            cursor: Optional[str] = None
            while True:
                page, cursor = await transport.call(_ops.list_page(labels, state, cursor, page_size))
                found.extend(page)
                if cursor is None:
                    return found
        finally:
            await transport.close()

    async def info(self) -> SandboxInfo:
        """The sandbox resource now."""
        self._info = await self._t.call(_ops.get(self.id))
        return self._info

    async def kill(self) -> bool:
        """Destroys the sandbox: ``True`` if destroyed now, ``False`` if it was already gone."""
        try:
            await self._t.call(_ops.delete(self.id))
        except NotFoundError:
            return False
        return True

    async def set_ttl(self, ttl: Duration) -> SandboxInfo:
        """The sandbox is destroyed ``ttl`` from now."""
        self._info = await self._t.call(_ops.set_ttl(self.id, ttl))
        return self._info

    async def pause(self) -> SandboxInfo:
        """Freezes every process in it until :meth:`resume`."""
        self._info = await self._t.call(_ops.pause(self.id))
        return self._info

    async def resume(self) -> SandboxInfo:
        """Thaws a paused sandbox."""
        self._info = await self._t.call(_ops.resume(self.id))
        return self._info

    async def close(self) -> None:
        """Releases this handle's connections (the sandbox keeps running); the handle then
        raises :class:`~openrun.ClientClosedError`. A sandbox and its forks share one
        connection pool, closed with the last of their handles (see
        :meth:`openrun.Sandbox.close`)."""
        if not self._closed:
            self._closed = True
            await self._transport.release()

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    # ------------------------------------------------------------------------- commands

    async def exec(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
    ) -> AsyncIterator[ExecEvent]:
        """Runs a command and yields its events as they happen (``async for``): started,
        output chunks, exit."""
        async for line in self._t.stream(_ops.exec_stream(self.id, cmd, cwd, env, timeout)):
            yield _ops.exec_event(line)

    async def run(
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
        """Runs a command to its end (see :meth:`openrun.Sandbox.run`, also for ``stdin``);
        callbacks may be coroutine functions."""
        if stdin is not None:
            proc = await self.start(cmd, cwd=cwd, env=env, timeout=timeout, stdin=stdin)
            return await proc.wait(on_stdout=on_stdout, on_stderr=on_stderr, check=check)
        collector = OutputCollector(on_stdout, on_stderr)
        async for event in self.exec(cmd, cwd=cwd, env=env, timeout=timeout):
            await _settle(collector.feed(event))
        for value in collector.flush():
            await _settle(value)
        result = collector.result()
        return result.check() if check else result

    async def start(
        self,
        cmd: Command,
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
        stdin: Union[bool, str, bytes, bytearray, memoryview] = False,
    ) -> AsyncProcess:
        """Starts a command in the background; an :class:`AsyncProcess` handle (``stdin`` as
        :meth:`openrun.Sandbox.start`)."""
        data = None if isinstance(stdin, bool) or stdin is None else _ops.stdin_bytes(stdin)
        pid = await self._t.call(
            _ops.start(self.id, cmd, cwd, env, timeout, stdin is True or data is not None)
        )
        proc = AsyncProcess(self, pid)
        if data is not None:
            await self._t.call(_ops.stdin(self.id, pid, data, True))
        return proc

    def process(self, pid: int) -> AsyncProcess:
        """A handle on a process of this sandbox by pid."""
        return AsyncProcess(self, pid)

    async def processes(self) -> List[ProcessInfo]:
        """The sandbox's processes started through the API, running and exited."""
        return await self._t.call(_ops.processes(self.id))

    # ------------------------------------------------------------------------- images

    async def snapshot(self, name: Optional[str] = None) -> Snapshot:
        """Saves the sandbox's file system as a new image."""
        return await self._t.call(_ops.snapshot(self.id, name))

    async def fork(
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
    ) -> List["AsyncSandbox"]:
        """Snapshots the sandbox and creates ``count`` sandboxes from it (all or none). Their
        handles share this handle's connection pool: close each of them too."""
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
        return [AsyncSandbox(info.id, self._t, info) for info in await self._t.call(call)]

    async def diff(self, path: Optional[str] = None, *, against: Optional[str] = None) -> Diff:
        """What changed in the file system against its image (or ``against``)."""
        return await self._t.call(_ops.diff(self.id, path, against))

    # ------------------------------------------------------------------------- the rest

    async def events(self, since: int = 0, *, follow: bool = False) -> AsyncIterator[Event]:
        """The sandbox's timeline after ``since`` (``async for``); live with ``follow``."""
        call = _ops.events(self.id, since, follow)
        if follow:
            async for line in self._t.stream(call):
                yield _ops.event(line)
        else:
            for event in await self._t.call(call):
                yield event

    async def environment(self, *, refresh: bool = False) -> Environment:
        """OS, architecture, limits, network, ``PATH`` and tools inside the sandbox."""
        return await self._t.call(_ops.environment(self.id, refresh))

    async def preview(self, port: int, *, ttl: Optional[Duration] = None) -> PreviewToken:
        """A token opening ``port`` of this sandbox over HTTP, with its URLs."""
        return await self._t.call(_ops.preview(self.id, port, ttl))

    async def preview_url(self, port: int, *, ttl: Optional[Duration] = None) -> str:
        """A URL that opens ``port`` of this sandbox in a browser."""
        return _preview_url(self.server, await self.preview(port, ttl=ttl))
