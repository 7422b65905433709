"""Serving one agent over this process's stdin/stdout, with `tools/call` handled where it is read.

Every line the agent sends is parsed once, as it arrives. A `tools/call` on an established
connection takes the direct path: its own task runs the gateway's call (policy, audit, upstream)
and writes the answer straight to the pipe. Everything else (the handshake, lists, prompts,
resources, subscriptions, pings, malformed input) goes to the SDK server exactly as its own stdio
transport would deliver it, and its answers are written to the same pipe. Both protocol eras are
served: the first request decides the connection's era, as it does for the SDK server.

The direct path keeps what the SDK path does for a call: the same parameter validation and error
shapes, progress relayed to the caller's token, `notifications/cancelled` cancelling the call (a
cancelled request is never answered), approval by elicitation (handshake era) or by input-required
round trips (2026-07-28), and the same result sieve and server-info stamp.

While serving, fd 0 reads from the null device and fd 1 writes to stderr, so nothing else in the
process (or a child that inherits them) can read the agent's input or corrupt its output. Input
that is not a pipe or socket (a terminal, a file) is served by the SDK's own stdio transport.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request
from mcp.shared.jsonrpc_dispatcher import handler_exception_to_error_data
from mcp.shared.message import SessionMessage
from mcp_types import CORE_RESULT_TYPES, PROTOCOL_VERSION_META_KEY, SERVER_INFO_META_KEY
from mcp_types import methods as spec_methods
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from gateway.calls import ProgressFn
from gateway.pipes import LineBuffer, dumps
from gateway.server import Caller, Gateway

logger = logging.getLogger(__name__)

SDK_GRACE = 5.0
"""Seconds the SDK server has, after the client hung up, to answer what it already received."""
LEGACY = "handshake"
MODERN = "2026-07-28"


async def serve_stdio_connection(gateway: Gateway) -> None:
    """Serve the agent on stdin/stdout until it hangs up."""
    wire_in, wire_out = _claim_standard_streams()
    if wire_in is None or wire_out is None:
        async with stdio_server() as (read, write):
            await gateway.server.run(read, write, gateway.server.create_initialization_options())
        return
    try:
        await StdioConnection(gateway).serve(wire_in, wire_out)
    finally:
        _restore_standard_streams(wire_in, wire_out)


def _claim_standard_streams() -> tuple[int | None, int | None]:
    """Move the agent's pipes off fds 0 and 1 (which then read /dev/null and write to stderr).

    `(None, None)`, claiming nothing, when either is not a pipe or socket.
    """
    for fd in (0, 1):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return None, None
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return None, None
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return wire_in, wire_out


def _restore_standard_streams(wire_in: int, wire_out: int) -> None:
    for fd, wire in ((0, wire_in), (1, wire_out)):
        try:
            os.dup2(wire, fd)
        except OSError:
            logger.debug("could not restore fd %d", fd)


class _Writer(asyncio.Protocol):
    """The agent's output pipe, with the transport's flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self._resumed = asyncio.Event()
        self._resumed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._resumed.set()  # nothing waits for a pipe that is gone

    def pause_writing(self) -> None:
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._resumed.set()

    def write(self, line: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)

    async def drain(self) -> None:
        await self._resumed.wait()


