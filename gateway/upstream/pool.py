"""The upstream pool: one supervised JSON-RPC session per upstream server, restarted when it fails.

Towards upstreams the gateway speaks the handshake era (`initialize`), which every MCP server
speaks, TypeScript-SDK servers included; the protocol version is negotiated per upstream. It
talks to them as a plain JSON-RPC client (id correlation, progress, courtesy cancels, timeouts):
straight over the child's pipes for a command (`gateway.wire.channel`), through the SDK's dispatcher for
a URL. Results stay in wire form, so a call is not parsed into models and back on its way through.

Each upstream is owned by one supervising task that connects, lists, serves until the connection
ends, and reconnects with exponential backoff and jitter. An upstream that fails never takes the
others down; its tools leave the catalogue and come back with it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol, TextIO

import anyio
import anyio.abc
import mcp_types as types
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from gateway import __version__
from gateway.calls import RELAYED_METHODS, ProgressFn, Relay, ToolCall
from gateway.catalog.listing import Catalog, UpstreamListing, exposed_name, normalise_listing
from gateway.catalog.pins import Assessment, Lock, Mode, assess, screened
from gateway.config.environment import Passing
from gateway.config.models import Config, UpstreamSpec
from gateway.errors import (
    ChannelClosed,
    ConnectionFailed,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UpstreamFault,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream.processes import command_line, discard_ahead
from gateway.upstream.spawn import spawn
from gateway.wire.channel import NotificationHandler, RequestHandler

logger = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HTTP_PING_INTERVAL = 30.0
_LIST_PAGE_LIMIT = 1000
_LIST_CHANGED = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    }
)


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
        return normalise_listing(self.name, tools, prompts, resources, templates, server)

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


class _Relaying:
    """`UpstreamPool.relaying`: a plain context manager, as it is entered for every call."""

    __slots__ = ("_call", "_relays")

    def __init__(self, relays: dict[str, list[tuple[ToolCall, Relay]]], call: ToolCall) -> None:
        self._relays = relays
        self._call = call

    def __enter__(self) -> None:
        call = self._call
        if call.relay is not None:
            self._relays.setdefault(call.tool.upstream, []).append((call, call.relay))

    def __exit__(self, *_: object) -> None:
        call = self._call
        if call.relay is not None:
            self._relays[call.tool.upstream].remove((call, call.relay))


CatalogListener = Callable[[Catalog], Awaitable[None]]
StatusListener = Callable[[str, bool, str], None]
"""Told when an upstream comes up or goes down: its name, whether it is up, and a description."""
AssessmentListener = Callable[[list[Assessment]], None]
"""Told, at every publish, how each definition on offer was judged against the lock and the scan."""
RelayListener = Callable[[str, str, ToolCall | None, str, str | None], None]
"""Told of every sampling or elicitation request an upstream sent: upstream, method, the call it went to
(`None`: none could take it), how it ended (`relayed`: the client answered; `refused`; `cancelled`:
withdrawn by the upstream, or its connection ended, before the client answered), and why (or `None`)."""


class UpstreamPool:
    """All upstreams of a config, each under its own supervisor, merged into one `Catalog`."""

    def __init__(self, config: Config, *, lock: Lock | None = None, on_catalog: CatalogListener | None = None) -> None:
        self.config = config
        self.upstreams = {
            spec.name: Upstream(spec, config.call_timeout(spec.name)) for spec in config.enabled_upstreams()
        }
        self.catalog = Catalog()
        self.lock = lock
        """The pins in force; `None`: no lock file (only poisoning findings quarantine)."""
        self.quarantined: dict[str, Assessment] = {}
        """Exposed tool name -> why that tool is held back."""
        self._modes = {name: Mode(config.pinning(name)) for name in config.upstreams}
        self._on_catalog = on_catalog
        self._on_status: StatusListener | None = None
        self._on_assessed: AssessmentListener | None = None
        self._catalog_lock = anyio.Lock()
        self._relays: dict[str, list[tuple[ToolCall, Relay]]] = {}
        """Per upstream, the calls in flight whose client can take the upstream's own requests."""
        self.on_relayed: RelayListener | None = None

    def set_listener(
        self,
        listener: CatalogListener,
        status: StatusListener | None = None,
        assessed: AssessmentListener | None = None,
    ) -> None:
        self._on_catalog = listener
        self._on_status = status
        self._on_assessed = assessed

    async def install_lock(self, lock: Lock | None) -> None:
        """Put new pins in force and expose (or withhold) the definitions accordingly."""
        self.lock = lock
        await self._publish()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Supervise every upstream until cancelled. Reports started at once: upstreams join as they come up."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as tg:
            for upstream in self.upstreams.values():
                tg.start_soon(self._supervise, upstream, name=f"upstream {upstream.name}")
            tg.start_soon(self._discard_unadopted)
            task_status.started()

    async def _discard_unadopted(self) -> None:
        """Upstreams started ahead of the gateway (see gateway.launch) that no supervisor took are stopped."""
        for upstream in self.upstreams.values():
            await upstream.settled.wait()
        await anyio.to_thread.run_sync(discard_ahead)

    async def wait_settled(self, within: float) -> None:
        """Wait until every upstream's first connection attempt has finished, or `within` seconds pass."""
        with anyio.move_on_after(within):
            for upstream in self.upstreams.values():
                await upstream.settled.wait()

    def get(self, name: str) -> Upstream:
        upstream = self.upstreams.get(name)
        if upstream is None:
            raise UpstreamUnavailable(name, "is not configured")
        return upstream

    async def _supervise(self, upstream: Upstream) -> None:
        if upstream.spec.unavailable is not None:  # a variable it needs is not set: never started
            upstream.last_error = upstream.spec.unavailable
            upstream.settled.set()
            logger.warning("upstream '%s' unavailable: %s", upstream.name, upstream.last_error)
            if self._on_status is not None:
                self._on_status(upstream.name, False, f"unavailable: {upstream.last_error}")
            return
        backoff = INITIAL_BACKOFF
        while True:
            was_up = False
            try:
                async with self._connect(upstream) as closed:
                    was_up = True
                    backoff = INITIAL_BACKOFF
                    await closed.wait()
                    # Withdraw its tools now: shutting the transport down can take seconds.
                    await self._withdraw(upstream)
                upstream.last_error = "closed the connection"
            except Exception as exc:  # supervision boundary: any failure of one upstream restarts it
                upstream.last_error = _describe_failure(exc)
            finally:
                upstream.settled.set()
                with anyio.CancelScope(shield=True):
                    await self._withdraw(upstream)
            delay = backoff * random.uniform(0.8, 1.2)
            if self._on_status is not None:
                self._on_status(
                    upstream.name, False, f"{'went down' if was_up else 'failed to start'}: {upstream.last_error}"
                )
            logger.warning(
                "upstream '%s' %s %s; retrying in %.1fs (log: %s)",
                upstream.name,
                "went down:" if was_up else "failed to start:",
                upstream.last_error,
                delay,
                self.config.log_path(upstream.name),
            )
            await anyio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def relaying(self, call: ToolCall) -> _Relaying:
        """While `call` is in flight, its upstream's sampling and elicitation requests go to its client."""
        return _Relaying(self._relays, call)

    def _answerer(self, upstream: str) -> RequestHandler:
        async def answer(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
            return await self._answer_upstream_request(upstream, method, params)

        return answer

    async def _answer_upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """A request an upstream sends the gateway: `ping` is answered here; sampling and elicitation go to
        the client of the latest call in flight to that upstream (stdio upstreams cannot say which call
        a request belongs to); anything else, or no such call, is refused."""
        if method == "ping":
            return {}
        if method not in RELAYED_METHODS:
            raise RemoteError(types.METHOD_NOT_FOUND, f"mcp-armor does not serve '{method}' to upstream servers")
        calls = self._relays.get(upstream)
        if not calls:
            message = f"no call to '{upstream}' is in flight from a client that can answer {method}"
            self._relayed(upstream, method, None, "refused", message)
            raise RemoteError(types.INVALID_REQUEST, message)
        call, relay = calls[-1]
        try:
            result = await relay(method, params or {})
        except ProtocolError as exc:
            self._relayed(upstream, method, call, "refused", exc.message)
            raise RemoteError(exc.code, exc.message, exc.data) from None
        except anyio.get_cancelled_exc_class():
            self._relayed(upstream, method, call, "cancelled", "withdrawn before the client answered")
            raise
        self._relayed(upstream, method, call, "relayed", None)
        return result

    def _relayed(self, upstream: str, method: str, call: ToolCall | None, outcome: str, detail: str | None) -> None:
        if outcome == "refused":
            logger.warning("upstream '%s' asked %s: refused (%s)", upstream, method, detail)
        if self.on_relayed is not None:
            self.on_relayed(upstream, method, call, outcome, detail)

    async def _withdraw(self, upstream: Upstream) -> None:
        if upstream.session is not None or upstream.listing is not None:
            upstream.session = None
            upstream.listing = None
            await self._publish()

    @asynccontextmanager
    async def _connect(self, upstream: Upstream) -> AsyncIterator[Ended]:
        """Connect, initialise and list one upstream; yield an event that is set when the connection ends."""
        spec = upstream.spec
        relist = _Flag()

        def on_notify(method: str, params: Mapping[str, Any] | None) -> None:
            if method in _LIST_CHANGED:
                relist.set()

        async with AsyncExitStack() as stack:
            errlog = stack.enter_context(self.config.log_path(upstream.name).open("a", encoding="utf-8"))
            link, closed = await stack.enter_async_context(
                _open_link(spec, self.config.passing(spec.name), errlog, self._answerer(spec.name), on_notify)
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            session = UpstreamSession(spec, link, upstream.timeout)
            await session.initialize()
            upstream.listing = await session.list_all()
            upstream.session = session
            upstream.last_error = None
            _log_problems(upstream.listing)
            logger.info(
                "upstream '%s' up (%s, protocol %s, %d tools)",
                upstream.name,
                spec.transport,
                session.protocol_version,
                len(upstream.listing.tools),
            )
            if self._on_status is not None:
                detail = f"{spec.transport}, protocol {session.protocol_version}, {len(upstream.listing.tools)} tools"
                self._on_status(upstream.name, True, detail)
            await self._publish()
            upstream.settled.set()
            tg.start_soon(self._relist_when_changed, upstream, session, relist)
            if spec.transport == "http":
                tg.start_soon(_keepalive, session)
            yield closed

    async def _relist_when_changed(self, upstream: Upstream, session: UpstreamSession, relist: _Flag) -> None:
        while True:
            await relist.wait()
            try:
                listing = await session.list_all()
            except UpstreamTimeout as exc:
                logger.warning("%s while re-listing after a change; keeping the previous listing", exc)
                continue
            _log_problems(listing)
            upstream.listing = listing
            await self._publish()

    async def _publish(self) -> None:
        """Rebuild the catalogue from every live listing and tell the listener."""
        async with self._catalog_lock:
            listings = [up.listing for up in self.upstreams.values() if up.listing is not None]
            separator = self.config.gateway.separator
            assessments = assess(listings, self.lock, self._modes, separator)
            self.quarantined = {
                exposed_name(a.item.upstream, a.item.name, separator): a
                for a in assessments
                if a.quarantined and a.item.kind == "tool"
            }
            if self._on_assessed is not None:
                self._on_assessed(assessments)
            catalog = Catalog.build(screened(listings, assessments), separator)
            for problem in catalog.problems:
                if problem not in self.catalog.problems:
                    logger.error("catalogue: %s", problem)
            self.catalog = catalog
            if self._on_catalog is not None:
                await self._on_catalog(catalog)


class _Flag:
    """A re-armable event: `set()` any number of times, `wait()` returns once per burst."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


async def _keepalive(session: UpstreamSession) -> None:
    """HTTP upstreams have no pipe whose end tells of their death: ping them now and then."""
    while True:
        await anyio.sleep(HTTP_PING_INTERVAL)
        await session.ping()


def _log_problems(listing: UpstreamListing) -> None:
    for problem in listing.problems:
        logger.warning("upstream '%s': %s", listing.upstream, problem)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe_failure(inner) for inner in exc.exceptions)
    if isinstance(exc, UpstreamTimeout | UpstreamUnavailable | UpstreamFault):
        text = str(exc)
        return text.split(" ", 2)[2] if text.startswith("upstream '") else text
    if isinstance(exc, FileNotFoundError | PermissionError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"could not be started: {exc.strerror or exc}"
    if type(exc).__module__.split(".")[0] == "httpx2":  # only ever raised once an HTTP upstream loaded it
        return f"HTTP error: {exc}"
    return f"{type(exc).__name__}: {exc}"


class Ended(Protocol):
    """Set when a connection to an upstream has ended."""

    async def wait(self) -> Any: ...


@asynccontextmanager
async def _open_link(
    spec: UpstreamSpec, passing: Passing, errlog: TextIO, answer: RequestHandler, on_notify: NotificationHandler
) -> AsyncIterator[tuple[Link, Ended]]:
    """The upstream's `Link`, and an event set when its connection ends.

    A command runs as a child process spoken to over its pipes directly; a URL goes through the SDK's
    streamable-HTTP client and JSON-RPC dispatcher.
    """
    if spec.command is not None:
        async with spawn(
            spec.name,
            command_line(spec.command, spec.args, spec.env),
            env=spec.env,
            cwd=spec.cwd,
            stderr=errlog,
            passing=passing,
            on_request=answer,
            on_notify=on_notify,
        ) as child:
            yield child.channel, child.ended
        return
    if spec.url is None:
        raise ValueError(f"upstream '{spec.name}' has neither command nor url")
    from gateway.upstream.http import open_http_link  # the SDK's HTTP client loads only for URL upstreams

    async with open_http_link(spec, answer, on_notify) as (link, closed):
        yield link, closed
