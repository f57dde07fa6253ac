"""Plain data returned by the SDK, shared by the sync and async clients.

Each model is a frozen dataclass built from the server's JSON by ``from_json``; ``raw`` keeps
the JSON as sent, so fields a newer server adds are not lost.
"""

from __future__ import annotations

import codecs
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from .errors import CommandError, ConnectionError

__all__ = [
    "Limits",
    "SandboxInfo",
    "CommandResult",
    "Started",
    "Stdout",
    "Stderr",
    "Exit",
    "ExecEvent",
    "ProcessStatus",
    "ProcessInfo",
    "FileInfo",
    "Snapshot",
    "Change",
    "Diff",
    "Event",
    "OsInfo",
    "Tool",
    "EnvironmentNetwork",
    "Environment",
    "NetworkSecret",
    "NetworkPolicy",
    "PreviewToken",
    "UploadResult",
    "FileChange",
]


#: The label every create and fork request of the SDK carries, unique to the request: if the
#: client stops waiting for the answer (interrupted, cancelled, the connection broke), the
#: sandboxes the server goes on to make are found by it and deleted.
#: :class:`SandboxInfo` leaves it out of ``labels`` (``raw`` keeps it).
REQUEST_LABEL = "openrun.sdk/request"

#: What ``repr()`` shows in place of a secret.
REDACTED = "<redacted>"


