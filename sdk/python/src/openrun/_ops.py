"""The one place requests are built and answers parsed, for the sync and async clients.

Each operation is a function returning a :class:`Call`: method, path, query, body and how to
turn the answer into a model. The transports (:mod:`openrun._transport`) only send calls;
the sandbox classes only pick the call. Nothing here does I/O except the tar helpers, which
touch the local file system.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
import operator
import os
import posixpath
import signal as _signal
import stat as _stat
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Generic,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from .errors import InvalidArgumentError, NotFoundError, OpenrunError, TooLargeError, error_from_code
from .models import (
    Diff,
    Environment,
    Event,
    ExecEvent,
    Exit,
    FileChange,
    FileInfo,
    NetworkPolicy,
    REQUEST_LABEL,
    PreviewToken,
    ProcessInfo,
    SandboxInfo,
    Snapshot,
    Started,
    Stderr,
    Stdout,
    UploadResult,
)

T = TypeVar("T")

#: A duration: seconds (int or float), a ``timedelta``, or the server's text (``"30s"``, ``"15m"``).
Duration = Union[int, float, _dt.timedelta, str]
#: A size: bytes (int) or the server's text (``"512M"``, ``"10G"``).
Size = Union[int, str]
#: A command: a shell line (run with ``sh -c``) or an argv list.
Command = Union[str, Sequence[str]]

#: Largest body of one file write (the server's 16 MiB); bigger writes go as a tar archive.
MAX_FILE_WRITE = 16 << 20
#: Largest tar archive the server extracts (``MAX_UPLOAD`` of ``crates/openrun-server/src/archive.rs``):
#: the limit of ``files.upload_dir`` and of one ``files.write`` over :data:`MAX_FILE_WRITE`.
MAX_TAR_UPLOAD = 256 << 20
#: Bytes sent as they are: one buffer, or chunks (not copied into one).
Content = Union[bytes, List[bytes]]


@dataclass
class Call(Generic[T]):
    """One HTTP request of the API and how to read its answer."""

    method: str
    path: str
    params: Optional[List[Tuple[str, str]]] = None
    json: Any = None
    content: Optional[Content] = None
    headers: Dict[str, str] = field(default_factory=dict)
    parse: Callable[[httpx.Response], T] = field(default=lambda r: None)  # type: ignore[assignment]
    stream: bool = False
    """An NDJSON stream: the transport yields its lines as parsed JSON."""
    expected: int = 1
    """How many sandboxes a create or fork makes (for :func:`abandoned`)."""
    no_read_timeout: bool = False
    """Wait for the answer however long it takes (creates and forks, which the server finishes
    even when the client leaves): ``request_timeout`` then bounds connecting only."""
    request_label: Optional[str] = None
    """The value of :data:`REQUEST_LABEL` this request gives the sandboxes it makes."""


#: A multi-step operation: yields the calls to send, gets each one's result back (or its
#: error thrown in), returns the result. Driven by the sync and the async client alike.
Plan = Generator[Call[Any], Any, T]


# ---------------------------------------------------------------------------------------------
# Arguments


def duration(value: Optional[Duration], name: str) -> Optional[str]:
    """A duration as the server takes it: numbers are seconds, sent as whole milliseconds
    (``nan``, infinities and negative numbers are refused here)."""
    if value is None:
        return None
    bad = InvalidArgumentError(f"invalid {name} {value!r}: expected seconds or a string like '30s'")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        return value
    if isinstance(value, _dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise bad
        return f"{round(value * 1000)}ms"
    raise bad


def integer(value: Any, name: str, minimum: Optional[int] = 0) -> int:
    """An integer argument (an ``int``-like, not a bool), at least ``minimum``."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"invalid {name} {value!r}: expected an integer")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"invalid {name} {value!r}: expected an integer") from None
    if minimum is not None and number < minimum:
        raise InvalidArgumentError(f"invalid {name} {value!r}: expected an integer >= {minimum}")
    return number


