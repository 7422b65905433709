"""One initialised JSON-RPC session with an upstream, and the supervised state it lives in.

Results stay in wire form, so a call is not parsed into models and back on its way through; the
link's channel errors become `UpstreamError`s naming the upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from gateway import __version__
from gateway.calls import ProgressFn
from gateway.catalog.listing import UpstreamListing, normalise_listing
from gateway.config.models import UpstreamSpec
from gateway.errors import (
    ChannelClosed,
    ConnectionFailed,
    RemoteError,
    RequestTimeout,
    UpstreamFault,
    UpstreamTimeout,
    UpstreamUnavailable,
)

HTTP_PING_INTERVAL = 30.0
_LIST_PAGE_LIMIT = 1000


class Link(Protocol):
    """One JSON-RPC connection to an upstream, seen from the requesting side."""

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        seconds: float,
        on_progress: ProgressFn | None = None,
        cancel_on_abandon: bool = True,
    ) -> dict[str, Any]: ...

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None: ...


class UpstreamSession:
    """An initialised JSON-RPC session with one upstream."""

    def __init__(self, spec: UpstreamSpec, link: Link, timeout: float) -> None:
        self.spec = spec
        self.name = spec.name
        self.timeout = timeout
        self._link = link
        self.init: types.InitializeResult | None = None

    @property
    def protocol_version(self) -> str:
        return self.init.protocol_version if self.init is not None else ""

    async def initialize(self) -> types.InitializeResult:
        params = {
            "protocolVersion": LATEST_HANDSHAKE_VERSION,
            # Passed on to the agent's client while a call is in flight (`UpstreamPool.relaying`).
            "capabilities": {"sampling": {}, "elicitation": {"form": {}}},
            "clientInfo": {"name": "mcp-armor", "version": __version__},
        }
        raw = await self.request("initialize", params, cancel_on_abandon=False)
        try:
            result = types.InitializeResult.model_validate(raw, by_name=False)
        except ValidationError as exc:
            message = f"answered initialize with a malformed result: {exc.errors()[0]['msg']}"
            raise UpstreamFault(self.name, message) from None
        if result.protocol_version not in HANDSHAKE_PROTOCOL_VERSIONS:
            message = f"offered protocol version {result.protocol_version!r}, which is unsupported"
            raise UpstreamFault(self.name, message)
        self.init = result
        try:
            await self._link.notify("notifications/initialized", None)
        except (ChannelClosed, ConnectionFailed, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise UpstreamUnavailable(self.name, f"connection failed: {exc}") from None
        return result

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        seconds: float | None = None,
        on_progress: ProgressFn | None = None,
        cancel_on_abandon: bool = True,
    ) -> dict[str, Any]:
        """Send one request and return its raw result; upstream failures become `UpstreamError`s."""
        seconds = self.timeout if seconds is None else seconds
        try:
            return await self._link.request(
                method, params, seconds=seconds, on_progress=on_progress, cancel_on_abandon=cancel_on_abandon
            )
        except RequestTimeout:
            raise UpstreamTimeout(self.name, seconds) from None
        except ChannelClosed:
            raise UpstreamUnavailable(self.name, "closed the connection") from None
        except RemoteError as exc:
            raise UpstreamFault(self.name, f"answered {method} with error {exc.code}: {exc.message}") from None
        except (ConnectionFailed, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise UpstreamUnavailable(self.name, f"connection failed: {exc}") from None

    async def list_all(self) -> UpstreamListing:
        """Fetch every listing the upstream offers, following pagination."""
        capabilities = self.init.capabilities if self.init is not None else types.ServerCapabilities()
        tools = await self._paginate("tools/list", "tools") if capabilities.tools is not None else []
        prompts = await self._paginate("prompts/list", "prompts") if capabilities.prompts is not None else []
        resources: list[Any] = []
        templates: list[Any] = []
        if capabilities.resources is not None:
            resources = await self._paginate("resources/list", "resources")
            templates = await self._paginate("resources/templates/list", "resourceTemplates")
        server = {}
        if self.init is not None:
            info = self.init.server_info
            server = {"name": info.name, "version": info.version, "instructions": self.init.instructions}
        # Compiling every schema of a listing costs seconds a megabyte, and an upstream may re-list at will:
        # in a worker thread, so the event loop (every other session) keeps its turns meanwhile.
        return await anyio.to_thread.run_sync(
            partial(normalise_listing, self.name, tools, prompts, resources, templates, server)
        )

    async def _paginate(self, method: str, key: str) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(_LIST_PAGE_LIMIT):
            page = await self.request(method, {"cursor": cursor} if cursor is not None else None)
            batch = page.get(key)
            if not isinstance(batch, list):
                raise UpstreamFault(self.name, f"answered {method} without a '{key}' list")
            items.extend(batch)
            cursor = page.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                return items
            if cursor in seen:
                raise UpstreamFault(self.name, f"answered {method} with a cursor that repeats")
            seen.add(cursor)
        raise UpstreamFault(self.name, f"answered {method} with more than {_LIST_PAGE_LIMIT} pages")

    async def ping(self) -> None:
        await self.request("ping", None)


class Upstream:
    """The supervised state of one upstream: its live session (when up) and its latest listing."""

    def __init__(self, spec: UpstreamSpec, timeout: float) -> None:
        self.spec = spec
        self.name = spec.name
        self.timeout = timeout
        self.session: UpstreamSession | None = None
        self.listing: UpstreamListing | None = None
        self.last_error: str | None = None
        self.settled = anyio.Event()
        """Set once the first connection attempt has finished, whether it succeeded or not."""

    @property
    def is_up(self) -> bool:
        return self.session is not None

    def require_session(self) -> UpstreamSession:
        if self.session is None:
            reason = f": {self.last_error}" if self.last_error else ""
            raise UpstreamUnavailable(self.name, f"is not connected{reason}")
        return self.session


async def keepalive(session: UpstreamSession) -> None:
    """HTTP upstreams have no pipe whose end tells of their death: ping them now and then."""
    while True:
        await anyio.sleep(HTTP_PING_INTERVAL)
        await session.ping()
