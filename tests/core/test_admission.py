"""The dispatcher's caps on requests in flight: per session and in all, refused as busy and recorded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import mcp_types as types
import pytest

from gateway.calls import OutcomeKind, SessionInfo
from gateway.core.dispatch import BUSY, Caps, Dispatcher, Route
from gateway.core.requests import Caller, Request
from gateway.errors import ProtocolError

pytestmark = pytest.mark.anyio


class _Audit:
    """Records the refusals the dispatcher makes before serving."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str, Mapping[str, Any], dict[str, Any]]] = []

    async def unresolved(self, session: SessionInfo, name: str, arguments: Mapping[str, Any], **how: Any) -> None:
        self.refused.append((session.id, name, arguments, how))


class _Held:
    """A route whose requests wait until released; `entered` counts those being served."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.entered = 0
        self.changed = anyio.Event()

    async def serve(self, request: Any, params: Any) -> dict[str, Any]:
        self.entered += 1
        self.changed.set()
        await self.release.wait()
        return {"content": []}

    async def until(self, count: int) -> None:
        with anyio.fail_after(5):
            while self.entered < count:
                self.changed = anyio.Event()
                await self.changed.wait()


def _request(session: str, method: str = "tools/call") -> Request:
    caller = Caller(SessionInfo(session, "stdio", "2025-11-25"), modern=False, can_elicit=False)
    params = {"name": "box__echo", "arguments": {"text": "hi"}} if method == "tools/call" else {}
    return Request(caller, method, params)


def _dispatcher(caps: Caps) -> tuple[Dispatcher, _Audit, _Held]:
    audit, held = _Audit(), _Held()
    routes = {
        "tools/call": Route(types.CallToolRequestParams, held.serve),
        "tools/list": Route(types.PaginatedRequestParams, held.serve),
    }
    return Dispatcher(routes, audit, lambda *event: None, caps), audit, held  # type: ignore[arg-type]


async def _refusal(dispatcher: Dispatcher, request: Request) -> ProtocolError:
    with anyio.fail_after(5), pytest.raises(ProtocolError) as caught:
        await dispatcher.dispatch(request)
    return caught.value


async def test_a_session_over_its_cap_is_refused_as_busy_and_recorded_while_others_are_served() -> None:
    dispatcher, audit, held = _dispatcher(Caps(total=10, per_session=2))
    served: list[dict[str, Any]] = []

    async def call(session: str) -> None:
        served.append(await dispatcher.dispatch(_request(session)))

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(call, "a")
        await held.until(2)
        refused = await _refusal(dispatcher, _request("a"))
        assert refused.code == BUSY
        assert "busy: 2 requests of this session are in flight" in refused.message
        assert "max_calls_per_session = 2" in refused.message
        tg.start_soon(call, "b")  # another session still gets in
        await held.until(3)
        listing = await _refusal(dispatcher, _request("a", "tools/list"))
        assert listing.code == BUSY
        held.release.set()
    assert len(served) == 3 and dispatcher.in_flight == 0
    (session, name, arguments, how), (_, method, _, listed) = audit.refused
    assert (session, name, arguments) == ("a", "box__echo", {"text": "hi"})
    assert how["stage"] == "busy" and how["outcome"] is OutcomeKind.REFUSED and how["reason"] == refused.message
    assert (method, listed["method"]) == ("tools/list", "tools/list")
    await dispatcher.dispatch(_request("a"))  # room again once they ended


async def test_the_total_cap_refuses_any_session_once_full() -> None:
    dispatcher, audit, held = _dispatcher(Caps(total=3, per_session=10))
    async with anyio.create_task_group() as tg:
        for session in ("a", "a", "b"):
            tg.start_soon(dispatcher.dispatch, _request(session))
        await held.until(3)
        refused = await _refusal(dispatcher, _request("c"))
        assert (
            refused.code == BUSY and "3 requests are in flight ([gateway] max_calls_in_flight = 3)" in refused.message
        )
        assert [entry[0] for entry in audit.refused] == ["c"]
        held.release.set()
    assert dispatcher.in_flight == 0


async def test_a_request_that_fails_frees_its_place() -> None:
    dispatcher, _, held = _dispatcher(Caps(total=1, per_session=1))
    held.release.set()
    bad = _request("a")
    bad = Request(bad.caller, "tools/call", {"name": 7})
    for _ in range(3):
        with pytest.raises(ValueError):  # pydantic's ValidationError: the parameters do not fit
            await dispatcher.dispatch(bad)
    assert dispatcher.in_flight == 0
    assert await dispatcher.dispatch(_request("a")) is not None