def optional_integer(value: Any, name: str, minimum: Optional[int] = 0) -> Optional[int]:
    """:func:`integer`, or ``None``."""
    return None if value is None else integer(value, name, minimum)


def file_mode(mode: Any) -> Optional[int]:
    """Permission bits: an ``int`` from 0 to ``0o7777`` (e.g. ``0o755``), or ``None``."""
    if mode is None:
        return None
    value = integer(mode, "mode")
    if value > 0o7777:
        raise InvalidArgumentError(f"invalid mode {mode!r}: expected permission bits like 0o755")
    return value


def signal_number(sig: Any) -> int:
    """A signal: a number, a :class:`signal.Signals`, or a name (``"TERM"``, ``"SIGTERM"``)."""
    if isinstance(sig, str):
        name = sig.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        found = getattr(_signal.Signals, name, None) if name.isidentifier() else None
        if not isinstance(found, _signal.Signals):
            raise InvalidArgumentError(f"unknown signal {sig!r}: expected a number or a name like 'TERM'")
        return int(found)
    return integer(sig, "signal", 1)


def stdin_bytes(data: Any) -> bytes:
    """Input for a process: text (as UTF-8) or bytes-like (``bytes``, ``bytearray``,
    ``memoryview``); anything else is an :class:`~openrun.InvalidArgumentError`."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgumentError(f"invalid stdin {type(data).__name__}: expected str or bytes")


def size(value: Optional[Size], name: str) -> Optional[str]:
    """A size as the server takes it (a bare number is bytes)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"invalid {name} {value!r}: expected bytes or a string like '512M'")
    return str(value)


