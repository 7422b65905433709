"""The dispatcher: what it answers the requests upstreams send (`ping`, relayed requests, refusals)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import mcp_types as types
import pytest

from gateway.calls import SessionInfo, ToolCall
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.core.dispatch import MAX_METHOD_SHOWN, Dispatcher, Route, answer_upstream_request
from gateway.errors import ProtocolError

pytestmark = pytest.mark.anyio

Recorded = list[tuple[str, str, ToolCall | None, str, str | None]]


def _call(answer: dict[str, Any] | ProtocolError) -> ToolCall:
    async def relay(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(answer, ProtocolError):
            raise answer
        return answer

    catalog = Catalog.build([normalise_listing("box", [{"name": "ask", "inputSchema": {"type": "object"}}])], "__")
    return ToolCall(SessionInfo("s1", "stdio", "2025-11-25"), catalog.tools["box__ask"], {}, relay=relay)


async def test_ping_is_answered_whether_or_not_a_call_is_in_flight() -> None:
    recorded: Recorded = []
    assert await answer_upstream_request("box", "ping", {}, (), record=lambda *e: recorded.append(e)) == {}
    assert await answer_upstream_request("box", "ping", {}, (_call({}),), record=lambda *e: recorded.append(e)) == {}
    assert recorded == []


@pytest.mark.parametrize("method", ["roots/list", "tools/call", "notifications/message"])
async def test_a_method_not_relayed_is_refused_as_not_found(method: str) -> None:
    recorded: Recorded = []
    with pytest.raises(ProtocolError) as caught:
        await answer_upstream_request("box", method, {}, (_call({}),), record=lambda *e: recorded.append(e))
    assert caught.value.code == types.METHOD_NOT_FOUND
    message = f"mcp-armor does not serve '{method}' to upstream servers"
    assert caught.value.message == message
    assert [(upstream, asked, outcome, why) for upstream, asked, _, outcome, why in recorded] == [
        ("box", method, "refused", message)
    ]


async def test_a_relayed_request_with_no_call_in_flight_is_refused_and_recorded() -> None:
    recorded: Recorded = []
    with pytest.raises(ProtocolError) as caught:
        await answer_upstream_request("box", "sampling/createMessage", {}, (), record=lambda *e: recorded.append(e))
    message = "no call to 'box' is in flight from a client that can answer sampling/createMessage"
    assert (caught.value.code, caught.value.message) == (types.INVALID_REQUEST, message)
    assert recorded == [("box", "sampling/createMessage", None, "refused", message)]


async def test_a_relayed_request_goes_to_the_call_and_is_recorded_however_it_ends() -> None:
    recorded: Recorded = []
    answered = _call({"action": "decline"})
    result = await answer_upstream_request(
        "box", "elicitation/create", {"message": "?"}, (answered,), record=lambda *e: recorded.append(e)
    )
    assert result == {"action": "decline"}
    refusing = _call(ProtocolError(types.INVALID_REQUEST, "the agent's client does not take elicitation/create"))
    with pytest.raises(ProtocolError, match="does not take"):
        await answer_upstream_request(
            "box", "elicitation/create", {}, (refusing,), record=lambda *e: recorded.append(e)
        )
    assert recorded == [
        ("box", "elicitation/create", answered, "relayed", None),
        ("box", "elicitation/create", refusing, "refused", "the agent's client does not take elicitation/create"),
    ]


class _Audit:
    """The audit as the dispatcher sees it, recording refusals, or failing to."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure
        self.refused: list[tuple[str, str, Mapping[str, Any]]] = []

    async def unrouted(self, session: SessionInfo, method: str, params: Mapping[str, Any]) -> None:
        if self.failure is not None:
            raise self.failure
        self.refused.append((session.id, method, params))


SESSION = SessionInfo("s1", "stdio", "2025-11-25")


def _dispatcher(audit: _Audit) -> Dispatcher:
    async def serve(request: Any, params: Any) -> dict[str, Any]:
        return {}

    routes = {"tools/list": Route(types.PaginatedRequestParams, serve)}
    return Dispatcher(routes, audit, lambda *event: None)  # type: ignore[arg-type]


def test_what_is_served_depends_on_the_route_and_the_version() -> None:
    dispatcher = _dispatcher(_Audit())
    assert dispatcher.unserved("tools/list", "2025-11-25", {}) is None
    assert dispatcher.unserved("ping", "2025-11-25", {}) is None  # answered by the connection
    unrouted = {"tools/call": {"name": "echo"}, "vendor/x": {}, "server/discover": {}}  # discover: 2026 only
    for method, params in unrouted.items():
        refusal = dispatcher.unserved(method, "2025-11-25", params)
        assert refusal is not None and (refusal.code, refusal.data) == (types.METHOD_NOT_FOUND, method)
    # Malformed parameters of a method the specification defines are invalid first, as the SDK orders it.
    malformed = dispatcher.unserved("resources/subscribe", "2025-11-25", {"nope": 1})
    assert malformed is not None and malformed.code == types.INVALID_PARAMS


async def test_a_refusal_is_recorded_without_the_envelope_and_with_a_safe_method_name() -> None:
    audit = _Audit()
    dispatcher = _dispatcher(audit)
    error = ProtocolError(types.METHOD_NOT_FOUND, "Method not found", "x")
    params = {"path": "/etc/passwd", "_meta": {"io.modelcontextprotocol/clientInfo": {"name": "n"}}}
    assert await dispatcher.refuse(SESSION, "vendor/\x1b[2Jx\n" + "y" * 500, params, error) is error
    [(session, method, recorded)] = audit.refused
    assert session == "s1" and recorded == {"path": "/etc/passwd"}
    assert method.startswith("vendor/\\x1b[2Jx\\n") and len(method) == MAX_METHOD_SHOWN and method.isprintable()


async def test_a_refusal_stands_when_its_record_cannot_be_made(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = _dispatcher(_Audit(RecursionError("nested too deep")))
    error = ProtocolError(types.METHOD_NOT_FOUND, "Method not found", "vendor/x")
    assert await dispatcher.refuse(SESSION, "vendor/x", {}, error) is error
    assert "could not be recorded (RecursionError)" in caplog.text


async def test_an_upstream_request_is_refused_while_calls_of_several_sessions_are_in_flight() -> None:
    recorded: Recorded = []
    mine, theirs = _call({"action": "accept"}), _call({"action": "accept"})
    theirs = replace(theirs, session=SessionInfo("s2", "http", "2025-11-25"))
    with pytest.raises(ProtocolError, match="calls of several sessions are in flight to 'box'"):
        await answer_upstream_request(
            "box", "elicitation/create", {"message": "?"}, (mine, theirs), record=lambda *e: recorded.append(e)
        )
    assert [(event[2], event[3]) for event in recorded] == [(None, "refused")]
    same = replace(mine, id="another-call-of-s1")
    result = await answer_upstream_request(
        "box", "elicitation/create", {"message": "?"}, (mine, same), record=lambda *e: recorded.append(e)
    )
    assert result == {"action": "accept"} and recorded[-1][2] is same  # one session's: the latest call's client
