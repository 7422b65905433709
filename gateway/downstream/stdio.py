"""Serving one agent over this process's stdin/stdout: MCP's server side, both protocol eras.

Every line the agent sends is parsed once, as it arrives, and answered here; no SDK server (and
none of the SDK's web stack) is loaded in the process. The first request decides the connection's
era, as the MCP specification has it: `initialize` opens a handshake-era connection, a request
carrying the 2026-07-28 `_meta` envelope opens a 2026 one, and a later claim from the other era is
refused. Each request is checked with the specification's own per-version models (`mcp_types`),
errors have the shapes the SDK server gives them, and results are sieved for the caller's version,
so a client sees the same answers it would from an SDK server.

Served: `initialize` and `server/discover`, `ping` (handshake era), `tools/list`, `tools/call`,
`prompts/list`, `prompts/get`, `resources/list`, `resources/templates/list`, `resources/read`, and
`subscriptions/listen` (2026). List changes reach a handshake-era client as notifications and a
2026 client on its listen streams. `notifications/cancelled` cancels any request in flight (a
cancelled request is never answered). A `tools/call` relays progress to the caller's token and asks
for approval by elicitation (handshake era) or input-required round trips (2026).

When the input ends (`cat session.jsonl | mcp-armor serve`, or a client that closes the gateway's
stdin and reads on), the requests already read are still answered, for up to `[gateway]
call_timeout`; what is still running then is cancelled. Nothing can be asked of the client any more:
an approval it would have to give is refused, and listen streams end unanswered.

While serving, fd 0 reads from the null device and fd 1 writes to stderr, so nothing else in the
process (or a child that inherits them) can read the agent's input or corrupt its output. Input or
output that is not a pipe or socket (a terminal, a file) is relayed through a pipe by a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import anyio
import mcp_types as types
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    CORE_RESULT_TYPES,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)
from mcp_types import methods as spec_methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION, MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from gateway.calls import ProgressFn, WireResult
from gateway.core.gateway import RELAYED, Caller, Gateway, ListKind, ToolRequest, relay_for
from gateway.errors import ChannelClosed, ProtocolError, RemoteError, format_seconds
from gateway.wire.framing import LineBuffer, dumps
from gateway.wire.peer import Peer, RequestId, is_request_id

logger = logging.getLogger(__name__)

LEGACY = "handshake"
MODERN = "2026-07-28"
SUBSCRIPTION_ID_META_KEY = "io.modelcontextprotocol/subscriptionId"
MAX_LISTEN_STREAMS = 1024
FLUSH_GRACE = 5.0
"""Seconds the answers written last have to reach the agent's output before the gateway goes on to exit."""
_PARAMS: dict[str, type[BaseModel]] = {
    "ping": types.RequestParams,
    "server/discover": types.RequestParams,
    "tools/list": types.PaginatedRequestParams,
    "tools/call": types.CallToolRequestParams,
    "prompts/list": types.PaginatedRequestParams,
    "prompts/get": types.GetPromptRequestParams,
    "resources/list": types.PaginatedRequestParams,
    "resources/templates/list": types.PaginatedRequestParams,
    "resources/read": types.ReadResourceRequestParams,
    "subscriptions/listen": types.SubscriptionsListenRequestParams,
}
"""The requests served besides `initialize`, with the model their parameters must fit."""
_LIST_FILTER: dict[ListKind, str] = {
    "tools": "toolsListChanged",
    "prompts": "promptsListChanged",
    "resources": "resourcesListChanged",
}
_INVALID_PARAMS = ProtocolError(types.INVALID_PARAMS, "Invalid request parameters", "")
_ID_IN_FLIGHT = ProtocolError(types.INVALID_REQUEST, "a request with this id is still in flight; ids must be unique")


async def serve_stdio_connection(gateway: Gateway) -> None:
    """Serve the agent on stdin/stdout until it hangs up."""
    saved = (fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3))
    wire_in, wire_out, relays = _claim_standard_streams()
    try:
        await StdioConnection(gateway).serve(wire_in, wire_out)
    finally:
        for relay in relays:
            relay.join(timeout=5.0)  # output relayed to a file or terminal is written out in full
        _restore_standard_streams(saved)


