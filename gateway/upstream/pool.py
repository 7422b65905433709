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

An upstream served per principal (`UpstreamSpec.per_principal`: principal tables, or `${principal.name}`
in its values) is listed on a connection of its own values alone, which serves no call; each principal's
calls run on a connection (a process, for a command) opened on that principal's first call with its
values, closed once idle for `PRINCIPAL_IDLE` seconds and at shutdown. A caller the upstream has no values
for is refused (`NoCredentials`): never served on another principal's connection or the listing one.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Iterator, Mapping
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
from gateway.config.models import Config, UpstreamSpec
from gateway.errors import (
    InvalidUriTemplate,
    NoCredentials,
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
PRINCIPAL_IDLE = 600.0
"""Seconds a principal's connection to an upstream stays open with no call in flight."""
_LIST_CHANGED = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    }
)


Connection = tuple[str, str | None]
"""One connection to an upstream: its name, and the principal it was opened for (`None`: the shared one,
or for an upstream served per principal, the one it is listed on)."""


class _Relaying:
    """`UpstreamPool.relaying`: a plain context manager, as it is entered for every call."""

    __slots__ = ("_call", "_key", "_relays")

    def __init__(self, relays: dict[Connection, list[ToolCall]], key: Connection, call: ToolCall) -> None:
        self._relays = relays
        self._key = key
        self._call = call

    def __enter__(self) -> None:
        self._relays.setdefault(self._key, []).append(self._call)

    def __exit__(self, *_: object) -> None:
        self._relays[self._key].remove(self._call)