def argv(cmd: Command) -> List[str]:
    """A shell line becomes ``["sh", "-c", line]``; an argv list is used as given."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    if (
        not isinstance(cmd, (list, tuple))
        and not (isinstance(cmd, Sequence) and not isinstance(cmd, (bytes, bytearray)))
    ) or not all(isinstance(a, str) for a in cmd):
        raise InvalidArgumentError(f"invalid command {cmd!r}: expected a string or a list of strings")
    return list(cmd)


def network_body(network: Any, secrets_given: bool = False) -> Optional[Dict[str, Any]]:
    """A network policy argument: a mode string, a dict as the API takes it, or a
    :class:`NetworkPolicy`.

    A :class:`NetworkPolicy` read from the server has its secrets without their values, so it
    cannot be sent back as it is: one with secrets is refused unless ``secrets_given`` (the
    caller passes ``secrets=``, e.g. ``[]`` to drop them), rather than silently dropping them.
    """
    if network is None:
        return None
    if isinstance(network, str):
        return {"mode": network}
    if isinstance(network, NetworkPolicy):
        if network.secrets and not secrets_given:
            names = ", ".join(s.name for s in network.secrets)
            raise InvalidArgumentError(
                f"this policy has secrets ({names}) whose values the server never shows: pass "
                "secrets=[{name, value, hosts, ...}] with their values again, or secrets=[] to drop them"
            )
        return {"mode": network.mode, "allow": list(network.allow)}
    if isinstance(network, Mapping):
        return dict(network)
    raise InvalidArgumentError(f"invalid network policy {network!r}: expected a mode or a dict")


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _q(sandbox_id: str) -> str:
    return "/v1/sandboxes/" + quote(sandbox_id, safe="")


# ---------------------------------------------------------------------------------------------
# Answers


def _json(r: httpx.Response) -> Any:
    return r.json()


def _none(r: httpx.Response) -> None:
    return None


def _sandbox(r: httpx.Response) -> SandboxInfo:
    return SandboxInfo.from_json(r.json())


def _request_labels(labels: Optional[Mapping[str, str]]) -> Tuple[Dict[str, str], str]:
    """The labels of a create or fork, with a fresh :data:`REQUEST_LABEL`."""
    tag = uuid.uuid4().hex
    return {**dict(labels or {}), REQUEST_LABEL: tag}, tag


def abandoned(request_label: str, expected: int, window: float) -> Plan[int]:
    """After a create or fork whose answer was not read: finds the sandboxes the server made
    for it (by its :data:`REQUEST_LABEL`) and deletes them; the number deleted. It looks
    again while the server may still be making them (``expected`` of them), at most
    ``window`` seconds (the drivers sleep between looks: a ``SLEEP`` call)."""
    deleted: "set[str]" = set()
    looks = 0
    while True:
        page, _ = yield list_page({REQUEST_LABEL: request_label}, None, None)
        for info in page:
            if info.id not in deleted:
                try:
                    yield delete(info.id)
                except NotFoundError:
                    pass
                deleted.add(info.id)
        looks += 1
        if len(deleted) >= expected or looks * ABANDON_POLL >= window:
            return len(deleted)
        yield Call("SLEEP", "", json=ABANDON_POLL)


#: How long, in seconds, the sandbox of an abandoned create is looked for (an admitted create
#: has its record within milliseconds; one still queued is dropped with its request).
ABANDON_WINDOW = 3.0
#: The same for a fork, whose snapshot comes first (the forks appear only after it).
FORK_ABANDON_WINDOW = 60.0
#: Seconds between two looks.
ABANDON_POLL = 0.25


def raise_for_error(r: httpx.Response) -> None:
    """Raises the typed exception of an error answer (its body must have been read)."""
    if r.status_code < 400:
        return
    code: Optional[str] = None
    message = r.reason_phrase or f"HTTP {r.status_code}"
    try:
        body = r.json()
        if isinstance(body, dict):
            code = body.get("code") if isinstance(body.get("code"), str) else None
            message = str(body.get("message", message))
    except ValueError:
        text = r.text.strip()
        if text:
            message = text[:1000]
    retry_after: Optional[float] = None
    header = r.headers.get("retry-after")
    if header:
        try:
            retry_after = float(header)
        except ValueError:
            retry_after = None
    raise error_from_code(code, message, r.status_code, retry_after=retry_after)


def exec_event(line: Dict[str, Any]) -> ExecEvent:
    """One NDJSON line of an exec or output stream; an ``error`` line raises its typed error."""
    kind = line.get("type")
    if kind == "started":
        return Started(pid=line["pid"])
    if kind in ("stdout", "stderr"):
        data = base64.b64decode(line.get("data_b64") or "")
        cls = Stdout if kind == "stdout" else Stderr
        return cls(data=data, offset=line.get("offset", 0))
    if kind == "exit":
        return Exit(
            exit_code=line.get("code"),
            signal=line.get("signal"),
            timed_out=bool(line.get("timed_out")),
            oom_killed=bool(line.get("oom_killed")),
        )
    if kind == "error":
        raise error_from_code(line.get("code"), str(line.get("message", "the command failed")))
    raise OpenrunError(f"unexpected line in an exec stream: {line!r}", code="protocol")


# ---------------------------------------------------------------------------------------------
# Sandboxes


def create(
    *,
    image: Optional[str],
    memory: Optional[Size],
    cpus: Union[int, float, str, None],
    pids: Optional[int],
    disk: Optional[Size],
    open_files: Optional[int],
    ttl: Optional[Duration],
    env: Optional[Mapping[str, str]],
    labels: Optional[Mapping[str, str]],
    network: Any,
) -> Call[SandboxInfo]:
    """``POST /v1/sandboxes`` (with a fresh :data:`REQUEST_LABEL`)."""
    all_labels, tag = _request_labels(labels)
    body = _drop_none(
        {
            "image": getattr(image, "image", image),  # a Snapshot works as an image
            "memory": size(memory, "memory"),
            "cpus": None if cpus is None else str(cpus),
            "pids": optional_integer(pids, "pids", 1),
            "disk": size(disk, "disk"),
            "open_files": optional_integer(open_files, "open_files", 1),
            "ttl": duration(ttl, "ttl"),
            "env": dict(env) if env else None,
            "labels": all_labels,
            "network": network_body(network),
        }
    )
    return Call("POST", "/v1/sandboxes", json=body, parse=_sandbox, no_read_timeout=True, request_label=tag)


def get(sandbox_id: str) -> Call[SandboxInfo]:
    """``GET /v1/sandboxes/{id}``."""
    return Call("GET", _q(sandbox_id), parse=_sandbox)


def delete(sandbox_id: str) -> Call[None]:
    """``DELETE /v1/sandboxes/{id}``."""
    return Call("DELETE", _q(sandbox_id), parse=_none)


def list_page(
    labels: Optional[Mapping[str, str]], state: Optional[str], cursor: Optional[str], limit: int = 1000
) -> Call[Tuple[List[SandboxInfo], Optional[str]]]:
    """One page of ``GET /v1/sandboxes`` and the cursor of the next (``X-Next-Cursor``)."""
    params = [("label", f"{k}={v}") for k, v in (labels or {}).items()]
    if state is not None:
        params.append(("state", state))
    params.append(("limit", str(limit)))
    if cursor is not None:
        params.append(("cursor", cursor))

    def parse(r: httpx.Response) -> Tuple[List[SandboxInfo], Optional[str]]:
        items = [SandboxInfo.from_json(d) for d in r.json()]
        return items, r.headers.get("x-next-cursor") or None

    return Call("GET", "/v1/sandboxes", params=params, parse=parse)


def set_ttl(sandbox_id: str, ttl: Duration) -> Call[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/ttl``."""
    return Call("POST", _q(sandbox_id) + "/ttl", json={"ttl": duration(ttl, "ttl")}, parse=_sandbox)


