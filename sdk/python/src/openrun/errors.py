"""Typed exceptions of the SDK.

Every error answer of the server is ``{"code": "<snake_case>", "message": "..."}`` with an HTTP
status; :func:`error_from_code` is the one place a code becomes an exception class. Errors
inside a stream (an exec's ``{"type": "error", ...}`` line) map through the same table.
"""

from __future__ import annotations

import builtins
from typing import Dict, Optional, Protocol, Tuple, Type

__all__ = [
    "OpenrunError",
    "ConfigurationError",
    "ConnectionError",
    "TimeoutError",
    "AuthenticationError",
    "PermissionDeniedError",
    "OpenNetworkDisabledError",
    "NotFoundError",
    "SandboxNotFoundError",
    "CommandNotFoundError",
    "ProcessNotFoundError",
    "InvalidArgumentError",
    "InvalidNetworkPolicyError",
    "NotSupportedError",
    "ConflictError",
    "SandboxNotRunningError",
    "SandboxPausedError",
    "SandboxLostError",
    "AlreadyExistsError",
    "DirectoryNotEmptyError",
    "StillRunningError",
    "TooLargeError",
    "RateLimitedError",
    "ServerError",
    "BadGatewayError",
    "PortClosedError",
    "CommandError",
    "ClientClosedError",
    "error_from_code",
]


class OpenrunError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        code: The server's stable snake_case code (e.g. ``not_found``), or a client-side one
            (``timeout``, ``connection_error``, ``configuration``, ``command_failed``).
        message: What went wrong, for humans.
        status: The HTTP status of the answer, or ``None`` for client-side errors. An error
            reported inside a stream (an ``error`` line of an exec or output stream) has the
            status its code has as an answer (e.g. 409 for ``agent_lost``).
    """

    #: The code this class stands for when the server sends none it knows.
    default_code = "error"

    def __init__(self, message: str, *, code: Optional[str] = None, status: Optional[int] = None):
        super().__init__(message)
        self.code: str = code or self.default_code
        self.message: str = message
        self.status: Optional[int] = status

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class ConfigurationError(OpenrunError):
    """No server is configured, or the configuration cannot be read or used."""

    default_code = "configuration"


class ConnectionError(OpenrunError, builtins.ConnectionError):
    """The server could not be reached, or the connection broke off."""

    default_code = "connection_error"


class TimeoutError(OpenrunError, builtins.TimeoutError):
    """A client-side time limit passed (an HTTP request, or ``Process.wait(timeout=)``).

    A command's own ``timeout=`` is enforced by the server instead: the command is killed and
    its result has ``timed_out=True``.
    """

    default_code = "timeout"


class AuthenticationError(OpenrunError):
    """401 ``unauthorized``: no API key, or one the server does not know."""

    default_code = "unauthorized"


class PermissionDeniedError(OpenrunError):
    """403 ``forbidden``: a path that leaves the sandbox or is not permitted (also the agent's
    ``permission_denied`` and ``outside_sandbox`` inside a stream)."""

    default_code = "forbidden"


class OpenNetworkDisabledError(PermissionDeniedError):
    """403 ``open_network_disabled``: network mode ``open`` is off on this server."""

    default_code = "open_network_disabled"


class NotFoundError(OpenrunError):
    """404: no such sandbox (also another tenant's, or a deleted one), file, process or endpoint."""

    default_code = "not_found"


class SandboxNotFoundError(NotFoundError):
    """404 ``not_found`` for the sandbox itself (raised by :meth:`Sandbox.connect`)."""


class CommandNotFoundError(NotFoundError):
    """404 ``command_not_found``: the program of an argv command does not exist."""

    default_code = "command_not_found"


class ProcessNotFoundError(NotFoundError):
    """404 ``no_such_process``: no process with that pid in the sandbox."""

    default_code = "no_such_process"


class InvalidArgumentError(OpenrunError, ValueError):
    """400: the request is malformed or asks for something impossible (the message names it)."""

    default_code = "invalid_argument"


class InvalidNetworkPolicyError(InvalidArgumentError):
    """400 ``invalid_network_policy``: a network policy that cannot be applied."""

    default_code = "invalid_network_policy"


class NotSupportedError(InvalidArgumentError):
    """400 ``not_supported``: the sandbox cannot do that (e.g. a file type it cannot make)."""

    default_code = "not_supported"


class ConflictError(OpenrunError):
    """409: the request conflicts with the current state."""

    default_code = "conflict"


class SandboxNotRunningError(ConflictError):
    """409 ``sandbox_not_running``: the sandbox expired, stopped or vanished."""

    default_code = "sandbox_not_running"


class SandboxLostError(SandboxNotRunningError):
    """``agent_lost``: the sandbox went away while a command ran or its output was followed
    (killed, expired, or its agent died). A :class:`SandboxNotRunningError`, so catching
    ``(NotFoundError, SandboxNotRunningError)`` covers a sandbox killed mid-run."""

    default_code = "agent_lost"


class SandboxPausedError(ConflictError):
    """409 ``sandbox_paused``: the sandbox is paused; call ``resume()`` first."""

    default_code = "sandbox_paused"


class AlreadyExistsError(ConflictError):
    """409 ``already_exists``: a file or an image of that name exists."""

    default_code = "already_exists"


class DirectoryNotEmptyError(ConflictError):
    """409 ``directory_not_empty``: remove it with ``recursive=True``."""

    default_code = "directory_not_empty"


class StillRunningError(ConflictError):
    """409 ``still_running``: the process has not ended yet."""

    default_code = "still_running"


class TooLargeError(OpenrunError):
    """413 ``body_too_large`` (a request body over the limit) or ``too_large`` (an answer or a
    tree the sandbox will not produce)."""

    default_code = "too_large"


class RateLimitedError(OpenrunError):
    """429 ``too_many_requests``: the server is at capacity.

    Attributes:
        retry_after: Seconds after which a retry may succeed (the ``Retry-After`` header).
    """

    default_code = "too_many_requests"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: Optional[int] = None,
        retry_after: Optional[float] = None,
    ):
        super().__init__(message, code=code, status=status)
        self.retry_after: Optional[float] = retry_after


