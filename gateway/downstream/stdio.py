"""Serving one agent over this process's stdin/stdout: MCP's server side, both protocol eras.

Every line the agent sends is parsed once, as it arrives, and answered here; no SDK server (and
none of the SDK's web stack) is loaded in the process. The first request decides the connection's
era (`gateway.downstream.eras` keeps it, and admits each request). Each request is checked with
the specification's own per-version models (`mcp_types`), errors have the shapes the SDK server
gives them, and results are sieved for the caller's version, so a client sees the same answers it
would from an SDK server.

The connection answers `initialize` and `server/discover`, `ping` (handshake era) and
`subscriptions/listen` (2026); everything else is the dispatcher's. List changes reach a
handshake-era client as notifications and a 2026 client on its listen streams.
`notifications/cancelled` cancels any request in flight (a cancelled request is never answered). A
`tools/call` relays progress to the caller's token and asks for approval by elicitation (handshake
era) or input-required round trips (2026).

When the input ends (`cat session.jsonl | mcp-armor serve`, or a client that closes the gateway's
stdin and reads on), the requests already read are still answered, for up to `[gateway]
call_timeout`; what is still running then is cancelled. Nothing can be asked of the client any more:
an approval it would have to give is refused, and listen streams end unanswered.

Each request goes to the dispatcher (`gateway.core.dispatch`), which routes it, refuses and records a
method it does not serve, and shapes the result; this face parses, frames and writes, and answers
the connection's own methods (the handshake, `ping`, discovery and listen streams,
`gateway.downstream.listening`). The agent's pipes are taken as `gateway.downstream.pipes` says.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import anyio
import mcp_types as types
from pydantic import ValidationError

from gateway.calls import ProgressFn, SessionInfo
from gateway.core.dispatch import CONNECTION_METHODS
from gateway.core.gateway import Gateway, ListKind
from gateway.core.requests import RELAYED, Request
from gateway.downstream.eras import LEGACY, Admitted, Eras
from gateway.downstream.listening import ListenStreams
from gateway.downstream.messages import (
    Unreadable,
    error_reply,
    progress_token,
    read_message,
)
from gateway.downstream.pipes import Writer, agent_pipes
from gateway.errors import ChannelClosed, ProtocolError, RemoteError, format_seconds
from gateway.wire.framing import LineBuffer, Oversize, dumps
from gateway.wire.peer import Peer, RequestId, is_request_id
from gateway.wire.results import dump, shape

logger = logging.getLogger(__name__)

FLUSH_GRACE = 5.0
"""Seconds the answers written last have to reach the agent's output before the gateway goes on to exit."""
_ID_IN_FLIGHT = ProtocolError(types.INVALID_REQUEST, "a request with this id is still in flight; ids must be unique")


async def serve_stdio_connection(gateway: Gateway) -> None:
    """Serve the agent on stdin/stdout until it hangs up."""
    with agent_pipes() as (wire_in, wire_out):
        await StdioConnection(gateway).serve(wire_in, wire_out)


