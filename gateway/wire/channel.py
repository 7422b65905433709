"""Newline-delimited JSON-RPC over pipes, straight on the event loop.

The gateway's hot path crosses two pipes per call: the agent's (stdin/stdout) and the upstream's.
Here both are asyncio protocols: bytes arrive in `data_received`, are split into lines and parsed
there, and each message is routed at once (a response resolves the waiting future, a request starts
its handler task). No reader task, worker thread or memory stream sits between the pipe and the
code that acts on a message.

`Channel` is a whole JSON-RPC peer over an upstream's pipes: the requesting side of
`gateway.wire.peer.Peer` (its id rule, timeouts, progress tokens and courtesy cancels), and answers
for the upstream's own requests, which its cancels withdraw by the same id rule. Over an upstream's
pipes it is driven by gateway.upstream.spawn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.errors import RemoteError
from gateway.wire.framing import dumps
from gateway.wire.peer import INTERNAL_ERROR, Message, Peer, RequestId, is_request_id

logger = logging.getLogger(__name__)

METHOD_NOT_FOUND = -32601

RequestHandler = Callable[[str, Mapping[str, Any] | None], Awaitable[Message]]
"""Answers a request the peer sends: the result, or raises `RemoteError`."""
NotificationHandler = Callable[[str, Mapping[str, Any] | None], None]


class Channel(Peer):
    """One JSON-RPC connection to an upstream over a pipe (sans pipe: `write` sends one line).

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
        super().__init__(f"upstream '{name}'", write)
        self.name = name
        self._on_request = on_request
        self._on_notify = on_notify
        self._tasks: set[asyncio.Task[None]] = set()
        self._answering: dict[RequestId, asyncio.Task[None]] = {}
        """The peer's requests being answered, by id: a `notifications/cancelled` naming one cancels it."""

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        self.send_notification(method, params)

    def _received(self, method: str, message: Message) -> None:
        """A request from the peer goes to its handler in a task; a notification is acted on here."""
        params = message.get("params")
        params = params if isinstance(params, dict) else None
        if "id" in message:
            request_id = message["id"]
            task = self._spawn(self._answer(request_id, method, params))
            if is_request_id(request_id):  # any other id cannot be named by a cancel
                self._answering[request_id] = task
                task.add_done_callback(lambda done: self._answered(request_id, done))
        elif method == "notifications/cancelled":
            self._withdrawn(params)
        elif method == "notifications/progress":
            relay = self._progress(params)
            if relay is not None:
                self._spawn(_contained(relay, f"relaying progress from upstream '{self.name}'"))
        elif self._on_notify is not None:
            self._on_notify(method, params)

    def close(self, reason: str) -> None:
        """The pipe is gone: every waiter gets `ChannelClosed`; tasks answering the peer are cancelled."""
        if self.closed is not None:
            return
        super().close(reason)
        for task in self._tasks:
            task.cancel()

    def _withdrawn(self, params: Mapping[str, Any] | None) -> None:
        """The peer cancelled a request of its own: stop answering it (and, as MCP asks, send no answer)."""
        request_id = params.get("requestId") if params is not None else None
        task = self._answering.pop(request_id, None) if is_request_id(request_id) else None
        if task is not None:
            logger.debug("upstream '%s' cancelled its request %r", self.name, request_id)
            task.cancel()

    def _answered(self, request_id: RequestId, task: asyncio.Task[None]) -> None:
        if self._answering.get(request_id) is task:
            del self._answering[request_id]

    async def _answer(self, request_id: Any, method: str, params: Mapping[str, Any] | None) -> None:
        reply: Message = {"jsonrpc": "2.0", "id": request_id}
        try:
            if self._on_request is None:
                raise RemoteError(METHOD_NOT_FOUND, f"'{method}' is not served")
            reply["result"] = await self._on_request(method, params)
        except RemoteError as exc:
            reply["error"] = exc.wire()
        except Exception:  # a fault of the gateway's: the upstream is still answered, never left waiting
            logger.exception("failed answering %s from upstream '%s'", method, self.name)
            reply["error"] = {"code": INTERNAL_ERROR, "message": "the gateway failed to answer this request"}
        if self.closed is None:
            self._write(dumps(reply))

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _contained(work: Awaitable[None], what: str) -> None:
    try:
        await work
    except Exception:
        logger.exception("failed %s", what)
