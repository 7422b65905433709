"""The one way through: every request a downstream client sends (either face, either era), and every
request an upstream sends towards the client, is routed here, or refused here.

A method has a route (its parameter model and the handler that serves it), or is one the connection
answers itself (`CONNECTION_METHODS`: the handshake, liveness, discovery and the change stream, none of
which carries anything to or from an upstream), or is refused: default deny. A refused method is
recorded in the audit log (a decision `deny` and an outcome `refused`, naming the method) and answered
with JSON-RPC's "Method not found" (-32601), the error the specification names for a method a server
does not serve.

Every result leaves through `gateway.wire.results.shape`, shaped for the caller's protocol version: the
faces write it as it is.

The other direction, by the same rule: an upstream's `ping` is answered, its sampling and elicitation
requests go to the client of the call they came with (`UPSTREAM_METHODS`), and anything else is refused
with "Method not found". Every one of them but `ping` is recorded, however it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
from pydantic import BaseModel

from gateway.audit.stages import CallAudit
from gateway.calls import SessionInfo, ToolCall
from gateway.core.requests import RELAYED, Request
from gateway.errors import ProtocolError
from gateway.wire.results import shape

logger = logging.getLogger(__name__)

CONNECTION_METHODS = frozenset({"initialize", "ping", "server/discover", "subscriptions/listen"})
"""Answered by the connection itself: they reach no upstream and carry no agent data."""

Serve = Callable[[Request, Any], Awaitable[BaseModel | Mapping[str, Any]]]
"""A route's handler: the request and its checked parameters; the result (a model, or wire form)."""


@dataclass(frozen=True, slots=True)
class Route:
    """How one method is served: the model its parameters must fit, and the handler."""

    params: type[BaseModel]
    serve: Serve


UPSTREAM_METHODS = frozenset({"ping", *RELAYED})
"""What an upstream may ask: `ping` (answered), and the requests relayed to the agent's client."""

Record = Callable[[str, str, ToolCall | None, str, str | None], None]
"""Records one request an upstream sent (`GatewayEvents.relayed`): upstream, method, the call it went to
(`None`: none could take it), how it ended (`relayed`: the client answered; `refused`; `cancelled`:
withdrawn by the upstream, or its connection ended, before the client answered), and why."""


class Dispatcher:
    """Routes each request to its handler; a method without one is refused, and recorded."""

    def __init__(self, routes: Mapping[str, Route], audit: CallAudit, record: Record) -> None:
        self.routes = dict(routes)
        self._audit = audit
        self._record = record

    def serves(self, method: str) -> bool:
        """Whether `method` is routed here or answered by the connection (anything else is refused)."""
        return method in self.routes or method in CONNECTION_METHODS

    async def refuse(self, session: SessionInfo, method: str, params: Mapping[str, Any] | None) -> ProtocolError:
        """Record a request for a method the gateway does not serve; the error to answer it with."""
        await self._audit.unrouted(session, method, params or {})
        return ProtocolError(types.METHOD_NOT_FOUND, "Method not found", method)

    async def dispatch(self, request: Request, server_info: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Serve one request; its result in wire form, shaped for the caller's version (with `server_info`
        stamped on a 2026-07-28 result, when given).

        Raises `ProtocolError` for a request refused or failed, and pydantic's `ValidationError` for
        parameters that do not fit the method's model.
        """
        route = self.routes.get(request.method)
        if route is None:
            raise await self.refuse(request.caller.session, request.method, request.params)
        parsed = request.parsed
        if parsed is None:
            parsed = route.params.model_validate(request.params or {}, by_name=False)
        result = await route.serve(request, parsed)
        return shape(request.method, request.version, result, server_info)

    async def upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any], call: ToolCall | None
    ) -> dict[str, Any]:
        """`upstream`'s request answered, or refused with `ProtocolError` (see `answer_upstream_request`)."""
        return await answer_upstream_request(upstream, method, params, call, record=self._record)


async def answer_upstream_request(
    upstream: str, method: str, params: Mapping[str, Any], call: ToolCall | None, *, record: Record
) -> dict[str, Any]:
    """`upstream`'s request answered, or refused with `ProtocolError`. `call`: the latest call in flight to
    that upstream whose client can take relayed requests (stdio upstreams cannot say which call a request
    belongs to), the one a sampling or elicitation request goes to; `None`: there is none."""
    if method == "ping":
        return {}
    if method not in UPSTREAM_METHODS:
        message = f"mcp-armor does not serve '{method}' to upstream servers"
        _relayed(record, upstream, method, call, "refused", message)
        raise ProtocolError(types.METHOD_NOT_FOUND, message)
    if call is None or call.relay is None:
        message = f"no call to '{upstream}' is in flight from a client that can answer {method}"
        _relayed(record, upstream, method, None, "refused", message)
        raise ProtocolError(types.INVALID_REQUEST, message)
    try:
        result = await call.relay(method, params)
    except ProtocolError as exc:
        _relayed(record, upstream, method, call, "refused", exc.message)
        raise
    except anyio.get_cancelled_exc_class():
        _relayed(record, upstream, method, call, "cancelled", "withdrawn before the client answered")
        raise
    _relayed(record, upstream, method, call, "relayed", None)
    return result


def _relayed(
    record: Record, upstream: str, method: str, call: ToolCall | None, outcome: str, detail: str | None
) -> None:
    if outcome == "refused":
        logger.warning("upstream '%s' asked %s: refused (%s)", upstream, method, detail)
    record(upstream, method, call, outcome, detail)
