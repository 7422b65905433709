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
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
from mcp_types import methods as spec_methods
from pydantic import BaseModel, ValidationError

from gateway.audit.stages import CallAudit
from gateway.calls import Decision, OutcomeKind, SessionInfo, ToolCall
from gateway.core.requests import RELAYED, Request
from gateway.errors import ProtocolError
from gateway.policy.rules import UPSTREAM_PREFIXES
from gateway.wire.results import shape

logger = logging.getLogger(__name__)

CONNECTION_METHODS: dict[str, type[BaseModel]] = {
    "initialize": types.InitializeRequestParams,
    "ping": types.RequestParams,
    "server/discover": types.RequestParams,
    "subscriptions/listen": types.SubscriptionsListenRequestParams,
}
"""Answered by the connection itself, with the model their parameters must fit: they reach no upstream
and carry no agent data."""
INVALID_PARAMS = ProtocolError(types.INVALID_PARAMS, "Invalid request parameters", "")
MAX_METHOD_SHOWN = 200
"""Characters of an unserved method's name kept in its record (the rest is cut)."""
BUSY = -32010
"""The error a request is refused with while the gateway serves as many as it takes at once (in the
range JSON-RPC leaves to implementations)."""


@dataclass(frozen=True, slots=True)
class Caps:
    """How many requests the dispatcher serves at once: over every session, and for any one session."""

    total: int = 1024
    per_session: int = 256


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

    def __init__(self, routes: Mapping[str, Route], audit: CallAudit, record: Record, caps: Caps = Caps()) -> None:
        self.routes = dict(routes)
        self._audit = audit
        self._record = record
        self.caps = caps
        self.in_flight = 0
        """Requests being served now, over every session."""
        self._per_session: dict[str, int] = {}

    def unserved(self, method: str, version: str, params: Mapping[str, Any] | None) -> ProtocolError | None:
        """`None` when a request for `method`, speaking `version`, is served: routed here or answered by the
        connection, and defined by that version where the specification names the method. Otherwise the
        error it is refused with (see `refuse`): invalid parameters when the specification's check rejects
        them, as the SDK server orders it, else "Method not found"."""
        if (method in self.routes or method in CONNECTION_METHODS) and defined(method, version):
            return None
        try:
            check_spec(method, version, params)
        except ProtocolError as exc:
            return exc
        return _not_found(method)

    async def refuse(
        self, session: SessionInfo, method: str, params: Mapping[str, Any] | None, error: ProtocolError
    ) -> ProtocolError:
        """Record a request the gateway does not serve (its parameters without the protocol's `_meta`);
        returns `error`, to answer it with. A record that cannot be made is logged: the refusal stands."""
        recorded = {key: value for key, value in (params or {}).items() if key != "_meta"}
        try:
            await self._audit.unrouted(session, shown(method), recorded)
        except Exception as exc:
            logger.error("a refused request for an unserved method could not be recorded (%s)", type(exc).__name__)
        return error

    async def dispatch(self, request: Request, server_info: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Serve one request; its result in wire form, shaped for the caller's version (with `server_info`
        stamped on a 2026-07-28 result, when given).

        Raises `ProtocolError` for a request refused or failed, and pydantic's `ValidationError` for
        parameters that do not fit the method's model.
        """
        route = self.routes.get(request.method)
        if route is None:
            raise await self.refuse(request.caller.session, request.method, request.params, _not_found(request.method))
        session = request.caller.session.id
        held = self._per_session.get(session, 0)
        if held >= self.caps.per_session or self.in_flight >= self.caps.total:
            raise await self._busy(request, held)
        self.in_flight += 1
        self._per_session[session] = held + 1
        try:
            parsed = request.parsed
            if parsed is None:
                parsed = route.params.model_validate(request.params or {}, by_name=False)
            result = await route.serve(request, parsed)
        finally:
            self.in_flight -= 1
            if (left := self._per_session[session] - 1) > 0:
                self._per_session[session] = left
            else:
                del self._per_session[session]
        return shape(request.method, request.version, result, server_info)

    async def _busy(self, request: Request, held: int) -> ProtocolError:
        """Refuse a request while the gateway serves as many as it takes (for its session, or in all), and
        record it: a call as a refused call to its tool, any other request by its method."""
        if held >= self.caps.per_session:
            limit = f"[gateway] max_calls_per_session = {self.caps.per_session}"
            why = f"{held} requests of this session are in flight ({limit})"
        else:
            why = f"{self.in_flight} requests are in flight ([gateway] max_calls_in_flight = {self.caps.total})"
        reason = f"the mcp-armor gateway is busy: {why}; try again once some have ended"
        logger.warning("a %s request refused: %s", shown(request.method), reason)
        params = request.params or {}
        name, arguments = params.get("name"), params.get("arguments")
        session = request.caller.session
        try:
            if request.method == "tools/call" and isinstance(name, str):
                recorded = arguments if isinstance(arguments, dict) else {}
                await self._audit.unresolved(session, name, recorded, stage="busy", reason=reason, outcome=REFUSED)
            else:
                method = shown(request.method)
                recorded = {key: value for key, value in params.items() if key != "_meta"}
                await self._audit.unresolved(
                    session, method, recorded, stage="busy", reason=reason, outcome=REFUSED, method=method
                )
        except Exception as exc:
            logger.error("a request refused as busy could not be recorded (%s)", type(exc).__name__)
        return ProtocolError(BUSY, reason)

    async def upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any], calls: Sequence[ToolCall]
    ) -> dict[str, Any]:
        """`upstream`'s request answered, or refused with `ProtocolError` (see `answer_upstream_request`),
        decided by policy as `sampling:UPSTREAM` or `elicitation:UPSTREAM` over its parameters."""
        return await answer_upstream_request(
            upstream, method, params, calls, record=self._record, decide=self._decide_upstream
        )

    async def _decide_upstream(self, upstream: str, method: str, params: Mapping[str, Any], call: ToolCall) -> Decision:
        engine, who = self._audit.engine, call.session.who
        now = time.monotonic()
        decision = engine.evaluate(UPSTREAM_PREFIXES[method] + upstream, params, now=now, who=who)
        if decision.proceeds:
            decision = engine.charged(decision, await engine.charge_call(decision, who, now))
        return decision


REFUSED = OutcomeKind.REFUSED


def _not_found(method: str) -> ProtocolError:
    return ProtocolError(types.METHOD_NOT_FOUND, "Method not found", method)


def shown(method: str) -> str:
    """A method's name as a record or a log line shows it: control characters escaped, at most
    `MAX_METHOD_SHOWN` characters (the name is the sender's choice)."""
    text = method if method.isprintable() else method.encode("unicode_escape").decode("ascii")
    return text[:MAX_METHOD_SHOWN]


def defined(method: str, version: str) -> bool:
    """Whether `version` of the specification defines `method` (a method it does not name is the server's
    to serve or refuse)."""
    return method not in spec_methods.SPEC_CLIENT_METHODS or (method, version) in spec_methods.CLIENT_REQUESTS


def check_spec(method: str, version: str, params: Mapping[str, Any] | None) -> None:
    """The specification's check of a request's parameters for `version`, where it defines the method.
    Raises `ProtocolError` (invalid parameters) when they do not fit."""
    if (method, version) not in spec_methods.CLIENT_REQUESTS:
        return
    try:
        spec_methods.validate_client_request(method, version, params)
    except ValidationError:
        raise INVALID_PARAMS from None


Decide = Callable[[str, str, Mapping[str, Any], ToolCall], Awaitable[Decision]]
"""The policy's decision on an upstream's request (upstream, method, parameters, the call it came with)."""


async def answer_upstream_request(
    upstream: str,
    method: str,
    params: Mapping[str, Any],
    calls: Sequence[ToolCall],
    *,
    record: Record,
    decide: Decide | None = None,
) -> dict[str, Any]:
    """`upstream`'s request answered, or refused with `ProtocolError`. `calls`: every call in flight to that
    upstream, oldest first. A stdio upstream cannot say which call a request belongs to, so it goes to
    the client of the latest, and only while every call in flight is one session's: with calls of
    several sessions in flight, which one asks cannot be told, and it is refused rather than shown to
    another session's person or model. `decide`: the policy, which must let the request go ahead (an
    `ask` cannot: a person is not asked about an upstream's question). An elicitation reaches the
    person saying which upstream asks, so it cannot pass for the gateway's own approval prompt."""
    if method == "ping":
        return {}
    call = calls[-1] if calls else None
    if method not in UPSTREAM_METHODS:
        method = shown(method)
        why = f"mcp-armor does not serve '{method}' to upstream servers"
        raise _refused(record, upstream, method, call, types.METHOD_NOT_FOUND, why)
    if len({in_flight.session.id for in_flight in calls}) > 1:
        why = f"calls of several sessions are in flight to '{upstream}', and which one asks {method} cannot be told"
        raise _refused(record, upstream, method, None, types.INVALID_REQUEST, why)
    if call is None or call.relay is None:
        why = f"no call to '{upstream}' is in flight from a client that can answer {method}"
        raise _refused(record, upstream, method, None, types.INVALID_REQUEST, why)
    if decide is not None:
        decision = await decide(upstream, method, params, call)
        if not decision.proceeds:
            why = f"refused by the mcp-armor gateway's policy: {decision.reason}"
            raise _refused(record, upstream, method, call, types.INVALID_REQUEST, why)
    if method == "elicitation/create" and isinstance(params.get("message"), str):
        params = {
            **params,
            "message": f"[asked by the upstream server '{upstream}', not by mcp-armor] {params['message']}",
        }
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


def _refused(record: Record, upstream: str, method: str, call: ToolCall | None, code: int, why: str) -> ProtocolError:
    """Record an upstream's request as refused; the error it is answered with."""
    _relayed(record, upstream, method, call, "refused", why)
    return ProtocolError(code, why)


def _relayed(
    record: Record, upstream: str, method: str, call: ToolCall | None, outcome: str, detail: str | None
) -> None:
    if outcome == "refused":
        logger.warning("upstream '%s' asked %s: refused (%s)", upstream, method, detail)
    record(upstream, method, call, outcome, detail)
