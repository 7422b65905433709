"""Newline-delimited JSON-RPC over pipes, straight on the event loop.

The gateway's hot path crosses two pipes per call: the agent's (stdin/stdout) and the upstream's.
Here both are asyncio protocols: bytes arrive in `data_received`, are split into lines and parsed
there, and each message is routed at once (a response resolves the waiting future, a request starts
its handler task). No reader task, worker thread or memory stream sits between the pipe and the
code that acts on a message.

`Channel` is the requesting side of a JSON-RPC peer: an id -> future map with timeouts, progress
tokens, courtesy cancels and answers for the peer's own requests. Over an upstream's pipes it is
driven by gateway.upstream.spawn.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeGuard

from gateway.calls import ProgressFn
from gateway.errors import ChannelClosed, RemoteError, RequestTimeout
from gateway.schema import replace_non_finite

logger = logging.getLogger(__name__)

MAX_LINE = 64 * 1024 * 1024
"""The longest message accepted on a pipe (bytes); a longer one is a protocol fault."""

INTERNAL_ERROR = -32603
METHOD_NOT_FOUND = -32601

Message = dict[str, Any]
RequestHandler = Callable[[str, Mapping[str, Any] | None], Awaitable[Message]]
"""Answers a request the peer sends: the result, or raises `RemoteError`."""
NotificationHandler = Callable[[str, Mapping[str, Any] | None], None]


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
"""Built once (`json.dumps` with options builds an encoder per call); the second for lone surrogates."""


def dumps(message: Any) -> bytes:
    """One message as a line of compact UTF-8 JSON; NaN and infinities (not JSON) become null.

    A lone surrogate (JSON can carry one, escaped, and UTF-8 cannot) stays escaped, as it arrived.
    """
    try:
        text = _encode(message)
    except ValueError:
        message = replace_non_finite(message, lambda _: None)
        text = _encode(message)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _encode_ascii(message).encode() + b"\n"


class LineBuffer:
    """Splits a byte stream into lines; `feed` returns the complete ones."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
            raise ValueError(f"a message longer than {MAX_LINE} bytes")
        return lines


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Message]
    on_progress: ProgressFn | None