class _Opened:
    """A principal's connection to an upstream: ready once it is up (or has failed); in use while calls run."""

    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.session: UpstreamSession | None = None
        self.error: str | None = None
        self.calls = 0
        self.used = anyio.current_time()
        self.ended = False


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
        self._relays: dict[Connection, list[ToolCall]] = {}
        """Per connection, every call in flight on it, oldest first (its requests are handed over with them)."""
        self._notices: dict[Connection, _Notices] = {}
        """Per open connection, its notices on their way to the listener."""
        self._opened: dict[tuple[str, str], _Opened] = {}
        """Per upstream served per principal and principal, that principal's connection (up or coming up)."""
        self._task_group: anyio.abc.TaskGroup | None = None
        """Where principals' connections run (the pool's own, while it runs): they end with it."""
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
            self._task_group = tg
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
            was_up = reported = False
            try:
                async with self._connect(upstream) as closed:
                    was_up = True
                    backoff = INITIAL_BACKOFF
                    await closed.wait()
                    # Say so and withdraw its tools now: shutting the transport down can take seconds, and
                    # a gateway stopping meanwhile would otherwise never record that the upstream went down.
                    upstream.last_error = "closed the connection"
                    self._report_down(upstream, was_up)
                    reported = True
                    await self._withdraw(upstream)
            except Exception as exc:  # supervision boundary: any failure of one upstream restarts it
                if not reported:
                    upstream.last_error = describe_failure(exc)
            finally:
                upstream.settled.set()
                with anyio.CancelScope(shield=True):
                    await self._withdraw(upstream)
            if not reported:
                self._report_down(upstream, was_up)
            delay = backoff * random.uniform(0.8, 1.2)
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

    def _report_down(self, upstream: Upstream, was_up: bool) -> None:
        if self._listener is not None:
            self._listener.upstream_changed(
                upstream.name, False, f"{'went down' if was_up else 'failed to start'}: {upstream.last_error}"
            )

    def connection(self, upstream: str, principal: str) -> Connection:
        """The connection a call of `principal` to `upstream` runs on: its own, for an upstream served per
        principal; the shared one otherwise."""
        served = self.upstreams.get(upstream)
        return (upstream, principal if served is not None and served.spec.per_principal else None)

    def relaying(self, call: ToolCall) -> _Relaying:
        """While `call` is in flight, its connection's requests are handed to the listener with it."""
        return _Relaying(self._relays, self.connection(call.tool.upstream, call.session.principal), call)

    async def session_for(self, upstream: str, principal: str) -> UpstreamSession:
        """The session a call of `principal` ("": unauthenticated) to `upstream` runs on: the shared one, or
        for an upstream served per principal, that principal's own, opened on its first call. Raises
        `NoCredentials` for a caller such an upstream has no values for, `UpstreamUnavailable` when down."""
        served = self.get(upstream)
        spec = served.spec
        if not spec.per_principal:
            return served.require_session()
        refusal = spec.refusal(principal)
        if refusal is not None:
            raise NoCredentials(upstream, refusal.removeprefix(f"upstream '{upstream}' "))
        if spec.unavailable is not None:
            raise UpstreamUnavailable(upstream, f"is unavailable: {spec.unavailable}")
        opened = self._opened.get((upstream, principal))
        if opened is None or opened.ended:
            if self._task_group is None:
                raise UpstreamUnavailable(upstream, "is not running")
            opened = _Opened()
            self._opened[(upstream, principal)] = opened
            self._task_group.start_soon(self._serve_principal, served, principal, opened)
        with anyio.move_on_after(self.config.gateway.startup_timeout):
            await opened.ready.wait()
        if opened.session is None:
            why = opened.error or f"did not start within {self.config.gateway.startup_timeout:g}s"
            raise UpstreamUnavailable(upstream, f"is not connected for principal '{principal}': {why}")
        opened.used = anyio.current_time()
        return opened.session

    @contextlib.contextmanager
    def in_use(self, upstream: str, principal: str) -> Iterator[None]:
        """While a call runs on `principal`'s connection to `upstream`, that connection is not idle."""
        opened = self._opened.get((upstream, principal))
        if opened is None:
            yield
            return
        opened.calls += 1
        try:
            yield
        finally:
            opened.calls -= 1
            opened.used = anyio.current_time()

    async def _serve_principal(self, upstream: Upstream, principal: str, opened: _Opened) -> None:
        """Open `principal`'s connection to `upstream`, and keep it until it ends or is idle for `PRINCIPAL_IDLE`."""
        spec = upstream.spec.for_principal(principal)
        try:
            async with self._open(spec, (upstream.name, principal), upstream.timeout) as (session, closed):
                listing = await session.list_all()
                if upstream.listing is not None and _offers(listing) != _offers(upstream.listing):
                    logger.warning(
                        "upstream '%s' lists other definitions for principal '%s' than it is listed with; "
                        "its calls follow the catalogue's",
                        upstream.name,
                        principal,
                    )
                opened.session = session
                opened.ready.set()
                logger.info("upstream '%s' up for principal '%s'", upstream.name, principal)
                while True:
                    with anyio.move_on_after(PRINCIPAL_IDLE / 4):
                        await closed.wait()
                        opened.error = "closed the connection"
                        break
                    if opened.calls == 0 and anyio.current_time() - opened.used >= PRINCIPAL_IDLE:
                        logger.info("upstream '%s' for principal '%s' idle: closed", upstream.name, principal)
                        break
                # Retired before it closes (which takes a while): the principal's next call opens another.
                self._retire(upstream.name, principal, opened)
        except Exception as exc:  # one principal's connection failing never takes the others down
            opened.error = describe_failure(exc)
            logger.warning("upstream '%s' for principal '%s': %s", upstream.name, principal, opened.error)
        finally:
            self._retire(upstream.name, principal, opened)

    def _retire(self, upstream: str, principal: str, opened: _Opened) -> None:
        """`principal`'s connection to `upstream` serves no more calls."""
        opened.ended = True
        opened.session = None
        opened.ready.set()
        if self._opened.get((upstream, principal)) is opened:
            del self._opened[(upstream, principal)]

    def _answerer(self, key: Connection) -> RequestHandler:
        async def answer(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
            return await self.answer(key[0], method, params, key[1])

        return answer

    async def answer(
        self, upstream: str, method: str, params: Mapping[str, Any] | None, principal: str | None = None
    ) -> dict[str, Any]:
        """What the gateway answers a request `upstream` sent it (on `principal`'s connection; `None`: the
        shared one): the listener's result, asked with every call in flight on that connection, oldest
        first. With no listener attached, every request is refused."""
        listener = self._listener
        if listener is None:
            raise RemoteError(types.METHOD_NOT_FOUND, f"mcp-armor does not serve '{method}' to upstream servers")
        calls = self._relays.get((upstream, principal))
        try:
            return await listener.upstream_request(upstream, method, params or {}, tuple(calls or ()))
        except ProtocolError as exc:
            raise RemoteError(exc.code, exc.message, exc.data) from None

    async def set_log_level(self, level: str) -> None:
        """Ask every upstream that logs for messages from `level` up (and each that connects later)."""
        self._log_level = level
        sessions = [upstream.session for upstream in self.upstreams.values()]
        sessions += [opened.session for opened in list(self._opened.values())]
        for session in sessions:
            if session is not None:
                await _set_level(session, level)

    async def unsubscribe(self, upstream: str, uri: str, principal: str = "") -> None:
        """Withdraw the gateway's subscription to `uri` (as the upstream spells it) at `upstream`, on the
        connection `principal`'s calls run on."""
        if self.connection(upstream, principal)[1] is None:
            session = self.get(upstream).require_session()
        else:
            opened = self._opened.get((upstream, principal))
            if opened is None or opened.session is None:
                return  # its connection closed, and its subscriptions with it
            session = opened.session
        await session.request("resources/unsubscribe", {"uri": uri})

    async def notices_passed(self, upstream: str, principal: str = "") -> None:
        """Wait until every notice `upstream` sent so far (on the connection `principal`'s calls run on) has
        been handed to the listener: an answer goes to the agent after the log messages the upstream sent
        before it, as the upstream ordered them."""
        notices = self._notices.get(self.connection(upstream, principal))
        if notices is not None:
            with anyio.move_on_after(NOTICE_WAIT):  # never held up for long by what others are sent
                await notices.passed()

    async def _hand_over(self, key: Connection, notices: _Notices) -> None:
        """Give the listener each notice of one connection, in the order they came (until it ends)."""
        upstream, principal = key
        with contextlib.suppress(anyio.ClosedResourceError):
            async for method, params, calls in notices.received:
                try:
                    if self._listener is not None:
                        await self._listener.upstream_notification(upstream, method, params, calls, principal)
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
        spec = upstream.spec.for_catalogue()
        relist = _Flag()
        async with self._open(spec, (spec.name, None), upstream.timeout, relist) as (session, closed):
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
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._relist_when_changed, upstream, session, relist)
                try:
                    yield closed
                finally:
                    tg.cancel_scope.cancel()

    @asynccontextmanager
    async def _open(
        self, spec: UpstreamSpec, key: Connection, call_timeout: float, relist: _Flag | None = None
    ) -> AsyncIterator[tuple[UpstreamSession, Ended]]:
        """Open and initialise one connection to an upstream (`key`: whose it is); yield its session and an
        event set when it ends. `relist` is set whenever the upstream says its lists changed."""
        notices = _Notices()

        def on_notify(method: str, params: Mapping[str, Any] | None) -> None:
            if method in _LIST_CHANGED:
                if relist is not None:
                    relist.set()
            elif method in NOTICES:
                # Whose it is depends on the calls in flight now, as it arrives.
                if not notices.send((method, dict(params or {}), tuple(self._relays.get(key, ())))):
                    logger.warning("upstream '%s' sends notices faster than they are passed on; one dropped", spec.name)

        async with AsyncExitStack() as stack:
            stack.callback(notices.close)
            errlog = stack.enter_context(self.config.log_path(spec.name).open("a", encoding="utf-8"))
            link, closed = await stack.enter_async_context(
                open_link(
                    spec,
                    self.config.passing(spec.name, key[1]),
                    errlog,
                    self._answerer(key),
                    on_notify,
                    self.config.gateway.max_upstream_message_size,
                )
            )
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            self._notices[key] = notices
            stack.callback(self._notices.pop, key, None)
            tg.start_soon(self._hand_over, key, notices)
            session = UpstreamSession(spec, link, call_timeout)
            await session.initialize()
            if self._log_level is not None:
                await _set_level(session, self._log_level)
            if spec.transport == "http":
                tg.start_soon(keepalive, session)
            yield session, closed

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


def _offers(listing: UpstreamListing) -> tuple[Any, ...]:
    """What a listing offers, to tell whether two listings differ: each tool's digest, the prompts, the
    resources and the templates."""
    dumped = [
        sorted(item.model_dump_json(by_alias=True, exclude_none=True) for item in items)
        for items in (listing.prompts, listing.resources, listing.templates)
    ]
    return (sorted((tool.name, tool.digest) for tool in listing.tools), *dumped)


def _log_problems(listing: UpstreamListing) -> None:
    for problem in listing.problems:
        logger.warning("upstream '%s': %s", listing.upstream, problem)
