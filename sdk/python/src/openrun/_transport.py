"""Sending :class:`~openrun._ops.Call` s: the only code that differs between the sync and the
async client (``httpx.Client`` vs ``httpx.AsyncClient``). Errors are mapped by
:func:`~openrun._ops.raise_for_error` and :func:`translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, TypeVar, Union

import httpx

from . import __version__
from ._config import Target
from ._ops import ABANDON_WINDOW, FORK_ABANDON_WINDOW, Call, Plan, abandoned, raise_for_error
from .errors import ClientClosedError, ConnectionError, OpenrunError, RateLimitedError, TimeoutError

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
    except RuntimeError as e:  # httpx: "Cannot send a request, as the client has been closed."
        if "closed" not in str(e):
            raise
        raise ClientClosedError(f"this client was closed: {e}") from e
    except ValueError as e:  # an answer that is not the JSON it should be
        raise OpenrunError(f"unexpected answer from the server: {e}", code="protocol") from e


def _answered(error: BaseException) -> bool:
    """Whether the server answered the request (an error answer: nothing was made), or the
    request was never sent; otherwise a create or fork may have gone on without its client."""
    return isinstance(error, ClientClosedError) or (
        isinstance(error, OpenrunError) and error.status is not None
    )


def _abandon_plan(call: Call[Any]) -> Plan[int]:
    assert call.request_label is not None
    window = FORK_ABANDON_WINDOW if call.path.endswith("/fork") else ABANDON_WINDOW
    return abandoned(call.request_label, call.expected, window)


def _line(raw: str) -> Optional[Dict[str, Any]]:
    raw = raw.strip()
    if not raw:
        return None
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object per line, got {raw[:200]!r}")
    return value


async def _chunks(chunks: List[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class _Base:
    def __init__(self, target: Target, timeout: Optional[float]):
        self.target = target
        self.timeout = timeout
        self._plain, self._streaming = _timeouts(timeout)
        # Handles using this transport (a sandbox and its forks share one); guarded by the
        # lock, since handles are used (and closed) from several threads.
        self._users = 0
        self._lock = threading.Lock()
        self.closed = False

    def _request(
        self, client: Union[httpx.Client, httpx.AsyncClient], call: Call[Any], read_timeout: Any
    ) -> httpx.Request:
        if self.closed:
            raise ClientClosedError("this client was closed: connect again with Sandbox.connect(id)")
        # A create or fork is finished by the server even when its client leaves: waiting for
        # its answer without a read timeout is what keeps the new sandbox from having no handle.
        timeout = self._streaming if call.stream or call.no_read_timeout else self._plain
        if read_timeout is not _UNSET:
            timeout = httpx.Timeout(
                connect=timeout.connect, read=read_timeout, write=timeout.write, pool=timeout.pool
            )
        content: Any = call.content
        if isinstance(content, list):  # chunks, sent as they are (a large file is not copied)
            content = _chunks(content) if isinstance(client, httpx.AsyncClient) else iter(content)
        return client.build_request(
            call.method,
            call.path,
            params=tuple(call.params) if call.params else None,
            json=call.json,
            content=content,
            headers=call.headers or None,
            timeout=timeout,
        )

    def retain(self) -> None:
        """One more sandbox handle uses this transport."""
        with self._lock:
            self._users += 1

    def _last_release(self) -> bool:
        """A handle is done with it: whether it was the last (the transport is then closed)."""
        with self._lock:
            self._users -= 1
            if self._users > 0 or self.closed:
                return False
            self.closed = True
            return True


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
        (a 429 is retried after its ``Retry-After``, :data:`MAX_RETRIES` times).

        A create or fork left without its answer (interrupted, connection broken) deletes
        what the server makes for it (:func:`~openrun._ops.abandoned`) before raising."""
        if call.request_label is None:
            return self._call(call)
        try:
            return self._call(call)
        except BaseException as e:
            if not _answered(e):
                try:
                    self.run(_abandon_plan(call))
                except Exception:  # the original error is what the caller needs to see
                    pass
            raise

    def _call(self, call: Call[T]) -> T:
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

    def run(self, plan: Plan[T]) -> T:
        """Runs a multi-step operation of :mod:`openrun._ops` (its calls one after another)."""
        try:
            call = next(plan)
            while True:
                if call.method == "SLEEP":
                    time.sleep(call.json)
                    result: Any = None
                else:
                    try:
                        result = self.call(call)
                    except OpenrunError as e:
                        call = plan.throw(e)
                        continue
                call = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

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
        if self._last_release():
            self.client.close()

    def close(self) -> None:
        """Closes the connection pool whoever uses it (a transport no handle took)."""
        with self._lock:
            self.closed = True
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
        (a 429 is retried after its ``Retry-After``, :data:`MAX_RETRIES` times).

        A create or fork left without its answer (cancelled, connection broken) deletes what
        the server makes for it (:func:`~openrun._ops.abandoned`) before raising; that clean-up
        is shielded from a second cancellation."""
        if call.request_label is None:
            return await self._call(call)
        try:
            return await self._call(call)
        except BaseException as e:
            if not _answered(e):
                cleanup = asyncio.ensure_future(self.run(_abandon_plan(call)))
                try:
                    await asyncio.shield(cleanup)
                except BaseException:  # the original error is what the caller needs to see
                    pass
            raise

    async def run(self, plan: Plan[T]) -> T:
        """Runs a multi-step operation of :mod:`openrun._ops` (its calls one after another)."""
        try:
            call = next(plan)
            while True:
                if call.method == "SLEEP":
                    await asyncio.sleep(call.json)
                    result: Any = None
                else:
                    try:
                        result = await self.call(call)
                    except OpenrunError as e:
                        call = plan.throw(e)
                        continue
                call = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _call(self, call: Call[T]) -> T:
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
        if self._last_release():
            await self.client.aclose()

    async def close(self) -> None:
        """Closes the connection pool whoever uses it (a transport no handle took)."""
        with self._lock:
            self.closed = True
        await self.client.aclose()
