"""The requesting side of a JSON-RPC peer, and the one rule its answers and cancels are matched by.

The rule is JSON-RPC 2.0's: ids of different types are different ids. A string id matches the same
string only, an integer id the same integer only (`7` is not `"7"`, nor `7.0`, `true` or `null`), and
MCP allows no other kind. An answer or a cancel naming an id of another type matches nothing.

`Peer` issues the ids, keeps an id -> future map with timeouts and progress tokens, and sends a
courtesy cancel for a request its caller abandons. The gateway speaks through one to each stdio
upstream (`gateway.wire.channel.Channel`, which also answers the upstream's requests) and to its own
stdio client (the elicitation and relayed requests the gateway sends it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeGuard

from gateway.calls import ProgressFn
from gateway.errors import ChannelClosed, RemoteError, RequestTimeout
from gateway.wire.framing import dumps

logger = logging.getLogger(__name__)

INTERNAL_ERROR = -32603

Message = dict[str, Any]
RequestId = str | int
"""A JSON-RPC id as MCP allows it; a valid id is its own map key (Python keeps `7` and `"7"` apart)."""


def is_request_id(value: object) -> TypeGuard[RequestId]:
    """A string or an integer: an id that can name a request (a float, a bool or null never does)."""
    kind = type(value)
    return kind is str or kind is int


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Message]
    on_progress: ProgressFn | None


class Peer:
    """The requesting side of one JSON-RPC connection (sans pipe: `write` sends one line).

    `who` names the far end in the log ("upstream 'x'", "the client"). Ids are integers from 1, or
    strings `id_prefix` + that number; `abandoned` is the reason a courtesy cancel gives when the caller
    stops waiting. `receive` takes every message the far end sends, in order.
    """

    def __init__(
        self,
        who: str,
        write: Callable[[bytes], None],
        *,
        id_prefix: str | None = None,
        abandoned: str = "the caller cancelled",
    ) -> None:
        self.who = who
        self._write = write
        self._prefix = id_prefix
        self._id_type: type[RequestId] = int if id_prefix is None else str
        self._abandoned = abandoned
        self._pending: dict[RequestId, _Pending] = {}
        self._next_id = 0
        self.closed: str | None = None
        """Why the connection closed; `None` while it is open."""

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        seconds: float | None,
        on_progress: ProgressFn | None = None,
        cancel_on_abandon: bool = True,
    ) -> Message:
        """Send a request and wait (for up to `seconds`, or for as long as it takes when `None`) for its
        result; `RemoteError`, `RequestTimeout` or `ChannelClosed` if none."""
        if self.closed is not None:
            raise ChannelClosed(self.closed)
        self._next_id += 1
        request_id: RequestId = self._next_id if self._prefix is None else f"{self._prefix}{self._next_id}"
        if on_progress is not None:
            params = dict(params or {})
            params["_meta"] = {**(params.get("_meta") or {}), "progressToken": request_id}
        message: Message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self._pending[request_id] = _Pending(future, on_progress)
        timer = loop.call_later(seconds, _expire, future) if seconds is not None else None
        try:
            self._write(dumps(message))
            return await future
        except RequestTimeout:
            if cancel_on_abandon:
                self._cancel(request_id, "timed out")
            raise
        except BaseException:
            if cancel_on_abandon and (future.cancelled() or not future.done()):
                self._cancel(request_id, self._abandoned)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            del self._pending[request_id]

    def send_notification(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        if self.closed is not None:
            raise ChannelClosed(self.closed)
        message: Message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._write(dumps(message))

    def _cancel(self, request_id: RequestId, reason: str) -> None:
        with suppress(Exception):
            self.send_notification("notifications/cancelled", {"requestId": request_id, "reason": reason})

    def receive(self, message: Any) -> None:
        """Route one message from the far end: a response to its waiter, by the id rule; a request or
        notification to `_received`."""
        if not isinstance(message, dict):
            logger.warning("%s sent a message that is not a JSON object; ignored", self.who)
            return
        method = message.get("method")
        if isinstance(method, str):
            self._received(method, message)
            return
        request_id = message.get("id")
        pending = self._pending.get(request_id) if type(request_id) is self._id_type else None
        if pending is None or pending.future.done():
            self._unmatched(request_id)
            return
        if isinstance(message.get("result"), dict):
            pending.future.set_result(message["result"])
        elif isinstance(error := message.get("error"), dict):
            code = error.get("code")
            pending.future.set_exception(
                RemoteError(
                    code if isinstance(code, int) else INTERNAL_ERROR, str(error.get("message", "")), error.get("data")
                )
            )
        else:
            malformed = RemoteError(INTERNAL_ERROR, "a response with neither an object result nor an error")
            pending.future.set_exception(malformed)

    def fail(self, request_id: object, error: RemoteError) -> bool:
        """An answer to the request `request_id` that cannot be taken as it came (too large, or carrying what
        JSON cannot): the request fails with `error`. Whether a request in flight had that id."""
        pending = (
            self._pending.get(request_id) if is_request_id(request_id) and type(request_id) is self._id_type else None
        )
        if pending is None or pending.future.done():
            return False
        pending.future.set_exception(error)
        return True

    def fail_all(self, error: RemoteError) -> int:
        """An answer that cannot be taken, whose request cannot be told: every request in flight fails
        with `error`. How many did."""
        failed = [pending.future for pending in self._pending.values() if not pending.future.done()]
        for future in failed:
            future.set_exception(error)
        return len(failed)

    def _received(self, method: str, message: Message) -> None:
        """A request or notification from the far end: this side only asks, so it is ignored."""
        logger.debug("%s sent %s; nothing to do", self.who, method)

    def _unmatched(self, request_id: Any) -> None:
        if type(request_id) is self._id_type:
            logger.debug("%s answered unknown or settled request %r; dropped", self.who, request_id)
        else:
            logger.warning(
                "%s answered with id %r, which names no request sent to it (an id of another type is another id); "
                "dropped",
                self.who,
                request_id,
            )

    def close(self, reason: str) -> None:
        """The connection is gone: every waiter gets `ChannelClosed`, and nothing more is sent."""
        if self.closed is not None:
            return
        self.closed = reason
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ChannelClosed(reason))

    def _progress(self, params: Mapping[str, Any] | None) -> Awaitable[None] | None:
        """A progress notification for a request in flight, relayed to its `on_progress` (the work to run)."""
        if params is None:
            return None
        token, progress = params.get("progressToken"), params.get("progress")
        if type(token) is not self._id_type or not _is_number(progress):
            return None
        pending = self._pending.get(token)
        if pending is None or pending.on_progress is None:
            return None
        total, text = params.get("total"), params.get("message")
        return pending.on_progress(
            float(progress), float(total) if _is_number(total) else None, text if isinstance(text, str) else None
        )


def _expire(future: asyncio.Future[Message]) -> None:
    if not future.done():
        future.set_exception(RequestTimeout())


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