def _claim_standard_streams() -> tuple[int, int, list[threading.Thread]]:
    """Move the agent's streams off fds 0 and 1 (which then read /dev/null and write to stderr).

    Returns the read and write ends to serve on (pipes or sockets; anything else is relayed
    through a pipe by a daemon thread) and the output relay to wait for at the end.
    """
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    relays: list[threading.Thread] = []
    if not _is_stream(wire_in):
        read_end, write_end = os.pipe()
        _relay(wire_in, write_end, "stdin relay").start()
        wire_in = read_end
    if not _is_stream(wire_out):
        read_end, write_end = os.pipe()
        relay = _relay(read_end, wire_out, "stdout relay")
        relay.start()
        relays.append(relay)
        wire_out = write_end
    return wire_in, wire_out, relays


def _is_stream(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _relay(source: int, target: int, name: str) -> threading.Thread:
    """A thread copying `source` to `target` until `source` ends; it closes both."""

    def copy() -> None:
        try:
            while chunk := os.read(source, 65536):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view) :]
        except OSError as exc:
            logger.debug("%s stopped: %s", name, exc)
        finally:
            os.close(source)
            os.close(target)

    return threading.Thread(target=copy, name=name, daemon=True)


def _restore_standard_streams(saved: tuple[int, int]) -> None:
    """Put the agent's streams (copies taken before serving) back on fds 0 and 1."""
    for fd, copy in zip((0, 1), saved, strict=True):
        try:
            os.dup2(copy, fd)
        except OSError:
            logger.debug("could not restore fd %d", fd)
        os.close(copy)


class _Writer(asyncio.Protocol):
    """The agent's output pipe; a line written after it closed is dropped."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = asyncio.Event()
        """Set once the pipe is closed: everything written went out, or the reader is gone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def write(self, line: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)


@dataclass(frozen=True, slots=True)
class _Request:
    """A request being served: its id, method and parameters, the protocol version it speaks, and who sent it."""

    id: RequestId
    method: str
    params: dict[str, Any] | None
    version: str
    caller: Caller | None
    """`None` only for a handshake-era request before `initialize` (only `ping` gets that far)."""
    call: ToolRequest | None = None
    """The plainest `tools/call`, checked and built already; else the parameters are checked when served."""