def pause(sandbox_id: str) -> Call[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/pause``."""
    return Call("POST", _q(sandbox_id) + "/pause", parse=_sandbox)


def resume(sandbox_id: str) -> Call[SandboxInfo]:
    """``POST /v1/sandboxes/{id}/resume``."""
    return Call("POST", _q(sandbox_id) + "/resume", parse=_sandbox)


def snapshot(sandbox_id: str, name: Optional[str]) -> Call[Snapshot]:
    """``POST /v1/sandboxes/{id}/snapshot``."""
    return Call(
        "POST",
        _q(sandbox_id) + "/snapshot",
        json=_drop_none({"name": name}),
        parse=lambda r: Snapshot.from_json(r.json()),
    )


def fork(
    sandbox_id: str,
    *,
    count: int,
    name: Optional[str],
    memory: Optional[Size],
    cpus: Union[int, float, str, None],
    pids: Optional[int],
    ttl: Optional[Duration],
    env: Optional[Mapping[str, str]],
    labels: Optional[Mapping[str, str]],
    network: Any,
) -> Call[List[SandboxInfo]]:
    """``POST /v1/sandboxes/{id}/fork`` (with a fresh :data:`REQUEST_LABEL`)."""
    all_labels, tag = _request_labels(labels)
    body = _drop_none(
        {
            "count": integer(count, "count", None),
            "name": name,
            "memory": size(memory, "memory"),
            "cpus": None if cpus is None else str(cpus),
            "pids": optional_integer(pids, "pids", 1),
            "ttl": duration(ttl, "ttl"),
            "env": dict(env) if env is not None else None,
            "labels": all_labels,
            "network": network_body(network),
        }
    )
    return Call(
        "POST",
        _q(sandbox_id) + "/fork",
        json=body,
        parse=lambda r: [SandboxInfo.from_json(d) for d in r.json()],
        no_read_timeout=True,
        request_label=tag,
        expected=body["count"],
    )


def diff(sandbox_id: str, path: Optional[str], against: Optional[str]) -> Call[Diff]:
    """``GET /v1/sandboxes/{id}/diff``."""
    params = [(k, v) for k, v in (("path", path), ("against", against)) if v is not None]
    return Call("GET", _q(sandbox_id) + "/diff", params=params, parse=lambda r: Diff.from_json(r.json()))


def events(sandbox_id: str, since: int, follow: bool) -> Call[List[Event]]:
    """``GET /v1/sandboxes/{id}/events`` (``follow``: an NDJSON stream of :func:`event` lines)."""
    params = [("since", str(integer(since, "since")))]
    if follow:
        params.append(("follow", "true"))
    return Call(
        "GET",
        _q(sandbox_id) + "/events",
        params=params,
        stream=follow,
        parse=lambda r: [Event.from_json(d) for d in r.json()],
    )


def event(line: Dict[str, Any]) -> Event:
    """One line of a followed timeline."""
    return Event.from_json(line)


def environment(sandbox_id: str, refresh: bool) -> Call[Environment]:
    """``GET /v1/sandboxes/{id}/environment``."""
    params = [("refresh", "true")] if refresh else None
    return Call(
        "GET",
        _q(sandbox_id) + "/environment",
        params=params,
        parse=lambda r: Environment.from_json(r.json()),
    )


def network_get(sandbox_id: str) -> Call[NetworkPolicy]:
    """``GET /v1/sandboxes/{id}/network``."""
    return Call("GET", _q(sandbox_id) + "/network", parse=lambda r: NetworkPolicy.from_json(r.json()))


def network_set(sandbox_id: str, policy: Any) -> Call[NetworkPolicy]:
    """``PUT /v1/sandboxes/{id}/network``."""
    return Call(
        "PUT",
        _q(sandbox_id) + "/network",
        json=network_body(policy),
        parse=lambda r: NetworkPolicy.from_json(r.json()),
    )


def network_policy(
    policy: Any,
    mode: Optional[str],
    allow: Optional[Sequence[str]],
    secrets: Optional[Sequence[Mapping[str, Any]]],
) -> Dict[str, Any]:
    """A policy body from ``set()``'s arguments: ``policy`` (mode, dict or
    :class:`NetworkPolicy`) with ``mode``, ``allow`` and ``secrets`` over it. A
    :class:`NetworkPolicy` with secrets needs ``secrets=`` (see :func:`network_body`)."""
    body = network_body(policy, secrets_given=secrets is not None) or {}
    if mode is not None:
        body["mode"] = mode
    if allow is not None:
        body["allow"] = list(allow)
    if secrets is not None:
        body["secrets"] = [dict(s) for s in secrets]
    if "mode" not in body:
        raise InvalidArgumentError("a network policy needs a mode: none, allowlist or open")
    return body


def preview(sandbox_id: str, port: int, ttl: Optional[Duration]) -> Call[PreviewToken]:
    """``POST /v1/sandboxes/{id}/ports/{port}/preview``."""
    return Call(
        "POST",
        f"{_q(sandbox_id)}/ports/{integer(port, 'port')}/preview",
        json=_drop_none({"ttl": duration(ttl, "ttl")}),
        parse=lambda r: PreviewToken.from_json(r.json()),
    )


# ---------------------------------------------------------------------------------------------
# Commands and processes


def _exec_body(
    cmd: Command, cwd: Optional[str], env: Optional[Mapping[str, str]], timeout: Optional[Duration]
) -> Dict[str, Any]:
    return _drop_none(
        {
            "cmd": argv(cmd),
            "cwd": cwd,
            "env": dict(env) if env else None,
            "timeout": duration(timeout, "timeout"),
        }
    )


def exec_stream(
    sandbox_id: str,
    cmd: Command,
    cwd: Optional[str],
    env: Optional[Mapping[str, str]],
    timeout: Optional[Duration],
) -> Call[None]:
    """``POST /v1/sandboxes/{id}/exec``: an NDJSON stream of :func:`exec_event` lines."""
    return Call("POST", _q(sandbox_id) + "/exec", json=_exec_body(cmd, cwd, env, timeout), stream=True)


def start(
    sandbox_id: str,
    cmd: Command,
    cwd: Optional[str],
    env: Optional[Mapping[str, str]],
    timeout: Optional[Duration],
    stdin: bool,
) -> Call[int]:
    """``POST /v1/sandboxes/{id}/exec`` with ``background`` (and ``stdin``): the pid."""
    body = _exec_body(cmd, cwd, env, timeout)
    body["background"] = True
    if stdin:
        body["stdin"] = True
    return Call("POST", _q(sandbox_id) + "/exec", json=body, parse=lambda r: int(r.json()["pid"]))


def processes(sandbox_id: str) -> Call[List[ProcessInfo]]:
    """``GET /v1/sandboxes/{id}/processes``."""
    return Call(
        "GET",
        _q(sandbox_id) + "/processes",
        parse=lambda r: [ProcessInfo.from_json(d) for d in r.json()],
    )


def process(sandbox_id: str, pid: int) -> Call[ProcessInfo]:
    """``GET /v1/sandboxes/{id}/processes/{pid}``."""
    return Call(
        "GET",
        f"{_q(sandbox_id)}/processes/{integer(pid, 'pid')}",
        parse=lambda r: ProcessInfo.from_json(r.json()),
    )


def signal(sandbox_id: str, pid: int, signum: Union[int, str], group: bool) -> Call[None]:
    """``POST /v1/sandboxes/{id}/processes/{pid}/signal``."""
    return Call(
        "POST",
        f"{_q(sandbox_id)}/processes/{integer(pid, 'pid')}/signal",
        json={"signal": signal_number(signum), "group": bool(group)},
        parse=_none,
    )


def stdin(sandbox_id: str, pid: int, data: Any, eof: bool) -> Call[None]:
    """``POST /v1/sandboxes/{id}/processes/{pid}/stdin`` (``data``: see :func:`stdin_bytes`)."""
    raw = stdin_bytes(data)
    return Call(
        "POST",
        f"{_q(sandbox_id)}/processes/{integer(pid, 'pid')}/stdin",
        params=[("eof", "true")] if eof else None,
        content=raw,
        headers={"content-type": "application/octet-stream"},
        parse=_none,
    )


def output(sandbox_id: str, pid: int, stdout_since: int, stderr_since: int, follow: bool) -> Call[None]:
    """``GET /v1/sandboxes/{id}/processes/{pid}/output``: exec stream lines from those offsets."""
    params = [
        ("stdout_since", str(integer(stdout_since, "stdout_since"))),
        ("stderr_since", str(integer(stderr_since, "stderr_since"))),
    ]
    if follow:
        params.append(("follow", "true"))
    return Call("GET", f"{_q(sandbox_id)}/processes/{integer(pid, 'pid')}/output", params=params, stream=True)


# ---------------------------------------------------------------------------------------------
# Files


def read_file(sandbox_id: str, path: str, offset: Optional[int], limit: Optional[int]) -> Call[bytes]:
    """``GET /v1/sandboxes/{id}/files``: the bytes."""
    params = [("path", path)]
    if offset is not None:
        params.append(("offset", str(integer(offset, "offset"))))
    if limit is not None:
        params.append(("limit", str(integer(limit, "limit"))))
    return Call("GET", _q(sandbox_id) + "/files", params=params, parse=lambda r: r.content)


def write_file(sandbox_id: str, path: str, data: bytes, mode: Optional[int], parents: bool) -> Call[None]:
    """``PUT /v1/sandboxes/{id}/files`` (at most 16 MiB: see :func:`write_large`)."""
    params = [("path", path)]
    mode = file_mode(mode)
    if mode is not None:
        params.append(("mode", format(mode, "o")))
    if parents:
        params.append(("parents", "true"))
    return Call(
        "PUT",
        _q(sandbox_id) + "/files",
        params=params,
        content=data,
        headers={"content-type": "application/octet-stream"},
        parse=_none,
    )


def file_bytes(data: Union[str, bytes, bytearray, memoryview]) -> bytes:
    """What ``files.write`` sends: text as UTF-8, bytes as they are."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgumentError(f"cannot write {type(data).__name__}: expected str or bytes")


