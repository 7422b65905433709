"""The upstream pool: one supervised JSON-RPC session per upstream server, restarted when it fails.

Towards upstreams the gateway speaks the handshake era (`initialize`), which every MCP server
speaks, TypeScript-SDK servers included; the protocol version is negotiated per upstream. It
talks to them as a plain JSON-RPC client (id correlation, progress, courtesy cancels, timeouts):
straight over the child's pipes for a command (`gateway.wire.channel`), through the SDK's dispatcher for
a URL (`gateway.upstream.links`); `gateway.upstream.session` holds one initialised session.

Each upstream is owned by one supervising task that connects, lists, serves until the connection
ends, and reconnects with exponential backoff and jitter. An upstream that fails never takes the
others down; its tools leave the catalogue and come back with it. What changes is told to the one
`UpstreamListener` attached, and every request an upstream sends is handed to it.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.abc
import mcp_types as types

from gateway.calls import ToolCall
from gateway.catalog.listing import Catalog, Naming, UpstreamListing
from gateway.catalog.pins import Assessment, Kind, Lock, Mode, assess, screened
from gateway.catalog.uri_template import UriTemplate
from gateway.catalog.uris import normal_uri
from gateway.config.models import Config
from gateway.errors import (
    InvalidUriTemplate,
    ProtocolError,
    RemoteError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream.events import UpstreamListener
from gateway.upstream.links import Ended, describe_failure, open_link
from gateway.upstream.processes import discard_ahead
from gateway.upstream.session import Upstream, UpstreamSession, keepalive
from gateway.wire.channel import RequestHandler

logger = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0
NOTICES = frozenset({"notifications/message", "notifications/resources/updated"})
"""What an upstream sends on its own that is handed to the listener (in order, per upstream)."""
NOTICE_WAIT = 2.0
"""Seconds an answer waits for the notices its upstream sent before it to be passed on."""
NOTICE_BACKLOG = 256
"""Notices of one upstream waiting for the listener; more are dropped (with a warning)."""
_LIST_CHANGED = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    }
)


class _Relaying:
    """`UpstreamPool.relaying`: a plain context manager, as it is entered for every call."""

    __slots__ = ("_call", "_relays")

    def __init__(self, relays: dict[str, list[ToolCall]], call: ToolCall) -> None:
        self._relays = relays
        self._call = call

    def __enter__(self) -> None:
        self._relays.setdefault(self._call.tool.upstream, []).append(self._call)

    def __exit__(self, *_: object) -> None:
        self._relays[self._call.tool.upstream].remove(self._call)


class UpstreamPool:
    """All upstreams of a config, each under its own supervisor, merged into one `Catalog`."""

    def __init__(self, config: Config, *, lock: Lock | None = None) -> None:
        self.config = config
        self.upstreams = {
            spec.name: Upstream(spec, config.call_timeout(spec.name)) for spec in config.enabled_upstreams()
        }
        self.catalog = Catalog()
        self.lock = lock
        """The pins in force; `None`: no lock file (only poisoning findings quarantine)."""
        self.quarantined: dict[str, Assessment] = {}
        """Exposed tool name -> why that tool is held back."""
        self.quarantined_prompts: dict[str, Assessment] = {}
        """Exposed prompt name -> why that prompt is held back."""
        self._quarantined_reads: list[Assessment] = []
        self._modes = {name: Mode(config.pinning(name)) for name in config.upstreams}
        self._listener: UpstreamListener | None = None
        self._catalog_lock = anyio.Lock()
        self._relays: dict[str, list[ToolCall]] = {}
        """Per upstream, every call in flight to it, oldest first (its requests are handed over with them)."""
        self._notices: dict[str, _Notices] = {}
        """Per connected upstream, its notices on their way to the listener."""
        self._log_level: str | None = None
        """The log level upstreams are asked for (`set_log_level`), also when they connect later."""

    def listen(self, listener: UpstreamListener) -> None:
        """Tell `listener` of every change from now on, and hand it every request an upstream sends."""
        self._listener = listener

    async def install_lock(self, lock: Lock | None) -> None:
        """Put new pins in force and expose (or withhold) the definitions accordingly."""
        self.lock = lock
        await self._publish()

    def quarantined_read(self, uri: str) -> Assessment | None:
        """Why a read of `uri` (in normal form) is held back: a quarantined resource of that URI, or a
        quarantined template it falls under; `None` when neither."""
        for held in self._quarantined_reads:
            if held.item.kind is Kind.RESOURCE and normal_uri(held.item.name) == uri:
                return held
        for held in self._quarantined_reads:
            if held.item.kind is Kind.TEMPLATE:
                try:
                    if UriTemplate.parse(held.item.name).variables(uri) is not None:
                        return held
                except InvalidUriTemplate:
                    continue  # a template that cannot be parsed serves nothing anyway
        return None

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
            if self._listener is not None:
                self._listener.upstream_changed(upstream.name, False, f"unavailable: {upstream.last_error}")
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
                upstream.last_error = describe_failure(exc)
            finally:
                upstream.settled.set()
                with anyio.CancelScope(shield=True):
                    await self._withdraw(upstream)
            delay = backoff * random.uniform(0.8, 1.2)
            if self._listener is not None:
                self._listener.upstream_changed(
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
        """While `call` is in flight, its upstream's requests are handed to the listener with it."""
        return _Relaying(self._relays, call)

    def _answerer(self, upstream: str) -> RequestHandler:
        async def answer(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
            return await self.answer(upstream, method, params)

        return answer

    async def answer(self, upstream: str, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the gateway answers a request `upstream` sent it: the listener's result, asked with every call
        in flight to that upstream, oldest first. With no listener attached, every request is refused."""
        listener = self._listener
        if listener is None:
            raise RemoteError(types.METHOD_NOT_FOUND, f"mcp-armor does not serve '{method}' to upstream servers")
        calls = self._relays.get(upstream)
        try:
            return await listener.upstream_request(upstream, method, params or {}, tuple(calls or ()))
        except ProtocolError as exc:
            raise RemoteError(exc.code, exc.message, exc.data) from None

    async def set_log_level(self, level: str) -> None:
        """Ask every upstream that logs for messages from `level` up (and each that connects later)."""
        self._log_level = level
        for upstream in self.upstreams.values():
            if upstream.session is not None:
                await _set_level(upstream.session, level)

    async def unsubscribe(self, upstream: str, uri: str) -> None:
        """Withdraw the gateway's subscription to `uri` (as the upstream spells it) at `upstream`."""
        await self.get(upstream).require_session().request("resources/unsubscribe", {"uri": uri})

    async def notices_passed(self, upstream: str) -> None:
        """Wait until every notice `upstream` sent so far has been handed to the listener: an answer goes
        to the agent after the log messages the upstream sent before it, as the upstream ordered them."""
        notices = self._notices.get(upstream)
        if notices is not None:
            with anyio.move_on_after(NOTICE_WAIT):  # never held up for long by what others are sent
                await notices.passed()

    async def _hand_over(self, upstream: str, notices: _Notices) -> None:
        """Give the listener each notice of `upstream`, in the order they came (until the connection ends)."""
        with contextlib.suppress(anyio.ClosedResourceError):
            async for method, params, calls in notices.received:
                try:
                    if self._listener is not None:
                        await self._listener.upstream_notification(upstream, method, params, calls)
                except Exception:  # one notice that cannot be passed on never stops the next
                    logger.exception("a %s from upstream '%s' could not be passed on", method, upstream)
                finally:
                    notices.handed_over()

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
        notices = _Notices()

        def on_notify(method: str, params: Mapping[str, Any] | None) -> None:
            if method in _LIST_CHANGED:
                relist.set()
            elif method in NOTICES:
                # Whose it is depends on the calls in flight now, as it arrives.
                if not notices.send((method, dict(params or {}), tuple(self._relays.get(spec.name, ())))):
                    logger.warning("upstream '%s' sends notices faster than they are passed on; one dropped", spec.name)

        async with AsyncExitStack() as stack:
            stack.callback(notices.close)
            errlog = stack.enter_context(self.config.log_path(upstream.name).open("a", encoding="utf-8"))
            link, closed = await stack.enter_async_context(
                open_link(
                    spec,
                    self.config.passing(spec.name),
                    errlog,
                    self._answerer(spec.name),
                    on_notify,
                    self.config.gateway.max_upstream_message_size,
                )
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            self._notices[spec.name] = notices
            stack.callback(self._notices.pop, spec.name, None)
            tg.start_soon(self._hand_over, spec.name, notices)
            session = UpstreamSession(spec, link, upstream.timeout)
            await session.initialize()
            if self._log_level is not None:
                await _set_level(session, self._log_level)
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
            if self._listener is not None:
                detail = f"{spec.transport}, protocol {session.protocol_version}, {len(upstream.listing.tools)} tools"
                self._listener.upstream_changed(upstream.name, True, detail)
            await self._publish()
            upstream.settled.set()
            tg.start_soon(self._relist_when_changed, upstream, session, relist)
            if spec.transport == "http":
                tg.start_soon(keepalive, session)
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
            names = Naming.of(self.config)
            # The scan of every definition is pure work: in a worker thread, as listing is (`list_all`).
            assessments = await anyio.to_thread.run_sync(partial(assess, listings, self.lock, self._modes, names))
            self.quarantined = {
                names.exposed(a.item.upstream, a.item.name): a
                for a in assessments
                if a.quarantined and a.item.kind == "tool"
            }
            self.quarantined_prompts = {
                names.exposed(a.item.upstream, a.item.name): a
                for a in assessments
                if a.quarantined and a.item.kind == "prompt"
            }
            self._quarantined_reads = [a for a in assessments if a.quarantined and a.item.kind in _READS]
            if self._listener is not None:
                self._listener.assessed(assessments)
            catalog = Catalog.build(screened(listings, assessments), names)
            for problem in catalog.problems:
                if problem not in self.catalog.problems:
                    logger.error("catalogue: %s", problem)
            self.catalog = catalog
            if self._listener is not None:
                await self._listener.catalog_changed(catalog)


_READS = (Kind.RESOURCE, Kind.TEMPLATE)


class _Flag:
    """A re-armable event: `set()` any number of times, `wait()` returns once per burst."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


_Notice = tuple[str, dict[str, Any], tuple[ToolCall, ...]]
"""A notice as the pool hands it over: method, parameters, the calls in flight when it came."""


class _Notices:
    """One connection's notices on their way to the listener, and how many have been handed over."""

    def __init__(self) -> None:
        self._send, self.received = anyio.create_memory_object_stream[_Notice](NOTICE_BACKLOG)
        self._sent = 0
        self._handed = 0
        self._progress = anyio.Event()

    def send(self, notice: _Notice) -> bool:
        """Queue a notice; `False` when the backlog is full (it is dropped)."""
        try:
            self._send.send_nowait(notice)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            return False
        self._sent += 1
        return True

    def handed_over(self) -> None:
        self._handed += 1
        self._progress.set()
        self._progress = anyio.Event()

    async def passed(self) -> None:
        """Until every notice queued so far has been handed over (or the connection ended)."""
        mark = self._sent
        while self._handed < mark:
            await self._progress.wait()

    def close(self) -> None:
        """The connection ended: nothing more is handed over, and nobody waits for it."""
        self._send.close()
        self.received.close()
        self._handed = self._sent
        self._progress.set()


async def _set_level(session: UpstreamSession, level: str) -> None:
    """Ask one upstream for log messages from `level` up, if it logs at all."""
    if session.init is None or session.init.capabilities.logging is None:
        return
    try:
        await session.request("logging/setLevel", {"level": level})
    except UpstreamError as exc:
        logger.warning("%s (setting its log level)", exc)


def _log_problems(listing: UpstreamListing) -> None:
    for problem in listing.problems:
        logger.warning("upstream '%s': %s", listing.upstream, problem)
