"""The pool hands every request an upstream sends to its one listener, and refuses them all without one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from gateway.calls import SessionInfo, ToolCall
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.catalog.pins import Assessment
from gateway.config.models import parse_config
from gateway.errors import ProtocolError, RemoteError
from gateway.upstream.pool import UpstreamPool

pytestmark = pytest.mark.anyio


def _pool(tmp_path: Path) -> UpstreamPool:
    return UpstreamPool(parse_config({}, tmp_path / "upstreams.toml", label="upstreams.toml", environ={}))


def _call(session: str, *, relaying: bool = True) -> ToolCall:
    async def relay(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    tool = Catalog.build([normalise_listing("box", [{"name": "ask", "inputSchema": {"type": "object"}}])], "__")
    info = SessionInfo(session, "stdio", "2025-11-25")
    return ToolCall(info, tool.tools["box__ask"], {}, relay=relay if relaying else None)


class Listener:
    """Notes every request it is handed; refuses with `refusal` when one is set."""

    def __init__(self, refusal: ProtocolError | None = None) -> None:
        self.refusal = refusal
        self.requests: list[tuple[str, str, Mapping[str, Any], tuple[ToolCall, ...]]] = []

    async def catalog_changed(self, catalog: Catalog) -> None:
        pass

    def upstream_changed(self, upstream: str, up: bool, description: str) -> None:
        pass

    def assessed(self, assessments: list[Assessment]) -> None:
        pass

    async def upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any], calls: Sequence[ToolCall]
    ) -> dict[str, Any]:
        self.requests.append((upstream, method, params, tuple(calls)))
        if self.refusal is not None:
            raise self.refusal
        return {"answered": method}


@pytest.mark.parametrize("method", ["ping", "sampling/createMessage", "elicitation/create", "roots/list"])
async def test_a_pool_with_no_listener_refuses_every_upstream_request(tmp_path: Path, method: str) -> None:
    with pytest.raises(RemoteError) as caught:
        await _pool(tmp_path).answer("box", method, {})
    assert caught.value.code == types.METHOD_NOT_FOUND
    assert caught.value.message == f"mcp-armor does not serve '{method}' to upstream servers"


async def test_the_listener_is_handed_every_request_with_every_call_in_flight(tmp_path: Path) -> None:
    pool, listener = _pool(tmp_path), Listener()
    pool.listen(listener)
    first, second, deaf = _call("s1"), _call("s2"), _call("s3", relaying=False)
    assert await pool.answer("box", "ping", None) == {"answered": "ping"}
    with pool.relaying(first), pool.relaying(second), pool.relaying(deaf):
        await pool.answer("box", "sampling/createMessage", {"messages": []})
        await pool.answer("other", "elicitation/create", {})
    await pool.answer("box", "sampling/createMessage", {})
    assert listener.requests == [
        ("box", "ping", {}, ()),
        ("box", "sampling/createMessage", {"messages": []}, (first, second, deaf)),
        ("other", "elicitation/create", {}, ()),
        ("box", "sampling/createMessage", {}, ()),
    ]


async def test_a_listener_refusal_is_the_error_the_upstream_is_answered_with(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.listen(Listener(ProtocolError(types.INVALID_PARAMS, "malformed", {"at": "messages"})))
    with pytest.raises(RemoteError) as caught:
        await pool.answer("box", "sampling/createMessage", {})
    assert caught.value.wire() == {"code": types.INVALID_PARAMS, "message": "malformed", "data": {"at": "messages"}}
