"""Completions, log messages and resource subscriptions through the gateway, over both transports and
both protocol eras, against a real SDK upstream (`tests/fixtures/chatty.py`): each decided, recorded,
screened, and delivered only to the session it belongs to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import (
    calls,
    client_over,
    events,
    fixture_upstream,
    http_gateway,
    read_records,
    text_of,
    write_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")]

SECRET = "AKIAABCDEFGHIJKLMNOP"
POLICY = r"""
[defaults]
effect = "deny"

[[rule]]
id = "chatty-tools"
tools = ["chatty__*"]
effect = "allow"

[[rule]]
id = "open-files"
prompts = ["chatty__open"]
effect = "allow"

[[rule]]
id = "no-env-prompt"
prompts = ["chatty__open"]
effect = "deny"
reason = "secret files stay closed"
when = { required = ["file"], properties = { file = { pattern = '^\.env' } } }

[[rule]]
id = "read-files"
resources = ["chatty://files/*"]
effect = "allow"

[[rule]]
id = "no-env-file"
resources = ["chatty://files/.env*"]
effect = "deny"

[[rule]]
id = "mask-keys"
tools = ["*"]
prompts = ["*"]
resources = ["*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']
"""
MASK = "[redacted by mcp-armor rule 'mask-keys']"
ERAS = [
    pytest.param("stdio", "legacy", id="stdio-handshake"),
    pytest.param("stdio", "2026-07-28", id="stdio-2026"),
    pytest.param("http", "legacy", id="http-handshake"),
    pytest.param("http", "2026-07-28", id="http-2026"),
]


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "chatty.jsonl"


@pytest.fixture
def config(tmp_path: Path, record: Path) -> Path:
    return write_config(tmp_path, {"chatty": fixture_upstream("chatty.py", CHATTY_RECORD=str(record))}, policy=POLICY)


def upstream_got(record: Path, method: str) -> list[dict[str, Any]]:
    return [entry["params"] for entry in read_records(record) if entry["method"] == method]


@pytest.mark.parametrize(("transport", "mode"), ERAS)
async def test_a_completion_is_decided_as_what_it_reaches_and_its_values_screened(
    config: Path, record: Path, transport: str, mode: str
) -> None:
    prompt = types.PromptReference(type="ref/prompt", name="chatty__open")
    template = types.ResourceTemplateReference(type="ref/resource", uri="chatty://files/{name}")
    async with client_over(transport, config, mode) as client:
        with anyio.fail_after(30):
            await client.list_tools()
            opened = await client.complete(prompt, {"name": "file", "value": ""})
            # `.env` is suggested by the upstream, but a get of the prompt with it would be refused.
            assert opened.completion.values == ["notes.txt", "naughty.txt", "news.txt"]
            assert opened.completion.total is None
            some = await client.complete(prompt, {"name": "file", "value": "n"})
            assert some.completion.values == ["notes.txt", "naughty.txt", "news.txt"]
            assert some.completion.total == 3  # nothing dropped: the upstream's answer as it came
            keyed = await client.complete(prompt, {"name": "file", "value": "key"})
            assert keyed.completion.values == [f"key {MASK}"]
            files = await client.complete(template, {"name": "name", "value": ""})
            assert files.completion.values == ["notes.txt", "naughty.txt", "news.txt"]
            with pytest.raises(MCPError) as refused:
                await client.complete(prompt, {"name": "file", "value": ".env"})
            assert "secret files stay closed" in refused.value.error.message
            with pytest.raises(MCPError) as unknown:
                await client.complete(
                    types.PromptReference(type="ref/prompt", name="chatty__nope"), {"name": "a", "value": ""}
                )
            assert "Unknown prompt" in unknown.value.error.message
            # Values under a name the prompt or the template does not have would pass the rules unseen.
            with pytest.raises(MCPError) as undeclared:
                await client.complete(prompt, {"name": "x", "value": ".e"})
            assert "has no argument x" in undeclared.value.error.message
            with pytest.raises(MCPError) as unmade:
                await client.complete(template, {"name": "x", "value": ".e"})
            assert "cannot be completed for x" in unmade.value.error.message
    forwarded = upstream_got(record, "completion/complete")
    assert [entry["argument"]["value"] for entry in forwarded] == ["", "n", "key", ""]
    assert forwarded[0]["ref"] == {"type": "ref/prompt", "name": "open"}  # the upstream's own name
    assert forwarded[3]["ref"] == {"type": "ref/resource", "uri": "chatty://files/{name}"}
    completions = [event for event in events(config.parent) if event.get("method") == "completion/complete"]
    decisions = [event for event in completions if event["kind"] == "decision"]
    assert [event["decision"] for event in decisions] == ["allow", "allow", "allow", "allow", "deny"]
    assert decisions[-1]["tool"] == "prompt:chatty__open" and "no-env-prompt" in decisions[-1]["rules"]
    assert decisions[3]["tool"] == "resource:chatty://files/"
    outcomes = [event for event in events(config.parent) if event["kind"] == "outcome"]
    assert [event["outcome"] for event in outcomes if event["call_id"] in {d["call_id"] for d in decisions}] == [
        "ok",
        "ok",
        "ok",
        "ok",
        "refused",
    ]


@pytest.mark.parametrize(("transport", "mode"), ERAS)
async def test_log_messages_reach_the_callers_session_screened_and_at_its_level(
    config: Path, record: Path, transport: str, mode: str
) -> None:
    received: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params)

    lines = ["info:quiet", f"warning:key {SECRET}", json.dumps({"k": SECRET}).join(("error:", ""))]
    async with client_over(
        transport, config, mode, logging_callback=on_log, log_level="warning" if mode == "2026-07-28" else None
    ) as client:
        with anyio.fail_after(30):
            await client.list_tools()
            if mode == "legacy":
                await client.set_logging_level("warning")
            result = await client.call_tool("chatty__talk", {"lines": lines})
            assert text_of(result) == "done"
    assert [(entry.level, entry.data) for entry in received] == [("warning", f"key {MASK}"), ("error", {"k": MASK})]
    assert upstream_got(record, "logging/setLevel") == [{"level": "warning"}]
    assert calls(config.parent)["chatty__talk"]["outcome"]["rules"] == ["mask-keys"]


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_2026_request_that_asks_for_no_log_level_gets_no_log_messages(config: Path, transport: str) -> None:
    received: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params)

    async with client_over(transport, config, "2026-07-28", logging_callback=on_log) as client:
        with anyio.fail_after(30):
            result = await client.call_tool("chatty__talk", {"lines": ["error:loud"]})
            assert text_of(result) == "done"
    assert received == []


async def test_one_sessions_log_messages_and_level_do_not_reach_another(config: Path, record: Path) -> None:
    heard: dict[str, list[str]] = {"a": [], "b": []}

    def hearing(name: str) -> Any:
        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            heard[name].append(str(params.data))

        return on_log

    # Two sessions of one HTTP gateway: A asks for errors only, B for everything.
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http:
        async with (
            Client(streamable_http_client(url, http_client=http), mode="legacy", logging_callback=hearing("a")) as a,
            Client(streamable_http_client(url, http_client=http), mode="legacy", logging_callback=hearing("b")) as b,
        ):
            with anyio.fail_after(30):
                await a.set_logging_level("error")
                await b.set_logging_level("debug")
                await a.call_tool("chatty__talk", {"lines": ["info:for a, too quiet", "error:for a"]})
                await b.call_tool("chatty__talk", {"lines": ["info:for b"]})
    assert heard == {"a": ["for a"], "b": ["for b"]}
    # The upstream is asked for the most verbose level any session wants; each session filters its own.
    assert upstream_got(record, "logging/setLevel") == [{"level": "error"}, {"level": "debug"}]


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_resource_updates_reach_only_the_sessions_that_subscribed(
    config: Path, record: Path, transport: str
) -> None:
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(message.params.uri)

    notes = "chatty://files/notes.txt"
    async with client_over(transport, config, "legacy", message_handler=on_message) as client:
        with anyio.fail_after(30):
            await client.list_tools()
            await client.call_tool("chatty__touch", {"uri": notes})  # not subscribed yet: nothing comes
            await client.subscribe_resource(notes)
            with pytest.raises(MCPError) as hidden:
                await client.subscribe_resource("chatty://files/.env")
            assert "Unknown resource" in hidden.value.error.message
            await client.call_tool("chatty__touch", {"uri": notes})
            while not updates:
                await client.send_ping()
            await client.unsubscribe_resource(notes)
            await client.call_tool("chatty__touch", {"uri": notes})
            await client.send_ping()
    assert updates == [notes]
    assert upstream_got(record, "resources/subscribe") == [{"uri": notes}]  # `.env` never reached it
    assert upstream_got(record, "resources/unsubscribe") == [{"uri": notes}]
    [decided] = [event for event in events(config.parent) if event.get("method") == "resources/subscribe"]
    assert (
        decided["decision"] == "allow" and decided["tool"] == f"resource:{notes}" and decided["rules"] == ["read-files"]
    )
    [ended] = [
        event
        for event in events(config.parent)
        if event["call_id"] == decided["call_id"] and event["kind"] == "outcome"
    ]
    assert ended["outcome"] == "ok"