class ServerError(OpenrunError):
    """5xx: a failure of the server or the host (``internal``; inside a stream also
    ``agent_failed`` and ``version_mismatch``)."""

    default_code = "internal"


class InsufficientStorageError(ServerError):
    """507 ``insufficient_storage``: the server's disk is full (a snapshot, fork, image import
    or upload could not be written); retry once an operator has freed space."""

    default_code = "insufficient_storage"


class BadGatewayError(ServerError):
    """502 ``bad_gateway``: what answers inside the sandbox did not speak HTTP."""

    default_code = "bad_gateway"


class PortClosedError(BadGatewayError):
    """502 ``port_closed`` (the agent's ``connection_refused``): nothing listens on that port
    inside the sandbox."""

    default_code = "port_closed"


class CommandError(OpenrunError):
    """A command run with ``check=True`` ended with a non-zero exit code, a signal or a timeout.

    Attributes:
        result: The :class:`~openrun.CommandResult` (exit code, output, signal, ...).
    """

    default_code = "command_failed"

    def __init__(self, result: "CommandResultLike"):
        if result.timed_out:
            why = "timed out"
        elif result.signal is not None:
            why = f"was killed by signal {result.signal}"
        else:
            why = f"exited with code {result.exit_code}"
        tail = result.stderr.strip()[-500:]
        message = f"command {why}" + (f": {tail}" if tail else "")
        super().__init__(message)
        self.result = result

    @property
    def exit_code(self) -> Optional[int]:
        """The command's exit code (``None`` when a signal ended it)."""
        return self.result.exit_code

    @property
    def stdout(self) -> str:
        """The command's standard output."""
        return self.result.stdout

    @property
    def stderr(self) -> str:
        """The command's standard error."""
        return self.result.stderr