def parse_time(value: Any) -> Optional[_dt.datetime]:
    """An RFC 3339 time of the server (``2026-12-06T01:59:04.335Z``) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        return _dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def _ms_time(value: Any) -> Optional[_dt.datetime]:
    if not isinstance(value, (int, float)):
        return None
    return _dt.datetime.fromtimestamp(value / 1000, tz=_dt.timezone.utc)


@dataclass(frozen=True)
class Limits:
    """Resource limits of a sandbox (``None``: not limited beyond the host's defaults)."""

    memory_bytes: Optional[int] = None
    cpu_millis: Optional[int] = None
    pids: Optional[int] = None
    disk_bytes: Optional[int] = None
    open_files: Optional[int] = None

    @classmethod
    def from_json(cls, d: Optional[Dict[str, Any]]) -> "Limits":
        """Builds it from the server's ``limits`` object."""
        d = d or {}
        return cls(
            memory_bytes=d.get("memory_bytes"),
            cpu_millis=d.get("cpu_millis"),
            pids=d.get("pids"),
            disk_bytes=d.get("disk_bytes"),
            open_files=d.get("open_files"),
        )


@dataclass(frozen=True)
class SandboxInfo:
    """The sandbox resource: what ``info()``, ``Sandbox.list()`` and lifecycle calls return."""

    id: str
    image: str
    state: str
    """``creating``, ``running``, ``paused``, ``stopped`` or ``error``."""
    created_at: Optional[_dt.datetime]
    expires_at: Optional[_dt.datetime]
    limits: Limits
    labels: Dict[str, str]
    env: Dict[str, str]
    """The variables given at create; ``repr()`` shows their names only (values may be
    credentials)."""
    owner: str
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def __repr__(self) -> str:
        env = {k: REDACTED for k in self.env}
        return (
            f"SandboxInfo(id={self.id!r}, image={self.image!r}, state={self.state!r}, "
            f"created_at={self.created_at!r}, expires_at={self.expires_at!r}, limits={self.limits!r}, "
            f"labels={self.labels!r}, env={env!r}, owner={self.owner!r})"
        )

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SandboxInfo":
        """Builds it from the server's sandbox resource."""
        return cls(
            id=d["id"],
            image=d.get("image", ""),
            state=d.get("state", ""),
            created_at=parse_time(d.get("created_at")),
            expires_at=parse_time(d.get("expires_at")),
            limits=Limits.from_json(d.get("limits")),
            labels={k: v for k, v in (d.get("labels") or {}).items() if k != REQUEST_LABEL},
            env=dict(d.get("env") or {}),
            owner=d.get("owner", ""),
            raw=d,
        )


@dataclass(frozen=True)
class Started:
    """Exec event: the command started with this pid."""

    pid: int
    type: str = "started"


@dataclass(frozen=True)
class Stdout:
    """Exec event: bytes the command wrote to standard output, at ``offset`` of its stream."""

    data: bytes
    offset: int
    type: str = "stdout"

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (invalid or split sequences replaced)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Stderr:
    """Exec event: bytes the command wrote to standard error, at ``offset`` of its stream."""

    data: bytes
    offset: int
    type: str = "stderr"

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (invalid or split sequences replaced)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Exit:
    """Exec event: the command ended (the last event)."""

    exit_code: Optional[int]
    """Exit code, ``None`` when a signal ended it."""
    signal: Optional[int] = None
    timed_out: bool = False
    oom_killed: bool = False
    type: str = "exit"


#: One event of an exec stream, in order: :class:`Started`, output, then :class:`Exit`.
ExecEvent = Union[Started, Stdout, Stderr, Exit]


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a finished command (``run()``, ``Process.wait()``)."""

    exit_code: Optional[int]
    """Exit code, ``None`` when a signal ended it."""
    stdout: str
    stderr: str
    signal: Optional[int] = None
    timed_out: bool = False
    """The command's own ``timeout=`` passed and the server killed it."""
    oom_killed: bool = False
    pid: Optional[int] = None
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """Whether it exited with code 0."""
        return self.exit_code == 0 and not self.timed_out and self.signal is None

    def check(self) -> "CommandResult":
        """Raises :class:`~openrun.CommandError` unless :attr:`ok`; returns itself otherwise."""
        if not self.ok:
            raise CommandError(self)
        return self


OutputCallback = Callable[[str], Any]


class OutputCollector:
    """Accumulates exec events into a :class:`CommandResult`, calling output callbacks with
    decoded text as the events arrive (incremental UTF-8: a character split between two
    chunks is delivered whole). Shared by the sync and async clients."""

    def __init__(
        self,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        pid: Optional[int] = None,
    ):
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._bytes: Dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.pid: Optional[int] = pid
        self.exit: Optional[Exit] = None

    def feed(self, event: ExecEvent) -> Any:
        """Takes one event; returns what the output callback returned (an awaitable for an
        async callback, which the async client awaits), else ``None``."""
        if isinstance(event, Started):
            self.pid = event.pid
        elif isinstance(event, (Stdout, Stderr)):
            self._bytes[event.type] += event.data
            callback = self._callbacks[event.type]
            if callback is not None:
                text = self._decoders[event.type].decode(event.data)
                if text:
                    return callback(text)
        elif isinstance(event, Exit):
            self.exit = event
        return None

    def flush(self) -> List[Any]:
        """Delivers the text still held by the decoders (a truncated character at the end)."""
        results = []
        for name, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            callback = self._callbacks[name]
            if tail and callback is not None:
                results.append(callback(tail))
        return results

    def result(self) -> CommandResult:
        """The result, once the :class:`Exit` event came (a stream that ended without one, e.g.
        when the server stopped, raises :class:`~openrun.ConnectionError`)."""
        if self.exit is None:
            raise ConnectionError("the output stream ended before the command's exit")
        exit = self.exit
        out, err = bytes(self._bytes["stdout"]), bytes(self._bytes["stderr"])
        return CommandResult(
            exit_code=exit.exit_code,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            signal=exit.signal,
            timed_out=exit.timed_out,
            oom_killed=exit.oom_killed,
            pid=self.pid,
            stdout_bytes=out,
            stderr_bytes=err,
        )


@dataclass(frozen=True)
class ProcessStatus:
    """How a process ended."""

    exit_code: Optional[int]
    signal: Optional[int] = None
    core_dumped: bool = False
    timed_out: bool = False
    oom_killed: bool = False


@dataclass(frozen=True)
class ProcessInfo:
    """A process of the sandbox, as ``processes()`` and ``Process.status()`` show it."""

    pid: int
    argv: List[str]
    cwd: Optional[str]
    state: str
    """``running`` or ``exited``."""
    started_at: Optional[_dt.datetime]
    status: Optional[ProcessStatus]
    """How it ended (``None`` while running)."""
    stdout_len: int
    stderr_len: int
    pty: bool = False
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def running(self) -> bool:
        """Whether it still runs."""
        return self.state == "running"

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "ProcessInfo":
        """Builds it from the server's process object."""
        st = d.get("status")
        status = None
        if isinstance(st, dict):
            status = ProcessStatus(
                exit_code=st.get("code"),
                signal=st.get("signal"),
                core_dumped=bool(st.get("core_dumped")),
                timed_out=bool(st.get("timed_out")),
                oom_killed=bool(st.get("oom_killed")),
            )
        return cls(
            pid=d["pid"],
            argv=list(d.get("argv") or []),
            cwd=d.get("cwd"),
            state=d.get("state", ""),
            started_at=_ms_time(d.get("started_at_ms")),
            status=status,
            stdout_len=d.get("stdout_len", 0),
            stderr_len=d.get("stderr_len", 0),
            pty=bool(d.get("pty")),
            raw=d,
        )


@dataclass(frozen=True)
class FileInfo:
    """A file, directory or link in the sandbox (``files.stat()``, ``files.list()``)."""

    path: str
    """Absolute path inside the sandbox."""
    name: str
    """Last component of the path."""
    type: str
    """``file``, ``dir``, ``symlink`` or ``other`` (a device, fifo or socket), as the server
    sends it (``FileKind`` of the protocol)."""
    size: int
    mode: int
    """Permission bits, e.g. ``0o644``."""
    uid: Optional[int] = None
    gid: Optional[int] = None
    modified: Optional[_dt.datetime] = None
    symlink_target: Optional[str] = None
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def is_dir(self) -> bool:
        """Whether it is a directory."""
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        """Whether it is a regular file."""
        return self.type == "file"

    @classmethod
    def from_json(cls, d: Dict[str, Any], path: str) -> "FileInfo":
        """Builds it from the server's stat object; ``path`` is where it is."""
        return cls(
            path=path,
            name=path.rstrip("/").rsplit("/", 1)[-1] or "/",
            type=d.get("file_type", ""),
            size=d.get("size", 0),
            mode=d.get("mode", 0),
            uid=d.get("uid"),
            gid=d.get("gid"),
            modified=_ms_time(d.get("modified_ms")),
            symlink_target=d.get("symlink_target"),
            raw=d,
        )


@dataclass(frozen=True)
class Snapshot:
    """A snapshot of a sandbox: a new image to create sandboxes from."""

    image: str
    """The image name, ``name:tag``: pass it to ``Sandbox.create(image=...)``."""
    layers: List[str]
    bytes: int
    duration_ms: int
    paused_ms: int

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Snapshot":
        """Builds it from the server's answer."""
        return cls(
            image=d["image"],
            layers=list(d.get("layers") or []),
            bytes=d.get("bytes", 0),
            duration_ms=d.get("duration_ms", 0),
            paused_ms=d.get("paused_ms", 0),
        )


@dataclass(frozen=True)
class Change:
    """One changed path of a diff."""

    path: str
    kind: str
    """``added``, ``modified`` or ``deleted``."""
    type: str
    size: int
    link_target: Optional[str] = None


@dataclass(frozen=True)
class Diff:
    """What changed in a sandbox against its image (or another image)."""

    changes: List[Change]
    patch: str
    """Unified diff (git style) of changed text files."""
    truncated: bool

    @property
    def paths(self) -> List[str]:
        """The changed paths."""
        return [c.path for c in self.changes]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Diff":
        """Builds it from the server's answer."""
        return cls(
            changes=[
                Change(
                    path=c["path"],
                    kind=c.get("kind", ""),
                    type=c.get("type", ""),
                    size=c.get("size", 0),
                    link_target=c.get("link_target"),
                )
                for c in d.get("changes") or []
            ],
            patch=d.get("patch", ""),
            truncated=bool(d.get("truncated")),
        )


@dataclass(frozen=True)
class Event:
    """One entry of a sandbox's timeline (``sandbox.create``, ``process.exec``, ``file.write``, ...)."""

    seq: int
    time: Optional[_dt.datetime]
    actor: str
    kind: str
    payload: Any

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Event":
        """Builds it from the server's event object."""
        return cls(
            seq=d["seq"],
            time=parse_time(d.get("time")),
            actor=d.get("actor", ""),
            kind=d.get("kind", ""),
            payload=d.get("payload"),
        )


@dataclass(frozen=True)
class OsInfo:
    """The sandbox's operating system (from its os-release file)."""

    id: Optional[str] = None
    name: Optional[str] = None
    version_id: Optional[str] = None
    pretty_name: Optional[str] = None


@dataclass(frozen=True)
class Tool:
    """A program found on the sandbox's ``PATH``."""

    name: str
    path: str
    version: Optional[str] = None


@dataclass(frozen=True)
class EnvironmentNetwork:
    """The sandbox's network as the environment shows it."""

    policy: str
    loopback: bool


@dataclass(frozen=True)
class Environment:
    """What is inside a sandbox: OS, architecture, limits, network, ``PATH`` and tools."""

    os: OsInfo
    arch: Optional[str]
    kernel: Optional[str]
    hostname: Optional[str]
    user: Optional[str]
    limits: Limits
    network: EnvironmentNetwork
    path: List[str]
    tools: List[Tool]
    raw: Dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def tool(self, name: str) -> Optional[Tool]:
        """The tool of that name, if found."""
        return next((t for t in self.tools if t.name == name), None)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Environment":
        """Builds it from the server's answer."""
        os_ = d.get("os") or {}
        net = d.get("network") or {}
        return cls(
            os=OsInfo(
                id=os_.get("id"),
                name=os_.get("name"),
                version_id=os_.get("version_id"),
                pretty_name=os_.get("pretty_name"),
            ),
            arch=d.get("arch"),
            kernel=d.get("kernel"),
            hostname=d.get("hostname"),
            user=d.get("user"),
            limits=Limits.from_json(d.get("limits")),
            network=EnvironmentNetwork(policy=net.get("policy", ""), loopback=bool(net.get("loopback"))),
            path=list(d.get("path") or []),
            tools=[
                Tool(name=t["name"], path=t.get("path", ""), version=t.get("version"))
                for t in d.get("tools") or []
            ],
            raw=d,
        )


@dataclass(frozen=True)
class NetworkSecret:
    """A credential the egress proxy adds to requests to its hosts (values are never shown)."""

    name: str
    hosts: List[str]
    header: str = "Authorization"
    format: str = "Bearer {value}"


@dataclass(frozen=True)
class NetworkPolicy:
    """A sandbox's network policy as the server shows it."""

    mode: str
    """``none``, ``allowlist`` or ``open``."""
    allow: List[str]
    secrets: List[NetworkSecret]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "NetworkPolicy":
        """Builds it from the server's answer."""
        return cls(
            mode=d.get("mode", ""),
            allow=list(d.get("allow") or []),
            secrets=[
                NetworkSecret(
                    name=s["name"],
                    hosts=list(s.get("hosts") or []),
                    header=s.get("header", "Authorization"),
                    format=s.get("format", "Bearer {value}"),
                )
                for s in d.get("secrets") or []
            ],
        )


@dataclass(frozen=True)
class PreviewToken:
    """A token that opens one port of one sandbox, and the URLs to use it. The token and the
    URLs (which carry it) are credentials: ``repr()`` does not show them."""

    token: str
    path_url: str
    host_url: Optional[str]
    expires_at: Optional[_dt.datetime]

    def __repr__(self) -> str:
        host = None if self.host_url is None else REDACTED
        return (
            f"PreviewToken(token={REDACTED!r}, path_url={REDACTED!r}, host_url={host!r}, "
            f"expires_at={self.expires_at!r})"
        )

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "PreviewToken":
        """Builds it from the server's answer."""
        return cls(
            token=d["token"],
            path_url=d.get("path_url", ""),
            host_url=d.get("host_url"),
            expires_at=parse_time(d.get("expires_at")),
        )


@dataclass(frozen=True)
class UploadResult:
    """What a directory upload wrote."""

    files: int
    bytes: int


@dataclass(frozen=True)
class FileChange:
    """A change in a watched directory (``files.watch()``)."""

    name: str
    """Path relative to the watched directory (empty for ``overflow``)."""
    kind: str
    """``create``, ``write``, ``remove``, ``rename``, ``chmod``, or ``overflow`` when events
    were lost (list the directory again)."""
    path: str
    """Absolute path inside the sandbox (the watched directory for ``overflow``)."""