class StdioConnection(asyncio.Protocol):
    """One agent connection over a pair of pipes (the read side is this protocol)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._lines = LineBuffer()
        self._writer = _Writer()
        self._ended = asyncio.Event()
        self._input_ended = False
        """The agent closed its end of the input: the requests read are answered, nothing more is read."""
        self._era: str | None = None
        self._version = LATEST_HANDSHAKE_VERSION
        """The handshake era's negotiated version (the latest until `initialize` says otherwise)."""
        self._legacy: Caller | None = None
        """The handshake-era caller, once `initialize` (or a bare `notifications/initialized`) opened the gate."""
        self._in_flight: dict[RequestId, asyncio.Task[None]] = {}
        """The task serving each request not yet answered or cancelled, by id (`7` and `"7"` are two)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._client = Peer(
            "the client",
            self._writer.write,
            id_prefix="mcp-armor-",
            abandoned="no longer needed: what asked it was withdrawn or has ended",
        )
        """The requests the gateway sends the client (elicitation, relayed sampling and elicitation)."""
        self._listens: dict[RequestId, tuple[dict[str, Any], frozenset[ListKind]]] = {}
        """Open 2026 listen streams: their `_meta` stamp and the lists they follow."""
        self._capabilities = {
            era: _dump(
                types.ServerCapabilities(
                    prompts=types.PromptsCapability(list_changed=True),
                    resources=types.ResourcesCapability(subscribe=era == MODERN, list_changed=True),
                    tools=types.ToolsCapability(list_changed=True),
                )
            )
            for era in (LEGACY, MODERN)
        }
        self._server_info = {"name": gateway.name, "version": gateway.version}

    async def serve(self, wire_in: int, wire_out: int) -> None:
        loop = asyncio.get_running_loop()
        # The output first: reading starts as soon as the input is connected, and may answer at once.
        writer, _ = await loop.connect_write_pipe(lambda: self._writer, os.fdopen(wire_out, "wb", buffering=0))
        reader: asyncio.BaseTransport | None = None
        self.gateway.announcers.append(self._announce)
        try:
            reader, _ = await loop.connect_read_pipe(lambda: self, os.fdopen(wire_in, "rb", buffering=0))
            await self._ended.wait()
            if self._input_ended:
                await self._drain(self.gateway.pool.config.gateway.call_timeout)
        finally:
            self.gateway.announcers.remove(self._announce)
            with anyio.CancelScope(shield=True):
                await self._finish()
            if reader is not None:
                reader.close()
            writer.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(FLUSH_GRACE):
                await self._writer.closed.wait()  # the answers are out before the gateway goes on to exit

    async def _drain(self, seconds: float) -> None:
        """The input ended: let the requests already read finish (for up to `seconds`) and be answered.

        Nobody can answer a request sent to the client now, and a listen stream would never end: those
        end at once. Waiting stops early should the output close (nobody would read the answers).
        """
        self._withdraw_asked()
        for key in list(self._listens):
            task = self._in_flight.pop(key, None)
            if task is not None:
                _cancel(task)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        output_closed = loop.create_task(self._writer.closed.wait())
        try:
            while self._in_flight and not output_closed.done() and (left := deadline - loop.time()) > 0:
                waiting = {*self._in_flight.values(), output_closed}
                await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            output_closed.cancel()
        if self._in_flight:
            logger.warning(
                "the input ended; %d requests still unanswered after %s are cancelled",
                len(self._in_flight),
                format_seconds(seconds),
            )

    async def _finish(self) -> None:
        """Cancel the requests still running and wait until each has ended (a call records its outcome)."""
        self._in_flight = {}  # none of them is answered now
        for task in list(self._tasks):  # those in flight, and those withdrawn but still finishing
            _cancel(task)
        self._withdraw_asked()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _withdraw_asked(self) -> None:
        """The client can no longer answer: whatever waits for its answer is told so."""
        self._client.close("the client disconnected")

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            lines = self._lines.feed(data)
        except ValueError as exc:
            logger.error("the client sent %s; closing the connection", exc)
            self._ended.set()
            return
        for line in lines:
            if line.strip():
                self._route(line)

    def eof_received(self) -> bool | None:
        self.data_received(b"\n")  # a last line without its newline is read too, as the SDK's stdio server reads it
        self._input_ended = True
        self._ended.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()

    def _route(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            logger.warning("the client sent a line that is not JSON; ignored: %.200r", line)
            return
        problem = _malformed(message)
        if problem is not None:
            logger.warning("the client sent %s; ignored: %.200r", problem, line)
            return
        method = message.get("method")
        params = message.get("params")
        if method is None:
            self._client.receive(message)  # an answer to a request the gateway sent the client
        elif "id" not in message:
            self._notified(method, params)
        else:
            self._requested(message["id"], method, params)

    def _notified(self, method: str, params: dict[str, Any] | None) -> None:
        if method == "notifications/cancelled":
            request_id = params.get("requestId") if params is not None else None
            task = self._in_flight.pop(request_id, None) if is_request_id(request_id) else None
            if task is not None:
                _cancel(task)  # out of the map: it is never answered, even if it completes regardless
        elif method == "notifications/initialized":
            if self._legacy is None:  # the handshake skipped: the gate opens for a client that named nobody
                session = self.gateway.session_info(self.gateway.stdio_session, self._version, "", "")
                self._legacy = Caller(session, modern=False, can_elicit=False, elicit=self._elicit)
        else:
            logger.debug("notification %s from the client; nothing to do", method)

    # -- requests --------------------------------------------------------------------------------

    def _requested(self, request_id: RequestId, method: str, params: dict[str, Any] | None) -> None:
        if self._era is None:
            self._era = MODERN if method != "initialize" and _has_modern_envelope(params) else LEGACY
        if request_id in self._in_flight:
            # Its answer could not be told from the first one's, nor could a cancel name just one of them.
            self._reply_error(request_id, _ID_IN_FLIGHT.wire())
            return
        try:
            request = self._admit(request_id, method, params)
        except ProtocolError as exc:
            self._reply_error(request_id, exc.wire())
            return
        if request is not None:
            self._spawn(request)

    def _admit(self, request_id: RequestId, method: str, params: dict[str, Any] | None) -> _Request | None:
        """The request, ready to serve in a task of its own; `None` when answered here (`initialize`).

        Raises `ProtocolError` for a request refused before it runs.
        """
        if self._era == LEGACY:
            if method == "initialize":
                self._initialize(request_id, params)
                return None
            if _has_modern_envelope(params):
                raise ProtocolError(
                    types.INVALID_REQUEST,
                    "this connection serves the handshake protocol era; "
                    "requests carrying the 2026-07-28 envelope are not accepted on it",
                )
            if method == "tools/call" and self._legacy is not None and (plain := _plain_call(params)) is not None:
                return _Request(request_id, method, params, self._version, self._legacy, plain)
            request = _Request(request_id, method, params, self._version, self._legacy)
        else:
            if method == "initialize":
                raise ProtocolError(
                    types.UNSUPPORTED_PROTOCOL_VERSION,
                    "connection is serving the 2026-07-28 protocol; the initialize handshake is not accepted",
                    _unsupported((params or {}).get("protocolVersion")),
                )
            version, info, capabilities = _envelope(params)
            session = self.gateway.session_info(
                self.gateway.stdio_session, version, str(info.get("name", "")), str(info.get("version", ""))
            )
            caller = Caller(session, modern=True, can_elicit=capabilities.get("elicitation") is not None)
            request = _Request(request_id, method, params, version, caller)
        _check_spec(method, request.version, params)
        if method == "tools/call" and request.call is None and (plain := _checked_plain_call(params)) is not None:
            request = replace(request, call=plain)  # a 2026 call the specification's model has just passed
        if method not in _PARAMS:
            raise ProtocolError(types.METHOD_NOT_FOUND, "Method not found", method)
        if request.caller is None and method != "ping":
            raise _INVALID_PARAMS  # the handshake-era gate: nothing but ping before initialize
        return request

    def _initialize(self, request_id: RequestId, params: dict[str, Any] | None) -> None:
        """The handshake, answered at once, so a request pipelined behind it finds the connection open."""
        try:
            _check_spec("initialize", self._version, params)
            init = types.InitializeRequestParams.model_validate(params or {}, by_name=False)
        except ValidationError:
            self._reply_error(request_id, _INVALID_PARAMS.wire())
            return
        negotiated = init.protocol_version
        if negotiated not in HANDSHAKE_PROTOCOL_VERSIONS:
            negotiated = LATEST_HANDSHAKE_VERSION
        result = {
            "protocolVersion": negotiated,
            "capabilities": self._capabilities[LEGACY],
            "serverInfo": dict(self._server_info),
        }
        self._reply(request_id, self._serialize("initialize", self._version, result))
        self._version = negotiated
        info = init.client_info
        session = self.gateway.session_info(self.gateway.stdio_session, negotiated, info.name, info.version)
        can_elicit = init.capabilities.elicitation is not None
        relay = relay_for(init.capabilities, self._ask)
        self._legacy = Caller(session, modern=False, can_elicit=can_elicit, elicit=self._elicit, relay=relay)

    def _spawn(self, request: _Request) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %r (protocol %s)", request.method, request.id, request.version)
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._in_flight[request.id] = task
        self._tasks.add(task)

    async def _serve(self, request: _Request) -> None:
        """Answer one request in its own task; a request cancelled (by the client, or at disconnection) is
        cancelled as a task, with no cancel scope of its own to set up, and never answered."""
        task = asyncio.current_task()
        key = request.id
        reply: dict[str, Any] | None = None
        try:
            reply = await self._answer(request)
        except asyncio.CancelledError:
            pass
        finally:
            answered = self._in_flight.get(key) is task
            if answered:
                del self._in_flight[key]
            # Gone from the set here rather than by a done callback, which would cost a loop turn per request.
            if task is not None:
                self._tasks.discard(task)
        if reply is not None and answered:
            self._writer.write(dumps(reply))

    async def _answer(self, request: _Request) -> dict[str, Any]:
        try:
            typed = None
            if request.call is None:  # a plain call is checked already
                typed = _PARAMS[request.method].model_validate(request.params or {}, by_name=False)
            result = await self._handle(request, typed)
            return {
                "jsonrpc": "2.0",
                "id": request.id,
                "result": self._serialize(request.method, request.version, result),
            }
        except Exception as exc:
            return {"jsonrpc": "2.0", "id": request.id, "error": _error(exc, request.method)}

    async def _handle(self, request: _Request, params: Any) -> BaseModel | Mapping[str, Any]:
        gateway, method = self.gateway, request.method
        if method == "tools/call":
            assert request.caller is not None
            caller = request.caller
            token = _progress_token(request.params)
            if token is not None:
                caller = replace(caller, progress=self._progress_relay(token))
            return await gateway.call_tool(caller, request.call or ToolRequest.of(params))
        if method == "tools/list":
            assert request.caller is not None
            return await gateway.list_tools(request.caller.session)
        if method == "prompts/list":
            return await gateway.list_prompts()
        if method == "prompts/get":
            return await gateway.get_prompt(params)
        if method == "resources/list":
            return await gateway.list_resources()
        if method == "resources/templates/list":
            return await gateway.list_resource_templates()
        if method == "resources/read":
            return await gateway.read_resource(params)
        if method == "server/discover":
            return {
                "supportedVersions": list(MODERN_PROTOCOL_VERSIONS),
                "capabilities": self._capabilities[MODERN],
            }
        if method == "subscriptions/listen":
            return await self._listen(request, params)
        return {}  # ping

    def _serialize(self, method: str, version: str, result: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
        """A result shaped as the SDK server shapes one: cache hints, the version's sieve, and for 2026 the
        result type and the server-info stamp."""
        modern = version in MODERN_PROTOCOL_VERSIONS
        if isinstance(result, WireResult):  # an upstream's tool result, shaped for this version already
            return self._stamped(dict(result)) if modern else result
        if method in spec_methods.CACHEABLE_METHODS:
            # The catalogue can change at any moment and differs per caller: nothing is cacheable.
            if isinstance(result, types.CacheableResult):
                hint = {"ttl_ms": 0, "cache_scope": "private"}
                result = result.model_copy(update={k: v for k, v in hint.items() if k not in result.model_fields_set})
            elif isinstance(result, Mapping) and not spec_methods.is_input_required(result):
                result = {"ttlMs": 0, "cacheScope": "private", **result}
        dumped = _dump(result) if isinstance(result, BaseModel) else dict(result)
        if modern:
            dumped.setdefault("resultType", "complete")  # upstream results are handshake-era: they carry none
        result_type = dumped.get("resultType")
        if not modern or not isinstance(result_type, str) or result_type in CORE_RESULT_TYPES:
            try:
                dumped = spec_methods.serialize_server_result(method, version, dumped)
            except ValidationError:
                logger.exception("%s produced an invalid result", method)
                raise ProtocolError(types.INTERNAL_ERROR, "Handler returned an invalid result") from None
        return self._stamped(dumped) if modern else dumped

    def _stamped(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """A 2026-07-28 result with the server-info stamp in its `_meta` (unless it carries one)."""
        meta = dumped.get("_meta")
        if meta is None:
            dumped["_meta"] = {SERVER_INFO_META_KEY: dict(self._server_info)}
        elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            dumped["_meta"] = {**meta, SERVER_INFO_META_KEY: dict(self._server_info)}
        return dumped

    def _reply(self, request_id: RequestId, result: dict[str, Any]) -> None:
        self._writer.write(dumps({"jsonrpc": "2.0", "id": request_id, "result": result}))

    def _reply_error(self, request_id: RequestId, error: dict[str, Any]) -> None:
        self._writer.write(dumps({"jsonrpc": "2.0", "id": request_id, "error": error}))

    def _notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._writer.write(dumps(message))

    # -- changes, progress, elicitation ----------------------------------------------------------

    async def _listen(self, request: _Request, params: types.SubscriptionsListenRequestParams) -> dict[str, Any]:
        """A 2026 listen stream: acknowledged at once, then open until the client cancels it."""
        if len(self._listens) >= MAX_LISTEN_STREAMS:
            raise ProtocolError(types.INTERNAL_ERROR, "Subscription limit reached")
        asked = params.notifications
        honored = types.SubscriptionFilter(
            tools_list_changed=True if asked.tools_list_changed else None,
            prompts_list_changed=True if asked.prompts_list_changed else None,
            resources_list_changed=True if asked.resources_list_changed else None,
            resource_subscriptions=list(asked.resource_subscriptions) if asked.resource_subscriptions else None,
        )
        meta = {SUBSCRIPTION_ID_META_KEY: request.id}
        wire = _dump(honored)
        followed = frozenset(kind for kind, key in _LIST_FILTER.items() if key in wire)
        key = request.id
        self._notify("notifications/subscriptions/acknowledged", {"notifications": wire, "_meta": meta})
        self._listens[key] = entry = (meta, followed)
        try:
            await anyio.sleep_forever()
        finally:
            # Only its own: a stream the client cancelled and opened again under the same id in one read
            # has its successor's entry here by the time it ends.
            if self._listens.get(key) is entry:
                del self._listens[key]
        return {"_meta": meta}  # pragma: no cover (a listen stream ends only by cancellation)

    async def _announce(self, changed: list[ListKind]) -> None:
        if self._era == LEGACY:
            for kind in changed:
                self._notify(f"notifications/{kind}/list_changed")
            return
        for meta, followed in list(self._listens.values()):
            for kind in changed:
                if kind in followed:
                    self._notify(f"notifications/{kind}/list_changed", {"_meta": meta})

    def _progress_relay(self, token: RequestId) -> ProgressFn:
        async def relay(progress: float, total: float | None, message: str | None) -> None:
            params: dict[str, Any] = {"progressToken": token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            self._notify("notifications/progress", params)

        return relay

    async def _elicit(self, message: str, schema: dict[str, Any]) -> dict[str, Any]:
        """Ask the client (handshake era) to have a person fill in a form; its `ElicitResult` in wire form."""
        params = types.ElicitRequestFormParams(message=message, requested_schema=schema)
        return await self._ask("elicitation/create", _dump(params))

    async def _ask(self, method: str, params: Mapping[str, Any], checked: Any = None) -> dict[str, Any]:
        """Send the client (handshake era) a request (its parameters as given: `checked` is not needed
        here); its result in wire form, checked against the method's model."""
        if self._input_ended:
            raise ProtocolError(types.CONNECTION_CLOSED, "the client disconnected")
        try:  # withdrawn (by the upstream that asked, or as the gateway stops): the client is told to stop
            raw = await self._client.request(method, params, seconds=None)
        except ChannelClosed as exc:
            raise ProtocolError(types.CONNECTION_CLOSED, str(exc)) from None
        except RemoteError as exc:  # the client's error, without its data (which goes no further)
            raise ProtocolError(exc.code, exc.message or "the client answered with an error") from None
        try:
            return _dump(RELAYED[method].result.model_validate(raw, by_name=False))
        except ValidationError:
            raise ProtocolError(types.INVALID_PARAMS, f"the client answered {method} with a malformed result") from None