class StdioConnection(asyncio.Protocol):
    """One agent connection over a pair of pipes (the read side is this protocol)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._lines = LineBuffer()
        self._writer = _Writer()
        self._ended = asyncio.Event()
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](math.inf)
        self._to_sdk, self._sdk_input = send, receive
        self._era: str | None = None
        self._initialize_id: Any = None
        self._client_params: dict[str, Any] | None = None
        self._legacy: Caller | None = None
        """The handshake-era caller once `initialize` succeeded (the direct path is open)."""
        self._in_flight: dict[Any, anyio.CancelScope] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._asked: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._next_ask = 0

    async def serve(self, wire_in: int, wire_out: int) -> None:
        loop = asyncio.get_running_loop()
        reader, _ = await loop.connect_read_pipe(lambda: self, os.fdopen(wire_in, "rb", buffering=0))
        writer, _ = await loop.connect_write_pipe(lambda: self._writer, os.fdopen(wire_out, "wb", buffering=0))
        sdk_output, sdk_replies = anyio.create_memory_object_stream[SessionMessage](0)
        server = self.gateway.server
        replied = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_sdk_replies, sdk_replies, replied)
                tg.start_soon(server.run, self._sdk_input, sdk_output, server.create_initialization_options())
                await self._ended.wait()
                self._to_sdk.close()
                await self._finish_calls()
                with anyio.move_on_after(SDK_GRACE):
                    await replied.wait()  # the SDK server answered what it had and closed its output
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish_calls()
            reader.close()
            writer.close()

    async def _finish_calls(self) -> None:
        """Cancel the calls still running and wait until each has recorded its outcome."""
        for scope in list(self._in_flight.values()):
            scope.cancel()
        for future in self._asked.values():
            if not future.done():
                future.set_exception(MCPError(types.CONNECTION_CLOSED, "the client disconnected"))
        if self._tasks:
            await asyncio.wait(list(self._tasks))

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
        self._ended.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()

    def _route(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if isinstance(message, dict) and self._take(message):
            return
        try:
            item: SessionMessage | Exception = SessionMessage(
                types.jsonrpc_message_adapter.validate_json(text, by_name=False)
            )
        except Exception as exc:  # handed to the SDK server, which answers a malformed message as it should
            item = exc
        try:
            self._to_sdk.send_nowait(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            logger.debug("message after the SDK server stopped; dropped")

    def _take(self, message: dict[str, Any]) -> bool:
        """Handle `message` on the direct path; `False` hands it to the SDK server."""
        method = message.get("method")
        if "id" not in message:
            if method == "notifications/cancelled":
                return self._cancel(message.get("params"))
            return False
        request_id = message["id"]
        if method is None:
            return self._answered(request_id, message)
        if self._era is None:
            self._era = MODERN if method != "initialize" and _has_modern_envelope(message.get("params")) else LEGACY
        if method == "initialize":
            if self._era == LEGACY and self._legacy is None:
                params = message.get("params")
                self._initialize_id, self._client_params = request_id, params if isinstance(params, dict) else None
            return False
        if method != "tools/call" or not _is_request_id(request_id):
            return False
        params = message.get("params")
        if not isinstance(params, dict):
            return False
        if self._era == LEGACY:
            if self._legacy is None or _has_modern_envelope(params):
                return False
            self._spawn(request_id, params, self._legacy)
            return True
        route = classify_inbound_request({"method": method, "params": params})
        if isinstance(route, InboundLadderRejection):
            return False
        info = route.client_info or {}
        session = self.gateway.stdio_session_info(
            route.protocol_version, str(info.get("name", "")), str(info.get("version", ""))
        )
        capabilities = route.client_capabilities or {}
        caller = Caller(session, modern=True, can_elicit=capabilities.get("elicitation") is not None)
        self._spawn(request_id, params, caller)
        return True

    def _cancel(self, params: Any) -> bool:
        request_id = params.get("requestId") if isinstance(params, dict) else None
        scope = self._in_flight.get(_key(request_id)) if _is_request_id(request_id) else None
        if scope is None:
            return False
        scope.cancel()
        return True

    def _answered(self, request_id: Any, message: dict[str, Any]) -> bool:
        """A reply to a request the direct path sent the client (elicitation)."""
        future = self._asked.pop(request_id, None) if isinstance(request_id, str) else None
        if future is None:
            return False
        if future.done():
            return True
        if isinstance(message.get("result"), dict):
            future.set_result(message["result"])
        else:
            error = _object(message.get("error"))
            code = error.get("code")
            text = str(error.get("message", "the client answered with an error"))
            future.set_exception(MCPError(code if isinstance(code, int) else types.INTERNAL_ERROR, text))
        return True

    # -- the direct path -----------------------------------------------------------------------

    def _spawn(self, request_id: Any, params: dict[str, Any], caller: Caller) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("tools/call %r on the direct path (protocol %s)", request_id, caller.session.protocol_version)
        token = _progress_token(params)
        if token is not None:
            caller = replace(caller, progress=self._progress_relay(token))
        scope = anyio.CancelScope()
        self._in_flight[_key(request_id)] = scope
        task = asyncio.get_running_loop().create_task(self._serve_call(request_id, params, caller, scope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_call(
        self, request_id: Any, params: dict[str, Any], caller: Caller, scope: anyio.CancelScope
    ) -> None:
        reply: dict[str, Any] | None = None
        try:
            with scope:
                reply = await self._answer(request_id, params, caller)
        finally:
            if self._in_flight.get(_key(request_id)) is scope:
                del self._in_flight[_key(request_id)]
        if reply is not None and not scope.cancel_called:
            self._writer.write(dumps(reply))

    async def _answer(self, request_id: Any, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        version = caller.session.protocol_version
        try:
            spec_methods.validate_client_request("tools/call", version, params)
            typed = types.CallToolRequestParams.model_validate(params, by_name=False)
            result = await self.gateway.call_tool(caller, typed)
            return {"jsonrpc": "2.0", "id": request_id, "result": self._serialize(version, result)}
        except Exception as exc:
            error = handler_exception_to_error_data(exc)
            if error is None:
                logger.exception("tools/call %r failed", request_id)
                error = types.ErrorData(code=types.INTERNAL_ERROR, message="Internal server error")
            data = error.model_dump(by_alias=True, mode="json", exclude_unset=True)
            return {"jsonrpc": "2.0", "id": request_id, "error": data}

    def _serialize(self, version: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """The result as the SDK server shapes one: sieved for the version; 2026 results typed and stamped."""
        dumped = dict(result)
        modern = version in MODERN_PROTOCOL_VERSIONS
        if modern:
            dumped.setdefault("resultType", "complete")
        result_type = dumped.get("resultType")
        if not modern or not isinstance(result_type, str) or result_type in CORE_RESULT_TYPES:
            try:
                dumped = spec_methods.serialize_server_result("tools/call", version, dumped)
            except ValidationError:
                logger.exception("tools/call produced an invalid result")
                raise MCPError(types.INTERNAL_ERROR, "Handler returned an invalid result") from None
        if modern:
            meta = dumped.get("_meta")
            if meta is None:
                dumped["_meta"] = {SERVER_INFO_META_KEY: self.gateway.server.server_info_stamp}
            elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
                dumped["_meta"] = {**meta, SERVER_INFO_META_KEY: self.gateway.server.server_info_stamp}
        return dumped

    def _progress_relay(self, token: str | int) -> ProgressFn:
        writer = self._writer

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            params: dict[str, Any] = {"progressToken": token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            writer.write(dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params}))

        return relay

    async def _elicit(self, message: str, schema: dict[str, Any]) -> dict[str, Any]:
        """Ask the client (handshake era) to have a person fill in a form; its `ElicitResult` in wire form."""
        self._next_ask += 1
        request_id = f"mcp-armor-{self._next_ask}"
        params = types.ElicitRequestFormParams(message=message, requested_schema=schema)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asked[request_id] = future
        request = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "elicitation/create",
            "params": params.model_dump(by_alias=True, mode="json", exclude_unset=True),
        }
        try:
            self._writer.write(dumps(request))
            raw = await future
        finally:
            self._asked.pop(request_id, None)
        try:
            return types.ElicitResult.model_validate(raw, by_name=False).model_dump(by_alias=True, mode="json")
        except ValidationError:
            message = "the client answered elicitation/create with a malformed result"
            raise MCPError(types.INVALID_PARAMS, message) from None

    # -- the SDK server's side -----------------------------------------------------------------

    async def _write_sdk_replies(self, replies: MemoryObjectReceiveStream[SessionMessage], done: anyio.Event) -> None:
        try:
            async with replies:
                async for item in replies:
                    message = item.message
                    if isinstance(message, types.JSONRPCResponse) and message.id == self._initialize_id:
                        self._opened(message.result)
                    self._writer.write(message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n")
                    await self._writer.drain()
        finally:
            done.set()

    def _opened(self, result: Mapping[str, Any]) -> None:
        """The SDK server accepted `initialize`: the handshake-era direct path opens."""
        self._initialize_id = None
        if self._legacy is not None:
            return
        version = result.get("protocolVersion")
        client = self._client_params or {}
        info, capabilities = _object(client.get("clientInfo")), _object(client.get("capabilities"))
        session = self.gateway.stdio_session_info(
            version if isinstance(version, str) else "", str(info.get("name", "")), str(info.get("version", ""))
        )
        self._legacy = Caller(
            session, modern=False, can_elicit=capabilities.get("elicitation") is not None, elicit=self._elicit
        )


def _has_modern_envelope(params: Any) -> bool:
    return (
        isinstance(params, dict)
        and isinstance(params.get("_meta"), dict)
        and PROTOCOL_VERSION_META_KEY in params["_meta"]
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_request_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


def _key(request_id: Any) -> str:
    """Ids compared as the SDK compares them (a cancel may name `7` as `"7"`)."""
    return str(request_id)


def _progress_token(params: dict[str, Any]) -> str | int | None:
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if _is_request_id(token) else None