def write(sandbox_id: str, path: str, data: Any, mode: Any, parents: bool) -> Plan[None]:
    """``files.write``: one ``PUT .../files`` up to :data:`MAX_FILE_WRITE`, else a one-file tar
    archive extracted into the file's directory (see :func:`write_large`)."""
    raw = file_bytes(data)
    mode = file_mode(mode)
    if len(raw) <= MAX_FILE_WRITE:
        yield write_file(sandbox_id, path, raw, mode, parents)
        return
    directory, name = posixpath.split(posixpath.normpath(path))
    if not name or name in (".", ".."):
        raise InvalidArgumentError(f"invalid file path {path!r}")
    if len(raw) + 3 * tarfile.BLOCKSIZE + 1024 > MAX_TAR_UPLOAD:
        raise TooLargeError(
            f"cannot write {len(raw)} bytes to {path}: one file write takes at most "
            f"{MAX_TAR_UPLOAD >> 20} MiB (the server's tar upload limit); write it in parts "
            "(e.g. several files joined with a command in the sandbox)",
            code="body_too_large",
        )
    if mode is None or not parents:
        # An archive sets the mode it carries, and makes missing directories: so the mode an
        # existing file has is kept as a plain write keeps it, and parents=False is checked.
        try:
            existing: Optional[FileInfo] = yield stat(sandbox_id, path)
        except NotFoundError:
            existing = None
        if existing is not None and existing.is_file and mode is None:
            mode = existing.mode & 0o7777
        if existing is None and not parents:
            try:
                yield stat(sandbox_id, directory or "/")
            except NotFoundError as e:
                raise NotFoundError(
                    f"cannot write {path}: its directory {directory or '/'} does not exist "
                    "(pass parents=True to make it)",
                    code=e.code,
                    status=e.status,
                ) from None
    yield write_large(sandbox_id, path, raw, mode)