def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a request's task once it has run its first step: a request cancelled in the same read
    that brought it still reaches its first wait (a call gets its decision and its outcome recorded)."""
    task.get_loop().call_soon(task.cancel)


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


_PLAIN_CALL_KEYS = frozenset({"name", "arguments", "_meta"})


def _plain_call(params: dict[str, Any] | None) -> ToolRequest | None:
    """A handshake-era `tools/call` in its plainest form (a name, arguments, a progress token), checked
    without the models; `None` for anything else, which the specification's models check. Whatever
    passes here passes them, with the same name and arguments (the tests hold the two to that)."""
    if params is None or not params.keys() <= _PLAIN_CALL_KEYS:
        return None
    name, arguments, meta = params.get("name"), params.get("arguments"), params.get("_meta")
    if type(name) is not str or (arguments is not None and type(arguments) is not dict):
        return None
    if meta is not None and (
        type(meta) is not dict or not meta.keys() <= {"progressToken"} or not is_request_id(meta.get("progressToken"))
    ):
        return None
    return ToolRequest(name, arguments or {})


def _checked_plain_call(params: dict[str, Any] | None) -> ToolRequest | None:
    """A `tools/call` that the specification's model has checked already, and that carries nothing but
    a name, arguments and `_meta` (no approval retry, no task): built from its parameters as they are,
    without checking them a second time. (The tests hold it to what the SDK's model builds.)"""
    if params is None or not params.keys() <= _PLAIN_CALL_KEYS:
        return None
    meta = params.get("_meta")
    if isinstance(meta, dict) and "progressToken" in meta and not is_request_id(meta["progressToken"]):
        return None  # the SDK's model is stricter here than some versions' (a null token): it decides
    return ToolRequest(params["name"], params.get("arguments") or {})


def _check_spec(method: str, version: str, params: Mapping[str, Any] | None) -> None:
    """The specification's check of a request's parameters for `version` (methods it defines only)."""
    if method not in spec_methods.SPEC_CLIENT_METHODS:
        return
    try:
        spec_methods.validate_client_request(method, version, params)
    except KeyError:
        raise ProtocolError(types.METHOD_NOT_FOUND, "Method not found", method) from None
    except ValidationError:
        raise _INVALID_PARAMS from None


def _error(exc: Exception, method: str) -> dict[str, Any]:
    """The JSON-RPC error a request's failure is answered with; an unexpected one never shows its text."""
    if isinstance(exc, ProtocolError):
        return exc.wire()
    if isinstance(exc, ValidationError):
        return _INVALID_PARAMS.wire()
    logger.error("%s failed inside the gateway", method, exc_info=exc)
    return {"code": types.INTERNAL_ERROR, "message": "Internal server error"}


def _envelope(params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A 2026 request's envelope: protocol version, client info, client capabilities."""
    meta = params.get("_meta") if params is not None else None
    if not isinstance(meta, dict):
        raise ProtocolError(
            types.INVALID_PARAMS,
            "params._meta must be an object carrying the required "
            f"{PROTOCOL_VERSION_META_KEY!r} and {CLIENT_CAPABILITIES_META_KEY!r} envelope keys",
        )
    missing = [key for key in (PROTOCOL_VERSION_META_KEY, CLIENT_CAPABILITIES_META_KEY) if key not in meta]
    if missing:
        raise ProtocolError(
            types.INVALID_PARAMS, f"params._meta is missing the required envelope key(s): {', '.join(missing)}"
        )
    version = meta[PROTOCOL_VERSION_META_KEY]
    if not isinstance(version, str):
        raise ProtocolError(types.INVALID_PARAMS, "the protocol-version envelope value must be a string")
    if version not in MODERN_PROTOCOL_VERSIONS:
        raise ProtocolError(types.UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version", _unsupported(version))
    return version, _object(meta.get(CLIENT_INFO_META_KEY)), _object(meta[CLIENT_CAPABILITIES_META_KEY])


def _unsupported(requested: Any) -> dict[str, Any]:
    """The error data naming the versions served (and the one asked for, when it is a string)."""
    if isinstance(requested, str):
        data = types.UnsupportedProtocolVersionErrorData(supported=list(MODERN_PROTOCOL_VERSIONS), requested=requested)
        return data.model_dump(mode="json")
    return {"supported": list(MODERN_PROTOCOL_VERSIONS)}


def _malformed(message: Any) -> str | None:
    """What makes `message` not a JSON-RPC 2.0 message the gateway can act on; `None` when it is one."""
    if not isinstance(message, dict):
        return "a JSON value that is not a message object"
    if message.get("jsonrpc") != "2.0":
        return 'a message without "jsonrpc": "2.0"'
    if "params" in message and not isinstance(message["params"], dict):
        return "a message whose params are not an object"
    method = message.get("method")
    if method is None:
        if not is_request_id(message.get("id")) or not ("result" in message or "error" in message):
            return "a response without a valid id and result or error"
        return None
    if not isinstance(method, str):
        return "a message whose method is not a string"
    if "id" in message and not is_request_id(message["id"]):
        return "a request whose id is not a string or an integer"
    return None


def _has_modern_envelope(params: Any) -> bool:
    return (
        isinstance(params, dict)
        and isinstance(params.get("_meta"), dict)
        and PROTOCOL_VERSION_META_KEY in params["_meta"]
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _progress_token(params: dict[str, Any] | None) -> RequestId | None:
    meta = params.get("_meta") if params is not None else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if is_request_id(token) else None
