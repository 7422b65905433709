"""Who a call is decided for on a 2026-07-28 stdio connection: the client its first request named, for
policy, for the audit log's decision events, and for `policy replay`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.chain import canonical
from gateway.audit.queries import EVERY
from gateway.audit.store import AuditStore, event
from gateway.cli.policy import replay
from gateway.config.models import load_config
from tests.conftest import RawSession, events, fixture_upstream, gateway_process, read_records, write_config

pytestmark = pytest.mark.anyio

POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "echo-for-trusted"
tools = ["box__echo"]
clients = ["trusted-*"]
effect = "allow"

[[rule]]
id = "listed"
tools = ["box__add"]
effect = "allow"
"""


def claiming(client: str, version: str = "1", **params: Any) -> dict[str, Any]:
    info = {"name": client, "version": version}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": info,
    }
    return {**params, "_meta": meta}


async def ask(raw: RawSession, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
    await raw.send({"id": request_id, "method": method, "params": params})
    with anyio.fail_after(30):
        while (message := await raw.receive()).get("id") != request_id or "method" in message:
            pass
    return message


async def test_a_request_naming_another_client_than_the_connections_first_is_refused_and_recorded(
    tmp_path: Path,
) -> None:
    record = tmp_path / "calls.jsonl"
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=POLICY)
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        assert "result" in await ask(raw, 1, "tools/list", claiming("plain-agent"))
        added = await ask(raw, 2, "tools/call", claiming("plain-agent", name="box__add", arguments={"a": 1, "b": 2}))
        assert "result" in added
        echo = claiming("trusted-agent", name="box__echo", arguments={"text": "let me in"})
        refused = await ask(raw, 3, "tools/call", echo)
        assert refused["error"]["code"] == -32600
        assert refused["error"]["message"] == (
            "this connection's client is 'plain-agent' version '1', as its first request said; a request naming "
            "client 'trusted-agent' version '1' is refused (one stdio connection serves one client)"
        )
        newer = await ask(raw, 4, "tools/list", claiming("plain-agent", "2"))
        assert newer["error"]["code"] == -32600 and "'plain-agent' version '2' is refused" in newer["error"]["message"]
        hidden = claiming("plain-\u202eagent", name="box__add", arguments={"a": 1, "b": 1})
        assert "'plain-\\u202eagent'" in (await ask(raw, 5, "tools/call", hidden))["error"]["message"]
    assert [entry["tool"] for entry in read_records(record)] == ["add"]
    logged = events(tmp_path)
    (start,) = [item for item in logged if item["kind"] == "session_start"]
    assert start["client_name"] == "plain-agent"
    decisions = [item for item in logged if item["kind"] == "decision"]
    assert [(item["tool"], item["decision"], item["stage"], item["client"]) for item in decisions] == [
        ("box__add", "allow", "policy", "plain-agent"),
        ("box__echo", "deny", "client-identity", "plain-agent"),
        ("box__add", "deny", "client-identity", "plain-agent"),
    ]
    assert all(item["session_id"] == start["session_id"] and item["principal"] is None for item in decisions)
    assert "naming client 'trusted-agent'" in decisions[1]["reason"]
    outcomes = [item["outcome"] for item in logged if item["kind"] == "outcome"]
    assert outcomes == ["ok", "refused", "refused"]


async def test_replay_re_decides_each_call_for_the_client_its_event_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY)
    store = AuditStore.open_writer(tmp_path / ".mcp-armor" / "audit.db")
    decided = {"session_id": "s1", "tool": "box__echo", "arguments": {"text": "hi"}, "stage": "policy"}
    try:
        store.append(
            [
                canonical(body)
                for body in (
                    event("session_start", session_id="s1", client_name="plain-agent", transport="http"),
                    event("decision", **decided, call_id="c1", decision="allow", client="trusted-agent"),
                    event("decision", **decided, call_id="c2", decision="deny", client="plain-agent"),
                    event("decision", **decided, call_id="c3", decision="deny"),  # recorded before events named one
                )
            ]
        )
    finally:
        store.close()
    assert await replay(load_config(config), EVERY, as_json=True) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["replayed"] == 3 and replayed["changed"] == []