def write_large(sandbox_id: str, path: str, data: bytes, mode: Optional[int]) -> Call[None]:
    """A file over 16 MiB: a one-file tar archive extracted into its directory (which is
    created if missing), sent as chunks around ``data`` (not copied). ``mode`` defaults to
    ``0o644`` (:func:`write` passes an existing file's)."""
    directory, name = posixpath.split(posixpath.normpath(path))
    if not name:
        raise InvalidArgumentError(f"invalid file path {path!r}")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644 if mode is None else mode
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    chunks = [header, data, padding + b"\0" * (2 * tarfile.BLOCKSIZE)]
    call = upload_tar(sandbox_id, directory or "/", chunks)
    return Call(
        call.method, call.path, params=call.params, content=call.content, headers=call.headers, parse=_none
    )


def list_dir(sandbox_id: str, path: str) -> Call[List[FileInfo]]:
    """``GET /v1/sandboxes/{id}/files/list``."""
    return Call(
        "GET",
        _q(sandbox_id) + "/files/list",
        params=[("path", path)],
        parse=lambda r: [FileInfo.from_json(d, posixpath.join(path, d["name"])) for d in r.json()],
    )


def stat(sandbox_id: str, path: str) -> Call[FileInfo]:
    """``GET /v1/sandboxes/{id}/files/stat``."""
    return Call(
        "GET",
        _q(sandbox_id) + "/files/stat",
        params=[("path", path)],
        parse=lambda r: FileInfo.from_json(r.json(), path),
    )