class Channel:
    """The requesting side of one JSON-RPC connection over a pipe (sans pipe: `write` sends one line).

    `receive` takes every message the peer sends, in order, from whoever reads the pipe.
    """

    def __init__(
        self,
        name: str,
        write: Callable[[bytes], None],
        *,
        on_request: RequestHandler | None = None,
        on_notify: NotificationHandler | None = None,
    ) -> None:
        self.name = name
        self._write = write
        self._on_request = on_request
        self._on_notify = on_notify
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._answering: dict[str, asyncio.Task[None]] = {}
        """The peer's requests being answered, by id (as JSON): a `notifications/cancelled` cancels one."""
        self.closed: str | None = None
        """Why the channel closed; `None` while it is open."""

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        seconds: float,
        on_progress: ProgressFn | None = None,
        cancel_on_abandon: bool = True,
    ) -> Message:
        """Send a request and wait for its result; `RemoteError`, `RequestTimeout` or `ChannelClosed` if none."""
        if self.closed is not None:
            raise ChannelClosed(self.closed)
        self._next_id += 1
        request_id = self._next_id
        if on_progress is not None:
            params = dict(params or {})
            params["_meta"] = {**(params.get("_meta") or {}), "progressToken": request_id}
        message: Message = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        self._pending[request_id] = _Pending(future, on_progress)
        timer = loop.call_later(seconds, _expire, future)
        try:
            self._write(dumps(message))
            return await future
        except RequestTimeout:
            if cancel_on_abandon:
                self._cancel(request_id, "timed out")
            raise
        except BaseException:
            if cancel_on_abandon and (future.cancelled() or not future.done()):
                self._cancel(request_id, "the caller cancelled")
            raise
        finally:
            timer.cancel()
            del self._pending[request_id]

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        self.send_notification(method, params)

    def send_notification(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        if self.closed is not None:
            raise ChannelClosed(self.closed)
        message: Message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self._write(dumps(message))

    def _cancel(self, request_id: int, reason: str) -> None:
        with suppress(Exception):
            self.send_notification("notifications/cancelled", {"requestId": request_id, "reason": reason})

    def receive(self, message: Any) -> None:
        """Route one message from the peer: a response to its waiter, a request to its handler."""
        if not isinstance(message, dict):
            logger.warning("upstream '%s' sent a message that is not a JSON object; ignored", self.name)
            return
        method = message.get("method")
        if isinstance(method, str):
            params = message.get("params")
            params = params if isinstance(params, dict) else None
            if "id" in message:
                key = _id_key(message["id"])
                task = self._spawn(self._answer(message["id"], method, params))
                self._answering[key] = task
                task.add_done_callback(lambda done: self._answered(key, done))
            elif method == "notifications/cancelled":
                self._withdrawn(params)
            elif method == "notifications/progress":
                self._progress(params)
            elif self._on_notify is not None:
                self._on_notify(method, params)
            return
        request_id = _as_int(message.get("id"))
        pending = self._pending.get(request_id) if request_id is not None else None
        if pending is None or pending.future.done():
            logger.debug("upstream '%s' answered unknown or settled request %r; dropped", self.name, message.get("id"))
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

    def close(self, reason: str) -> None:
        """The pipe is gone: every waiter gets `ChannelClosed`; tasks answering the peer are cancelled."""
        if self.closed is not None:
            return
        self.closed = reason
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ChannelClosed(reason))
        for task in self._tasks:
            task.cancel()

    def _progress(self, params: Mapping[str, Any] | None) -> None:
        if params is None:
            return
        token, progress = _as_int(params.get("progressToken")), params.get("progress")
        if token is None or not _is_number(progress):
            return
        pending = self._pending.get(token)
        if pending is None or pending.on_progress is None:
            return
        total, text = params.get("total"), params.get("message")
        relay = pending.on_progress(
            float(progress), float(total) if _is_number(total) else None, text if isinstance(text, str) else None
        )
        self._spawn(_contained(relay, f"relaying progress from upstream '{self.name}'"))

    def _withdrawn(self, params: Mapping[str, Any] | None) -> None:
        """The peer cancelled a request of its own: stop answering it (and, as MCP asks, send no answer)."""
        request_id = params.get("requestId") if params is not None else None
        task = self._answering.pop(_id_key(request_id), None) if isinstance(request_id, str | int) else None
        if task is not None:
            logger.debug("upstream '%s' cancelled its request %r", self.name, request_id)
            task.cancel()

    def _answered(self, key: str, task: asyncio.Task[None]) -> None:
        if self._answering.get(key) is task:
            del self._answering[key]

    async def _answer(self, request_id: Any, method: str, params: Mapping[str, Any] | None) -> None:
        reply: Message = {"jsonrpc": "2.0", "id": request_id}
        try:
            if self._on_request is None:
                raise RemoteError(METHOD_NOT_FOUND, f"'{method}' is not served")
            reply["result"] = await self._on_request(method, params)
        except RemoteError as exc:
            reply["error"] = exc.wire()
        if self.closed is None:
            self._write(dumps(reply))

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _id_key(request_id: Any) -> str:
    """A JSON-RPC id as a map key that keeps 1 and "1" apart."""
    return json.dumps(request_id)


def _expire(future: asyncio.Future[Message]) -> None:
    if not future.done():
        future.set_exception(RequestTimeout())


def _as_int(value: Any) -> int | None:
    """A request id or progress token the gateway issued (integers; some peers echo them as strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def _contained(work: Awaitable[None], what: str) -> None:
    try:
        await work
    except Exception:
        logger.exception("failed %s", what)
