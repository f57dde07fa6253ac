"""openrun: Python client for the openrun sandbox server.

>>> from openrun import Sandbox
>>> with Sandbox.create(memory="512M") as sbx:          # doctest: +SKIP
...     print(sbx.run("echo hello").stdout)

:class:`Sandbox` is the synchronous client, :class:`AsyncSandbox` the asyncio one; both have
the same methods. Errors are :class:`OpenrunError` subclasses carrying the server's ``code``;
use ``openrun.TimeoutError`` and ``openrun.ConnectionError`` by their qualified names.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AlreadyExistsError,
    AuthenticationError,
    BadGatewayError,
    InsufficientStorageError,
    ClientClosedError,
    CommandError,
    CommandNotFoundError,
    ConfigurationError,
    ConflictError,
    ConnectionError as ConnectionError,
    DirectoryNotEmptyError,
    InvalidArgumentError,
    InvalidNetworkPolicyError,
    NotFoundError,
    NotSupportedError,
    OpenNetworkDisabledError,
    OpenrunError,
    PermissionDeniedError,
    PortClosedError,
    ProcessNotFoundError,
    RateLimitedError,
    SandboxLostError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxPausedError,
    ServerError,
    StillRunningError,
    TimeoutError as TimeoutError,
    TooLargeError,
)
from .models import (  # noqa: E402
    Change,
    CommandResult,
    Diff,
    Environment,
    Event,
    ExecEvent,
    Exit,
    FileChange,
    FileInfo,
    Limits,
    NetworkPolicy,
    NetworkSecret,
    PreviewToken,
    ProcessInfo,
    ProcessStatus,
    SandboxInfo,
    Snapshot,
    Started,
    Stderr,
    Stdout,
    UploadResult,
)
from .sandbox import Files, Network, Process, Sandbox  # noqa: E402
from .async_sandbox import AsyncFiles, AsyncNetwork, AsyncProcess, AsyncSandbox  # noqa: E402

__all__ = [
    "__version__",
    "Sandbox",
    "AsyncSandbox",
    "Files",
    "AsyncFiles",
    "Network",
    "AsyncNetwork",
    "Process",
    "AsyncProcess",
    # models
    "Change",
    "CommandResult",
    "Diff",
    "Environment",
    "Event",
    "ExecEvent",
    "Exit",
    "FileChange",
    "FileInfo",
    "Limits",
    "NetworkPolicy",
    "NetworkSecret",
    "PreviewToken",
    "ProcessInfo",
    "ProcessStatus",
    "SandboxInfo",
    "Snapshot",
    "Started",
    "Stderr",
    "Stdout",
    "UploadResult",
    # errors
    "OpenrunError",
    "AlreadyExistsError",
    "AuthenticationError",
    "BadGatewayError",
    "InsufficientStorageError",
    "ClientClosedError",
    "CommandError",
    "CommandNotFoundError",
    "ConfigurationError",
    "ConflictError",
    "DirectoryNotEmptyError",
    "InvalidArgumentError",
    "InvalidNetworkPolicyError",
    "NotFoundError",
    "NotSupportedError",
    "OpenNetworkDisabledError",
    "PermissionDeniedError",
    "PortClosedError",
    "ProcessNotFoundError",
    "RateLimitedError",
    "SandboxLostError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxPausedError",
    "ServerError",
    "StillRunningError",
    "TooLargeError",
]
# `openrun.TimeoutError` and `openrun.ConnectionError` subclass the built-ins of those names;
# they are left out of `__all__` so that `from openrun import *` does not shadow the built-ins.