class StdioConnection(asyncio.Protocol):
    """One agent connection over a pair of pipes (the read side is this protocol)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._dispatcher = gateway.dispatcher
        self._lines = LineBuffer(gateway.pool.config.gateway.max_message_size)
        self._writer = Writer()
        self._ended = asyncio.Event()
        self._input_ended = False
        """The agent closed its end of the input: the requests read are answered, nothing more is read."""
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
        self._listens = ListenStreams(self._notify)
        """Open 2026 listen streams."""
        self._eras = Eras(gateway, ask=self._ask, elicit=self._elicit)
        """Which protocol era the connection speaks, and who is calling."""

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
        for key in self._listens.ids():
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
        for line in self._lines.feed(data):
            if isinstance(line, Oversize) or line.strip():
                self._route(line)

    def eof_received(self) -> bool | None:
        self.data_received(b"\n")  # a last line without its newline is read too, as the SDK's stdio server reads it
        self._input_ended = True
        self._ended.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended.set()

    def _route(self, line: bytes | Oversize) -> None:
        message = read_message(line, self._lines.limit)
        if isinstance(message, Unreadable):
            self._unreadable(message, line.head if isinstance(line, Oversize) else line)
            return
        method = message.get("method")
        params = message.get("params")
        if method is None:
            self._client.receive(message)  # an answer to a request the gateway sent the client
        elif "id" not in message:
            self._notified(method, params)
        else:
            self._requested(message["id"], method, params)

    def _unreadable(self, unreadable: Unreadable, line: bytes) -> None:
        """A line that is no message to act on: answered with the error JSON-RPC names for it (the
        connection stays up), or failing the gateway's request it answers."""
        why = unreadable.why
        answers = unreadable.answers
        if answers is not None and self._client.fail(
            answers, RemoteError(types.INVALID_PARAMS, f"the client sent {why}")
        ):
            logger.warning("the client answered with %s; the request it answers fails", why)
        elif unreadable.error is None:
            logger.warning("the client sent %s; ignored: %.200r", why, line)
        else:
            logger.warning("the client sent %s; answered with error %s: %.200r", why, unreadable.error["code"], line)
            self._reply_error(unreadable.id, unreadable.error)

    def _notified(self, method: str, params: dict[str, Any] | None) -> None:
        if method == "notifications/cancelled":
            request_id = params.get("requestId") if params is not None else None
            task = self._in_flight.pop(request_id, None) if is_request_id(request_id) else None
            if task is not None:
                _cancel(task)  # out of the map: it is never answered, even if it completes regardless
        elif method == "notifications/initialized":
            self._eras.initialized()
        else:
            logger.debug("notification %s from the client; nothing to do", method)

    # -- requests --------------------------------------------------------------------------------

    def _requested(self, request_id: RequestId, method: str, params: dict[str, Any] | None) -> None:
        self._eras.opened_by(method, params)
        if request_id in self._in_flight:
            # Its answer could not be told from the first one's, nor could a cancel name just one of them.
            self._reply_error(request_id, _ID_IN_FLIGHT.wire())
            return
        try:
            if method == "initialize" and self._eras.era == LEGACY:
                # Answered at once, so a request pipelined behind it finds the connection open.
                self._reply(request_id, self._eras.initialize(params))
                return
            request = self._eras.admit(request_id, method, params)
        except ProtocolError as exc:
            self._reply_error(request_id, exc.wire())
            return
        self._spawn(request)

    def _spawn(self, request: Admitted) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %r (protocol %s)", request.method, request.id, request.version)
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._in_flight[request.id] = task
        self._tasks.add(task)

    async def _serve(self, request: Admitted) -> None:
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

    async def _answer(self, request: Admitted) -> dict[str, Any]:
        try:
            if request.refusal is not None:
                session = self._session_of(request)
                refuse = self.gateway.refuse_misclaimed if request.misclaimed else self._dispatcher.refuse
                raise await refuse(session, request.method, request.params, request.refusal)
            if request.method in CONNECTION_METHODS:
                typed = CONNECTION_METHODS[request.method].model_validate(request.params or {}, by_name=False)
                result = shape(request.method, request.version, await self._own(request, typed), self._eras.server_info)
            else:
                result = await self._dispatcher.dispatch(self._request(request), self._eras.server_info)
            return {"jsonrpc": "2.0", "id": request.id, "result": result}
        except Exception as exc:
            return {"jsonrpc": "2.0", "id": request.id, "error": error_reply(exc, request.method)}

    def _request(self, request: Admitted) -> Request:
        """The request as the dispatcher takes it: a call's progress relayed to the token it carries, its
        upstream's log messages at the level asked for, and resource updates (handshake era)."""
        caller = request.caller
        assert caller is not None
        if request.method == "tools/call" and (token := progress_token(request.params)) is not None:
            caller = replace(caller, progress=self._progress_relay(token))
        caller = self.gateway.notices.with_logs(caller, request.method, request.params, self._send_log)
        if request.method == "resources/subscribe" and not caller.modern:
            caller = replace(caller, updated=self._send_updated)
        return Request(caller, request.method, request.params, request.call)

    async def _send_log(self, params: dict[str, Any]) -> None:
        self._notify("notifications/message", params)

    async def _send_updated(self, uri: str) -> None:
        if self._input_ended:
            raise ProtocolError(types.CONNECTION_CLOSED, "the client disconnected")
        self._notify("notifications/resources/updated", {"uri": uri})

    def _session_of(self, request: Admitted) -> SessionInfo:
        """Who sent a refused request: its caller's session, or before `initialize` this connection's,
        with no client named yet (its start recorded now, so that its end is too)."""
        if request.caller is not None:
            return request.caller.session
        return self.gateway.session_info(self.gateway.stdio_session, request.version, "", "")

    async def _own(self, request: Admitted, params: Any) -> dict[str, Any]:
        """The connection's own methods: `ping`, discovery, and listen streams."""
        if request.method == "server/discover":
            return self._eras.discover()
        if request.method == "subscriptions/listen":
            return await self._listens.listen(request.id, params)
        return {}  # ping

    def _reply(self, request_id: RequestId, result: dict[str, Any]) -> None:
        self._writer.write(dumps({"jsonrpc": "2.0", "id": request_id, "result": result}))

    def _reply_error(self, request_id: RequestId | None, error: dict[str, Any]) -> None:
        self._writer.write(dumps({"jsonrpc": "2.0", "id": request_id, "error": error}))

    def _notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._writer.write(dumps(message))

    # -- changes, progress, elicitation ----------------------------------------------------------

    async def _announce(self, changed: list[ListKind]) -> None:
        if self._eras.era == LEGACY:
            for kind in changed:
                self._notify(f"notifications/{kind}/list_changed")
            return
        self._listens.announce(changed)

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
        return await self._ask("elicitation/create", dump(params))

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
            return dump(RELAYED[method].result.model_validate(raw, by_name=False))
        except ValidationError:
            raise ProtocolError(types.INVALID_PARAMS, f"the client answered {method} with a malformed result") from None


def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a request's task once it has run its first step: a request cancelled in the same read
    that brought it still reaches its first wait (a call gets its decision and its outcome recorded)."""
    task.get_loop().call_soon(task.cancel)
