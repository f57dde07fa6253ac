"""Which server to talk to, and with which key: the CLI's resolution
(``crates/openrun/src/remote/config.rs``), plus a last fallback to the local server.

The server: ``server=``, else ``$OPENRUN_SERVER``, else the config file's ``server``, else the
address in ``<data-dir>/local.json`` (written by ``openrun serve`` on a loopback address; the
data dir is ``$OPENRUN_DATA_DIR``, else ``/var/lib/openrun``). The config file is
``$OPENRUN_CONFIG``, else ``$XDG_CONFIG_HOME/openrun/config.json``, else
``~/.config/openrun/config.json``: ``{"server": "http://host:7878", "api_key": "or_..."}``.

The key: ``api_key=``, else ``$OPENRUN_API_KEY``, else the config file's ``api_key`` when the
server is the config file's (or the file names none), else, for a loopback server only, the
key in ``local.json`` when that file names a loopback address on the same port. A key is never
sent to a server it was not configured for.

When the server itself comes from ``local.json`` (nothing named one), the key is ``api_key=``
if given, else ``local.json``'s only: ``$OPENRUN_API_KEY`` and the config file's key were
configured for some other server (the one the caller forgot to name), so they are never sent
to whatever listens on the local address. (The CLI has no such fallback: without a server it
works on the local data dir directly; ``crates/openrun/src/remote/config.rs``.)
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

from .errors import ConfigurationError

LOCAL_FILE = "local.json"
DEFAULT_DATA_DIR = "/var/lib/openrun"


@dataclass(frozen=True)
class Target:
    """A resolved server address (``http://host:port``, no trailing slash) and key."""

    url: str
    api_key: Optional[str]

    def __repr__(self) -> str:  # never show the key
        key = "<redacted>" if self.api_key else None
        return f"Target(url={self.url!r}, api_key={key!r})"


def _nonempty(value: Optional[str]) -> Optional[str]:
    return value if value is not None and value.strip() else None


def _env(name: str) -> Optional[str]:
    return _nonempty(os.environ.get(name))


def parse_url(text: str) -> str:
    """``http://HOST:PORT[/]`` normalized to ``http://host[:port]``; a bare ``HOST:PORT`` gets
    ``http://``. Anything else (https, a path, a user) is a :class:`ConfigurationError`."""
    raw = text.strip()
    full = raw if "://" in raw else f"http://{raw}"
    bad = ConfigurationError(f"invalid server address {raw!r}: expected http://HOST:PORT")
    try:
        parts = urlsplit(full)
        port = parts.port
    except ValueError:
        raise bad from None
    host = parts.hostname
    if (
        parts.scheme.lower() != "http"
        or not host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise bad
    shown = f"[{host}]" if ":" in host else host
    if port is not None and port != 80:
        shown += f":{port}"
    return f"http://{shown}"


def _port(url: str) -> int:
    return urlsplit(url).port or 80


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = urlsplit(url).hostname or ""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_json(path: str, explicit: bool) -> Dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigurationError(f"cannot read the config file {path}: it does not exist") from None
        return {}
    except OSError as e:
        raise ConfigurationError(f"cannot read the config file {path}: {e}") from None
    try:
        value = json.loads(data)
    except ValueError as e:
        raise ConfigurationError(
            f'invalid config file {path}: {e} (expected {{"server": URL, "api_key": KEY}})'
        ) from None
    if not isinstance(value, dict):
        raise ConfigurationError(f'invalid config file {path}: expected {{"server": URL, "api_key": KEY}}')
    return value


def config_path() -> Optional[Tuple[str, bool]]:
    """``$OPENRUN_CONFIG`` (and ``True``: named explicitly), else the XDG location, else
    ``~/.config/openrun/config.json``."""
    explicit = _env("OPENRUN_CONFIG")
    if explicit:
        return explicit, True
    base = _env("XDG_CONFIG_HOME")
    if base is None:
        home = _env("HOME")
        if home is None:
            return None
        base = os.path.join(home, ".config")
    return os.path.join(base, "openrun", "config.json"), False


def _read_local(data_dir: str) -> Dict[str, Any]:
    """``<data_dir>/local.json``, or ``{}`` when absent, unreadable or not the expected JSON."""
    try:
        with open(os.path.join(data_dir, LOCAL_FILE), "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _local_server(local: Dict[str, Any]) -> Optional[str]:
    server = local.get("server")
    if not isinstance(server, str) or not server.strip():
        return None
    try:
        url = parse_url(server)
    except ConfigurationError:
        return None
    return url if is_loopback(url) else None


def _local_key(url: str, local: Dict[str, Any]) -> Optional[str]:
    """The local file's key, for a loopback ``url`` on the port the file names only."""
    if not is_loopback(url):
        return None
    written = _local_server(local)
    key = local.get("api_key")
    if written is None or _port(written) != _port(url) or not isinstance(key, str) or not key:
        return None
    return key


def resolve(
    server: Optional[str] = None, api_key: Optional[str] = None, data_dir: Optional[str] = None
) -> Target:
    """The server and key to use (see the module's documentation for the order).

    Raises :class:`~openrun.ConfigurationError` when no server is configured anywhere or a
    configured address or file is invalid.
    """
    server = _nonempty(server) or _env("OPENRUN_SERVER")
    explicit_key = _nonempty(api_key)
    data_dir = data_dir or _env("OPENRUN_DATA_DIR") or DEFAULT_DATA_DIR
    found = config_path()
    file = _read_json(*found) if found else {}
    file_server_text = _nonempty(file.get("server") if isinstance(file.get("server"), str) else None)
    file_server = parse_url(file_server_text) if file_server_text is not None else None
    local = _read_local(data_dir)
    if server is not None:
        url = parse_url(server)
    elif file_server is not None:
        url = file_server
    else:
        local_url = _local_server(local)
        if local_url is None:
            raise ConfigurationError(
                "no openrun server configured: pass server=, set OPENRUN_SERVER, write "
                "~/.config/openrun/config.json, or start `openrun serve` on loopback"
            )
        # The local server's own key only (see the module's documentation).
        return Target(url=local_url, api_key=explicit_key or _local_key(local_url, local))
    api_key = explicit_key or _env("OPENRUN_API_KEY")
    if api_key is None:
        file_key = file.get("api_key")
        if isinstance(file_key, str) and file_key.strip() and (file_server is None or file_server == url):
            api_key = file_key
    if api_key is None:
        api_key = _local_key(url, local)
    return Target(url=url, api_key=api_key)
