"""Principals through a whole gateway (in process, over a real upstream): each sees only what some rule
could allow it, its calls are decided for it and recorded with it, and its rate budget outlives its
sessions. The sessions are the ones an authenticated HTTP request opens (`Gateway.session_info`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.store import AuditStore
from gateway.config.models import load_config
from gateway.core.gateway import Gateway
from gateway.core.requests import Caller, Request
from gateway.downstream.serve import gateway_for
from gateway.errors import ProtocolError
from gateway.principals import Principal
from tests.conftest import fixture_upstream, write_config

pytestmark = pytest.mark.anyio

POLICY = """
[[rule]]
id = "alice-echoes"
tools = ["box__echo"]
principals = ["alice"]
effect = "allow"
rate = "2/minute"

[[rule]]
id = "admins-add"
tools = ["box__add"]
attributes = ["group:admins"]
effect = "allow"

[[rule]]
id = "alice-prompts"
prompts = ["box__*"]
principals = ["alice"]
effect = "allow"

[[rule]]
id = "admins-read"
resources = ["toolbox://*"]
attributes = ["group:admins"]
effect = "allow"

[[rule]]
id = "calls-itself-alice"
tools = ["box__pid"]
clients = ["alice"]
effect = "allow"
"""

ALICE = Principal("alice", frozenset({"group:users"}), "token", "t1")
BOB = Principal("bob", frozenset({"group:admins"}), "token", "t2")


@asynccontextmanager
async def _gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    config = load_config(write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY))
    async with gateway_for(config, transport="http") as gateway, anyio.create_task_group() as tg:
        with anyio.fail_after(30):
            await tg.start(gateway.run)
        yield gateway
        tg.cancel_scope.cancel()


async def _request(
    gateway: Gateway,
    session: str,
    principal: Principal | None,
    method: str,
    params: dict[str, Any],
    client: str = "agent",
) -> Any:
    info = gateway.session_info(session, "2025-11-25", client, "1.0", principal)
    with anyio.fail_after(30):
        return await gateway.dispatcher.dispatch(Request(Caller(info, modern=False, can_elicit=False), method, params))


async def _tools(gateway: Gateway, session: str, principal: Principal | None, client: str = "agent") -> list[str]:
    listed = await _request(gateway, session, principal, "tools/list", {}, client)
    return sorted(tool["name"] for tool in listed["tools"])


async def _echo(gateway: Gateway, session: str, principal: Principal | None) -> bool:
    result = await _request(
        gateway, session, principal, "tools/call", {"name": "box__echo", "arguments": {"text": "hi"}}
    )
    return not result.get("isError")


async def test_two_principals_see_and_call_different_tools(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as gateway:
        assert await _tools(gateway, "s-alice", ALICE) == ["box__echo"]
        assert await _tools(gateway, "s-bob", BOB) == ["box__add"]
        assert await _tools(gateway, "s-nobody", None) == []
        # What the client says it is is not who it is: only the `clients` rule takes its word.
        assert await _tools(gateway, "s-says-alice", None, client="alice") == ["box__pid"]
        assert await _echo(gateway, "s-alice", ALICE)
        with pytest.raises(ProtocolError, match=r"^Unknown tool: box__echo$"):
            await _echo(gateway, "s-bob", BOB)  # hidden from bob: answered like an unknown tool
    store = AuditStore.open_reader(tmp_path / ".mcp-armor" / "audit.db")
    try:
        events = list(store.events())
    finally:
        store.close()
    start = next(item for item in events if item["kind"] == "session_start" and item["session_id"] == "s-bob")
    assert (start["principal"], start["attributes"]) == ("bob", ["group:admins"])
    decided = [item for item in events if item["kind"] == "decision" and item["session_id"] == "s-alice"]
    assert [(item["principal"], item["attributes"], item["decision"]) for item in decided] == [
        ("alice", ["group:users"], "allow")
    ]
    ended = [item for item in events if item["kind"] in ("outcome", "session_end") and item["session_id"] == "s-alice"]
    assert [(item["kind"], item["principal"]) for item in ended] == [("outcome", "alice"), ("session_end", "alice")]


async def test_every_list_shows_each_principal_what_some_rule_could_allow_it(tmp_path: Path) -> None:
    async def lists(session: str, principal: Principal | None) -> tuple[list[str], ...]:
        prompts = await _request(gateway, session, principal, "prompts/list", {})
        resources = await _request(gateway, session, principal, "resources/list", {})
        templates = await _request(gateway, session, principal, "resources/templates/list", {})
        return (
            [item["name"] for item in prompts["prompts"]],
            [item["uri"] for item in resources["resources"]],
            [item["uriTemplate"] for item in templates["resourceTemplates"]],
        )

    async with _gateway(tmp_path) as gateway:
        assert await lists("s-alice", ALICE) == (["box__greet"], [], [])
        assert await lists("s-bob", BOB) == ([], ["toolbox://readme"], ["toolbox://notes/{name}"])
        assert await lists("s-nobody", None) == ([], [], [])


async def test_a_principal_that_reconnects_keeps_its_rate_budget(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as gateway:
        assert await _echo(gateway, "first", ALICE)
        assert await _echo(gateway, "first", ALICE)
        gateway.sessions.end("first", "the client ended the session")
        assert not await _echo(gateway, "second", ALICE)  # a new session of alice: the same budget, spent