class ClientClosedError(OpenrunError):
    """The handle (or the client it shares) was closed with ``close()``: connect again with
    ``Sandbox.connect(id)``. Raised before anything is sent."""

    default_code = "client_closed"


class CommandResultLike(Protocol):  # pragma: no cover - typing aid only
    """What :class:`CommandError` needs of a result (see :class:`openrun.CommandResult`)."""

    @property
    def exit_code(self) -> Optional[int]: ...
    @property
    def signal(self) -> Optional[int]: ...
    @property
    def timed_out(self) -> bool: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


#: Every code the server sends, with its class and HTTP status: the answers' codes
#: (``crates/openrun-server/src/error.rs``), and the codes of ``error`` lines in streams, which
#: are the agent's own (``ErrorCode`` of ``crates/openrun-protocol/src/message.rs``, snake_case)
#: or the server's (``agent_lost``, ``agent_failed``: ``crates/openrun-server/src/exec.rs``).
#: ``tests/python/sdk/test_sdk_errors.py`` checks that every one of them is here.
CODES: Dict[str, Tuple[Type[OpenrunError], int]] = {
    "unauthorized": (AuthenticationError, 401),
    "forbidden": (PermissionDeniedError, 403),
    "open_network_disabled": (OpenNetworkDisabledError, 403),
    "not_found": (NotFoundError, 404),
    "command_not_found": (CommandNotFoundError, 404),
    "no_such_process": (ProcessNotFoundError, 404),
    "invalid_argument": (InvalidArgumentError, 400),
    "invalid_network_policy": (InvalidNetworkPolicyError, 400),
    "not_a_directory": (InvalidArgumentError, 400),
    "is_a_directory": (InvalidArgumentError, 400),
    "not_supported": (NotSupportedError, 400),
    "sandbox_not_running": (SandboxNotRunningError, 409),
    "sandbox_paused": (SandboxPausedError, 409),
    "already_exists": (AlreadyExistsError, 409),
    "directory_not_empty": (DirectoryNotEmptyError, 409),
    "still_running": (StillRunningError, 409),
    "body_too_large": (TooLargeError, 413),
    "too_large": (TooLargeError, 413),
    "too_many_requests": (RateLimitedError, 429),
    "internal": (ServerError, 500),
    "insufficient_storage": (InsufficientStorageError, 507),
    "bad_gateway": (BadGatewayError, 502),
    "port_closed": (PortClosedError, 502),
    # Codes only seen in stream lines (the agent's, and the server's relay).
    "permission_denied": (PermissionDeniedError, 403),
    "outside_sandbox": (PermissionDeniedError, 403),
    "connection_refused": (PortClosedError, 502),
    "version_mismatch": (ServerError, 500),
    "agent_failed": (ServerError, 500),
    "agent_lost": (SandboxLostError, 409),
}

#: The class for a status whose code is not in :data:`CODES` (a newer server).
_BY_STATUS: Dict[int, Type[OpenrunError]] = {
    400: InvalidArgumentError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: TooLargeError,
    429: RateLimitedError,
}


def error_from_code(
    code: Optional[str],
    message: str,
    status: Optional[int] = None,
    *,
    retry_after: Optional[float] = None,
) -> OpenrunError:
    """The exception for a server error ``code`` (and HTTP ``status`` when known).

    Unknown codes fall back to the class of their status (any 5xx is a :class:`ServerError`),
    else to :class:`OpenrunError`; the code and message are kept as sent.
    """
    cls: Type[OpenrunError]
    if code in CODES:
        cls, known_status = CODES[code]
        if status is None:
            status = known_status
    elif status is not None and status >= 500:
        cls = ServerError
    elif status is not None and status in _BY_STATUS:
        cls = _BY_STATUS[status]
    else:
        cls = OpenrunError
    if cls is RateLimitedError:
        return RateLimitedError(message, code=code, status=status, retry_after=retry_after)
    return cls(message, code=code, status=status)