def mkdir(sandbox_id: str, path: str, parents: bool) -> Call[None]:
    """``POST /v1/sandboxes/{id}/files/mkdir``."""
    return Call("POST", _q(sandbox_id) + "/files/mkdir", json={"path": path, "parents": parents}, parse=_none)


def remove(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    """``POST /v1/sandboxes/{id}/files/remove``."""
    return Call(
        "POST", _q(sandbox_id) + "/files/remove", json={"path": path, "recursive": recursive}, parse=_none
    )


def move(sandbox_id: str, src: str, dst: str) -> Call[None]:
    """``POST /v1/sandboxes/{id}/files/move``."""
    return Call("POST", _q(sandbox_id) + "/files/move", json={"from": src, "to": dst}, parse=_none)


def watch(sandbox_id: str, path: str, recursive: bool) -> Call[None]:
    """``GET /v1/sandboxes/{id}/files/watch``: an NDJSON stream of :func:`watch_event` lines."""
    params = [("path", path)]
    if recursive:
        params.append(("recursive", "true"))
    return Call("GET", _q(sandbox_id) + "/files/watch", params=params, stream=True)


def watch_event(root: str, line: Dict[str, Any]) -> Optional[FileChange]:
    """One line of a watch: a change, or ``None`` for the last line (``ended``)."""
    if line.get("type") == "ended":
        return None
    if line.get("type") != "change":
        raise OpenrunError(f"unexpected line in a watch stream: {line!r}", code="protocol")
    name = str(line.get("name", ""))
    return FileChange(
        name=name, kind=str(line.get("kind", "")), path=posixpath.join(root, name) if name else root
    )


def download_tar(sandbox_id: str, path: str) -> Call[bytes]:
    """``GET /v1/sandboxes/{id}/files/tar``: the directory as a tar archive."""
    return Call("GET", _q(sandbox_id) + "/files/tar", params=[("path", path)], parse=lambda r: r.content)


def upload_tar(sandbox_id: str, path: str, data: Content) -> Call[UploadResult]:
    """``PUT /v1/sandboxes/{id}/files/tar``: extracts the archive into ``path``."""

    def parse(r: httpx.Response) -> UploadResult:
        d = r.json()
        return UploadResult(files=d.get("files", 0), bytes=d.get("bytes", 0))

    return Call(
        "PUT",
        _q(sandbox_id) + "/files/tar",
        params=[("path", path)],
        content=data,
        headers={"content-type": "application/x-tar"},
        parse=parse,
    )


def pack_dir(local: Union[str, "os.PathLike[str]"]) -> bytes:
    """A tar archive of a local directory's contents (names relative to it). Only regular files
    and directories go in: the server refuses links and devices; others are skipped. Files
    linked to each other (hard links) go in as separate files, each with its contents (a tar
    hard-link entry is a link, which the server refuses). The archive is limited to
    :data:`MAX_TAR_UPLOAD` (a :class:`~openrun.TooLargeError` beyond it)."""
    root = os.fspath(local)
    if not os.path.isdir(root):
        raise InvalidArgumentError(f"not a local directory: {root}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                if not (_stat.S_ISREG(st.st_mode) or _stat.S_ISDIR(st.st_mode)):
                    continue
                arcname = os.path.relpath(full, root).replace(os.sep, "/")
                info = tarfile.TarInfo(arcname)
                info.mode = _stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                if _stat.S_ISDIR(st.st_mode):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.type = tarfile.REGTYPE
                    info.size = st.st_size
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                if buf.tell() > MAX_TAR_UPLOAD:
                    raise TooLargeError(
                        f"{root} makes an archive over {MAX_TAR_UPLOAD >> 20} MiB, the most the "
                        "server extracts at once: upload its subdirectories one by one",
                        code="body_too_large",
                    )
    return buf.getvalue()


def unpack_dir(data: bytes, local: Union[str, "os.PathLike[str]"]) -> None:
    """Extracts a downloaded archive into a local directory (made if missing): only files and
    directories, never outside it, never through a link, without setuid bits."""
    root = os.path.realpath(os.fspath(local))
    os.makedirs(root, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            name = member.name.lstrip("/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if not parts or ".." in parts:
                continue
            target = os.path.join(root, *parts)
            parent = os.path.dirname(target)
            if os.path.realpath(parent) != parent or not parent.startswith(root):
                raise InvalidArgumentError(f"archive entry {member.name!r} would leave {root}")
            mode = member.mode & 0o777
            if member.isdir():
                if os.path.islink(target):
                    os.unlink(target)
                os.makedirs(target, exist_ok=True)
                os.chmod(target, mode | 0o700)
            elif member.isfile():
                os.makedirs(parent, exist_ok=True)
                if os.path.lexists(target) and not os.path.isdir(target):
                    os.unlink(target)
                src = tar.extractfile(member)
                if src is None:
                    continue
                fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600
                )
                with os.fdopen(fd, "wb") as dst:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        dst.write(chunk)
                os.chmod(target, mode)
            # links, devices and fifos are left out
