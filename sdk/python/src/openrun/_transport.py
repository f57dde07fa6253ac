"""Sending :class:`~openrun._ops.Call` s: the only code that differs between the sync and the
async client (``httpx.Client`` vs ``httpx.AsyncClient``). Errors are mapped by
:func:`~openrun._ops.raise_for_error` and :func:`translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Dict, Iterator, Optional, TypeVar, Union

import httpx

from . import __version__
from ._config import Target
from ._ops import Call, raise_for_error
from .errors import ConnectionError, OpenrunError, RateLimitedError, TimeoutError

T = TypeVar("T")

#: Seconds a plain request may wait for its answer (creates may queue, snapshots copy).
DEFAULT_TIMEOUT = 300.0
#: Times a request refused with 429 ``too_many_requests`` is sent again (the server refuses
#: before doing anything, so a retry never does something twice).
MAX_RETRIES = 3
#: Longest wait between two tries, in seconds, whatever ``Retry-After`` says.
MAX_RETRY_DELAY = 10.0


def retry_delay(error: RateLimitedError, attempt: int) -> Optional[float]:
    """Seconds to wait before trying again after a 429, or ``None`` to give up."""
    if attempt >= MAX_RETRIES:
        return None
    return min(error.retry_after if error.retry_after is not None else 1.0, MAX_RETRY_DELAY)


def _timeouts(timeout: Optional[float]) -> "tuple[httpx.Timeout, httpx.Timeout]":
    connect = min(timeout or 30.0, 30.0)
    plain = httpx.Timeout(connect=connect, read=timeout, write=timeout, pool=timeout)
    # A stream may be silent for as long as its command is: no read timeout.
    streaming = httpx.Timeout(connect=connect, read=None, write=timeout, pool=timeout)
    return plain, streaming


def _headers(target: Target) -> Dict[str, str]:
    headers = {"user-agent": f"openrun-python/{__version__}"}
    if target.api_key:
        headers["authorization"] = f"Bearer {target.api_key}"
    return headers


@contextlib.contextmanager
def translate() -> Iterator[None]:
    """Turns httpx's failures into the SDK's (a timeout, a connection that failed)."""
    try:
        yield
    except OpenrunError:
        raise
    except httpx.TimeoutException as e:
        raise TimeoutError(f"the server did not answer in time: {e}") from e
    except httpx.TransportError as e:
        raise ConnectionError(f"cannot reach the openrun server: {e}") from e
    except ValueError as e:  # an answer that is not the JSON it should be
        raise OpenrunError(f"unexpected answer from the server: {e}", code="protocol") from e


def _line(raw: str) -> Optional[Dict[str, Any]]:
    raw = raw.strip()
    if not raw:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object per line, got {raw[:200]!r}")
    return value


class _Base:
    def __init__(self, target: Target, timeout: Optional[float]):
        self.target = target
        self.timeout = timeout
        self._plain, self._streaming = _timeouts(timeout)
        self._users = 0

    def _request(
        self, client: Union[httpx.Client, httpx.AsyncClient], call: Call[Any], read_timeout: Any
    ) -> httpx.Request:
        timeout = self._streaming if call.stream else self._plain
        if read_timeout is not _UNSET:
            timeout = httpx.Timeout(
                connect=timeout.connect, read=read_timeout, write=timeout.write, pool=timeout.pool
            )
        return client.build_request(
            call.method,
            call.path,
            params=tuple(call.params) if call.params else None,
            json=call.json,
            content=call.content,
            headers=call.headers or None,
            timeout=timeout,
        )

    def retain(self) -> None:
        """One more sandbox handle uses this transport."""
        self._users += 1


_UNSET: Any = object()


class SyncTransport(_Base):
    """Sends calls with an ``httpx.Client`` (no proxies from the environment, no redirects)."""

    def __init__(self, target: Target, timeout: Optional[float] = DEFAULT_TIMEOUT):
        super().__init__(target, timeout)
        self.client = httpx.Client(
            base_url=target.url,
            headers=_headers(target),
            trust_env=False,
            follow_redirects=False,
        )

    def call(self, call: Call[T]) -> T:
        """Sends a call and parses its answer; error answers raise their typed exception
        (a 429 is retried after its ``Retry-After``, :data:`MAX_RETRIES` times)."""
        attempt = 0
        while True:
            try:
                with translate():
                    response = self.client.send(self._request(self.client, call, _UNSET))
                    raise_for_error(response)
                    return call.parse(response)
            except RateLimitedError as e:
                delay = retry_delay(e, attempt)
                if delay is None:
                    raise
                attempt += 1
                time.sleep(delay)

    def stream(self, call: Call[Any], read_timeout: Any = _UNSET) -> Iterator[Dict[str, Any]]:
        """Sends a streaming call and yields its NDJSON lines as they arrive."""
        with translate():
            response = self.client.send(self._request(self.client, call, read_timeout), stream=True)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise_for_error(response)
                for raw in response.iter_lines():
                    line = _line(raw)
                    if line is not None:
                        yield line
            finally:
                response.close()

    def release(self) -> None:
        """A handle is done with it; the connection pool closes with the last one."""
        self._users -= 1
        if self._users <= 0:
            self.client.close()


class AsyncTransport(_Base):
    """Sends calls with an ``httpx.AsyncClient`` (no proxies from the environment, no redirects)."""

    def __init__(self, target: Target, timeout: Optional[float] = DEFAULT_TIMEOUT):
        super().__init__(target, timeout)
        self.client = httpx.AsyncClient(
            base_url=target.url,
            headers=_headers(target),
            trust_env=False,
            follow_redirects=False,
        )

    async def call(self, call: Call[T]) -> T:
        """Sends a call and parses its answer; error answers raise their typed exception
        (a 429 is retried after its ``Retry-After``, :data:`MAX_RETRIES` times)."""
        attempt = 0
        while True:
            try:
                with translate():
                    response = await self.client.send(self._request(self.client, call, _UNSET))
                    raise_for_error(response)
                    return call.parse(response)
            except RateLimitedError as e:
                delay = retry_delay(e, attempt)
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    async def stream(self, call: Call[Any], read_timeout: Any = _UNSET) -> AsyncIterator[Dict[str, Any]]:
        """Sends a streaming call and yields its NDJSON lines as they arrive."""
        with translate():
            response = await self.client.send(self._request(self.client, call, read_timeout), stream=True)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_error(response)
                async for raw in response.aiter_lines():
                    line = _line(raw)
                    if line is not None:
                        yield line
            finally:
                await response.aclose()

    async def release(self) -> None:
        """A handle is done with it; the connection pool closes with the last one."""
        self._users -= 1
        if self._users <= 0:
            await self.client.aclose()
