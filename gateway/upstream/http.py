"""Upstreams at a URL: streamable HTTP through the SDK's client transport and JSON-RPC dispatcher.

Imported only when the config names a URL upstream, so a gateway fronting commands alone never
loads the SDK's HTTP client. The link raises what `gateway.wire.channel.Channel` raises (`RemoteError`,
`RequestTimeout`, `ChannelClosed`, and `ConnectionFailed` for an HTTP failure underneath).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import CallOptions, DispatchContext
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.transport_context import TransportContext

from gateway.calls import ProgressFn
from gateway.config.models import UpstreamSpec
from gateway.errors import ChannelClosed, ConnectionFailed, RemoteError, RequestTimeout
from gateway.wire.channel import NotificationHandler, RequestHandler

_PROTOCOL_VERSION_HEADER = "mcp-protocol-version"
_strict_json = json.JSONEncoder(allow_nan=False).encode
_NON_FINITE = "a number JSON cannot carry (NaN or an infinity)"

logger = logging.getLogger(__name__)


def _carried_by_json(value: Any) -> bool:
    """Whether `value` holds no NaN or infinity (the SDK's reader takes them; a stdio upstream's are refused)."""
    try:
        _strict_json(value)
    except ValueError:
        return False
    return True


class HttpLink:
    """A streamable-HTTP upstream through the SDK's JSON-RPC dispatcher, with `Link`'s errors."""

    def __init__(self, dispatcher: JSONRPCDispatcher[TransportContext]) -> None:
        self._dispatcher = dispatcher
        self.protocol_version: str | None = None
        """Sent as `mcp-protocol-version` on every request after `initialize` (taken from its answer)."""

    def _options(self) -> CallOptions:
        opts: CallOptions = {}
        if self.protocol_version is not None:
            opts["headers"] = {_PROTOCOL_VERSION_HEADER: self.protocol_version}
        return opts

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        seconds: float,
        on_progress: ProgressFn | None = None,
        cancel_on_abandon: bool = True,
    ) -> dict[str, Any]:
        opts = self._options()
        opts["timeout"] = seconds
        opts["cancel_on_abandon"] = cancel_on_abandon
        if on_progress is not None:
            opts["on_progress"] = on_progress
        try:
            result = await self._dispatcher.send_raw_request(method, params, opts)
        except httpx2.HTTPError as exc:
            raise ConnectionFailed(str(exc)) from None
        except MCPError as exc:
            if exc.error.code == types.REQUEST_TIMEOUT:
                raise RequestTimeout() from None
            if exc.error.code == types.CONNECTION_CLOSED:
                raise ChannelClosed(exc.error.message) from None
            raise RemoteError(exc.error.code, exc.error.message, exc.error.data) from None
        if not _carried_by_json(result):  # the SDK reads NaN and infinities; passed on, they would turn into null
            raise RemoteError(types.INTERNAL_ERROR, f"the gateway refused its answer: {_NON_FINITE}")
        if method == "initialize" and isinstance(version := result.get("protocolVersion"), str):
            self.protocol_version = version
        return result

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        try:
            await self._dispatcher.notify(method, params, self._options())
        except httpx2.HTTPError as exc:
            raise ConnectionFailed(str(exc)) from None


class _Oversize(httpx2.StreamError):
    """An answer longer than the gateway takes from an upstream (the SDK fails the request it answers)."""


class _Bounded(httpx2.AsyncByteStream):
    """A response body that ends in `_Oversize` once it passes `limit` bytes: never read whole."""

    def __init__(self, stream: httpx2.AsyncByteStream, limit: int, name: str) -> None:
        self._stream = stream
        self._limit = limit
        self._name = name

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self._stream:
            read += len(chunk)
            if read > self._limit:
                raise _Oversize(
                    f"upstream '{self._name}' sent an answer of more than {self._limit} bytes, over the limit "
                    "([gateway] max_upstream_message_size)"
                )
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class _BoundedTransport(httpx2.AsyncBaseTransport):
    """Bounds each JSON answer at `limit` bytes as it is read; an event stream is bounded per event by
    the SDK's reader (`max_sse_event_size`), so a long-lived stream of small events is not cut."""

    def __init__(self, limit: int, name: str) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self._limit = limit
        self._name = name

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Bounded(stream, self._limit, self._name),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def open_http_link(
    spec: UpstreamSpec, answer: RequestHandler, on_notify: NotificationHandler, limit: int
) -> AsyncIterator[tuple[HttpLink, anyio.Event]]:
    """Connect to `spec.url`; yield the link and an event set when the connection ends. An answer (or an
    event of a stream) over `limit` bytes fails the request it answers, unread past the limit."""
    assert spec.url is not None
    timeout = httpx2.Timeout(30, read=300)
    closed = anyio.Event()
    transport = _BoundedTransport(limit, spec.name)
    async with (
        httpx2.AsyncClient(headers=dict(spec.headers), timeout=timeout, transport=transport) as http,
        streamable_http_client(spec.url, http_client=http, max_sse_event_size=limit) as (read, write),
        anyio.create_task_group() as link_tg,
    ):
        dispatcher: JSONRPCDispatcher[TransportContext] = JSONRPCDispatcher(read, write)

        async def on_request(
            dctx: DispatchContext[TransportContext], method: str, params: Mapping[str, Any] | None
        ) -> dict[str, Any]:
            if not _carried_by_json(dict(params or {})):
                raise MCPError(code=types.INVALID_PARAMS, message=f"Invalid request parameters: {_NON_FINITE}")
            try:
                return await answer(method, params)
            except RemoteError as exc:
                raise MCPError(code=exc.code, message=exc.message) from None

        async def on_dispatched_notify(
            dctx: DispatchContext[TransportContext], method: str, params: Mapping[str, Any] | None
        ) -> None:
            if not _carried_by_json(dict(params or {})):
                logger.warning("upstream '%s' sent %s %s; ignored", spec.name, method, _NON_FINITE)
                return
            on_notify(method, params)

        async def run_dispatcher(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await dispatcher.run(on_request, on_dispatched_notify, task_status=task_status)
            finally:
                closed.set()

        await link_tg.start(run_dispatcher)
        try:
            yield HttpLink(dispatcher), closed
        finally:
            link_tg.cancel_scope.cancel()
