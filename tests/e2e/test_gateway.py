"""End to end over stdio: a real SDK client drives the real gateway process in front of real upstream processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import (
    Notifications,
    call_then_cancel,
    fixture_upstream,
    gateway_client,
    read_records,
    text_of,
    write_config,
)

pytestmark = pytest.mark.anyio

ERAS = [pytest.param("legacy", id="handshake-era"), pytest.param("auto", id="2026-era")]


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def box_config(tmp_path: Path, record: Path) -> Path:
    return write_config(
        tmp_path,
        {
            "box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record)),
            "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"]},
        },
    )


@pytest.mark.parametrize("mode", ERAS)
async def test_aggregates_fixture_and_pypi_upstreams(box_config: Path, mode: str) -> None:
    async with gateway_client(box_config, mode=mode) as client:
        expected_era = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == expected_era
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"box__echo", "box__add", "time__get_current_time", "time__convert_time"} <= names

        added = await client.call_tool("box__add", {"a": 2, "b": 3})
        assert not added.is_error
        assert added.structured_content == {"sum": 5}

        now = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not now.is_error
        assert '"timezone": "UTC"' in text_of(now)

        prompts = await client.list_prompts()
        assert [prompt.name for prompt in prompts.prompts] == ["box__greet"]
        greeting = await client.get_prompt("box__greet", {"who": "Ada"})
        assert greeting.messages[0].content == types.TextContent(type="text", text="Hello, Ada!")

        resources = await client.list_resources()
        assert [resource.uri for resource in resources.resources] == ["toolbox://readme"]
        templates = await client.list_resource_templates()
        assert [template.uri_template for template in templates.resource_templates] == ["toolbox://notes/{name}"]
        note = await client.read_resource("toolbox://notes/today")
        assert note.contents[0].text == "contents of toolbox://notes/today"  # type: ignore[union-attr]


ARGUMENT_CASES = [
    ("box__add", {"a": 1, "b": "two"}, "at 'b': \"two\" is not of type 'integer'"),
    ("box__add", {"a": 1}, "'b' is a required property"),
    ("box__add", {"a": 1, "b": 2, "c": 3}, "Additional properties are not allowed ('c' was unexpected)"),
    ("box__write_note", {"path": "/etc/passwd", "body": "x"}, "at 'path': \"/etc/passwd\" does not match '^notes/'"),
    ("box__write_note", {"path": "notes/a", "body": "x", "when": "someday"}, "at 'when': \"someday\" is not a 'date'"),
    (
        "box__write_note",
        {"path": "notes/a", "body": "x", "options": {"mode": "wipe"}},
        'at \'options/mode\': "wipe" is not one of ["append", "replace"]',
    ),
]


@pytest.mark.parametrize("mode", ERAS)
async def test_arguments_violating_the_upstream_schema_never_reach_it(
    box_config: Path, record: Path, mode: str
) -> None:
    async with gateway_client(box_config, mode=mode) as client:
        for tool, arguments, message in ARGUMENT_CASES:
            result = await client.call_tool(tool, arguments)
            assert result.is_error, (tool, arguments)
            refusal = text_of(result)
            assert refusal.startswith(
                "Refused by the mcp-armor gateway: arguments do not match the tool's input schema"
            )
            assert message in refusal
            assert "(call " in refusal
        accepted = await client.call_tool("box__write_note", {"path": "notes/a", "body": "hello"})
        assert text_of(accepted) == "stored notes/a"
    assert read_records(record) == [{"tool": "write_note", "arguments": {"path": "notes/a", "body": "hello"}}]


@pytest.mark.parametrize("mode", ERAS)
async def test_unknown_tool_is_a_jsonrpc_invalid_params_error(box_config: Path, mode: str) -> None:
    async with gateway_client(box_config, mode=mode) as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("box__nope", {})
        assert caught.value.error.code == types.INVALID_PARAMS
        assert "Unknown tool: box__nope" in caught.value.error.message
        assert not (await client.call_tool("box__echo", {"text": "still serving"})).is_error


@pytest.mark.parametrize("mode", ERAS)
async def test_progress_is_relayed(box_config: Path, mode: str) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    async with gateway_client(box_config, mode=mode) as client:
        result = await client.call_tool("box__slow", {"steps": 3}, progress_callback=on_progress)
    assert text_of(result) == "slept 3 steps"
    assert sorted(updates) == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]


async def test_upstream_error_comes_back_as_an_error_result_without_internals(box_config: Path) -> None:
    async with gateway_client(box_config) as client:
        result = await client.call_tool("box__fail", {})
    assert result.is_error
    message = text_of(result)
    assert "upstream 'box' answered tools/call with error" in message
    assert "the fail tool failed on purpose" in message
    assert "Traceback" not in message


async def test_cancellation_reaches_the_upstream(box_config: Path) -> None:
    async with gateway_client(box_config) as client:
        await call_then_cancel(client, "box__slow", {"steps": 400})
        # The upstream tool itself observed the cancellation.
        assert text_of(await client.call_tool("box__cancelled", {})) == "1"


async def test_upstream_killed_mid_call_fails_the_call_and_comes_back(box_config: Path) -> None:
    notifications = Notifications()
    async with gateway_client(box_config, notifications=notifications) as client:
        first_pid = int(text_of(await client.call_tool("box__pid", {})))
        started = anyio.Event()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            started.set()

        outcome: list[types.CallToolResult] = []

        async def long_call() -> None:
            outcome.append(await client.call_tool("box__slow", {"steps": 400}, progress_callback=on_progress))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(long_call)
                await started.wait()
                os.kill(first_pid, signal.SIGKILL)
        # The in-flight call ended promptly, as an error result that says what happened.
        assert outcome[0].is_error
        assert "upstream 'box' closed the connection" in text_of(outcome[0])

        # The other upstream keeps serving while 'box' is down.
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error

        # 'box' leaves the catalogue, is restarted, and comes back; each change is announced.
        await notifications.wait_for(types.ToolListChangedNotification)
        with anyio.fail_after(20):
            while "box__pid" not in {tool.name for tool in (await client.list_tools()).tools}:
                await notifications.wait_for(types.ToolListChangedNotification)
        second_pid = int(text_of(await client.call_tool("box__pid", {})))
        assert second_pid != first_pid


async def test_crashing_tool_does_not_take_the_gateway_down(box_config: Path) -> None:
    async with gateway_client(box_config) as client:
        crashed = await client.call_tool("box__crash", {})
        assert crashed.is_error
        assert "upstream 'box'" in text_of(crashed)
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error


async def test_list_changed_is_forwarded_on_handshake_connections(box_config: Path) -> None:
    notifications = Notifications()
    async with gateway_client(box_config, notifications=notifications) as client:
        assert "box__grown" not in {tool.name for tool in (await client.list_tools()).tools}
        await client.call_tool("box__grow", {})
        # Upstreams coming up at start are announced too; wait until the announcement that brings 'grown'.
        with anyio.fail_after(20):
            while True:
                await notifications.wait_for(types.ToolListChangedNotification)
                if "box__grown" in {tool.name for tool in (await client.list_tools()).tools}:
                    break
        assert text_of(await client.call_tool("box__grown", {})) == "I am new"


async def test_list_changed_is_forwarded_on_2026_listen_streams(box_config: Path) -> None:
    async with gateway_client(box_config, mode="auto") as client:
        assert client.protocol_version == "2026-07-28"
        assert "box__grown" not in {tool.name for tool in (await client.list_tools()).tools}
        async with client.listen(tools_list_changed=True) as subscription:
            await client.call_tool("box__grow", {})
            with anyio.fail_after(20):
                event = await anext(aiter(subscription))
        assert type(event).__name__ == "ToolsListChanged"
        assert "box__grown" in {tool.name for tool in (await client.list_tools()).tools}


async def test_an_upstream_that_cannot_start_does_not_stop_the_others(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"broken": {"command": "mcp-armor-no-such-server"}, "box": fixture_upstream("toolbox.py")},
        startup_timeout="5s",
    )
    async with gateway_client(config) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "box__echo" in names
        assert not any(name.startswith("broken__") for name in names)
        assert text_of(await client.call_tool("box__echo", {"text": "hi"})) == "hi"
    log = tmp_path / ".mcp-armor" / "logs"
    assert (log / "box.log").exists()


async def test_sloppy_upstream_cannot_break_the_listing(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"sloppy": fixture_upstream("sloppy.py"), "box": fixture_upstream("toolbox.py")})
    async with gateway_client(config) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert {"sloppy__loose", "sloppy__empty_schema", "sloppy__bad_output", "sloppy__bad_result"} <= set(tools)
        assert "box__echo" in tools
        assert not any(name in tools for name in ("sloppy__not_object", "sloppy__bad_schema"))
        assert tools["sloppy__loose"].input_schema == {"type": "object"}
        assert tools["sloppy__bad_output"].output_schema is None
        shortened = [name for name in tools if name.startswith("sloppy__has_space")]
        assert len(shortened) == 1
        assert text_of(await client.call_tool(shortened[0], {})) == "has space/and slash ok"
        long_names = [name for name in tools if name.startswith("sloppy__a_rather_long")]
        assert len(long_names) == 1 and len(long_names[0]) == 64

        malformed = await client.call_tool("sloppy__bad_result", {})
        assert malformed.is_error
        assert "upstream 'sloppy' returned a malformed result (content:" in text_of(malformed)


async def test_malformed_jsonrpc_on_stdio_leaves_the_gateway_serving(box_config: Path) -> None:
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(box_config)]
    async with await anyio.open_process(command, stderr=None) as process:
        assert process.stdin is not None and process.stdout is not None
        await process.stdin.send(b"this is not json\n")
        await process.stdin.send(b'{"jsonrpc": "2.0", "id": 7, "method": 12}\n')
        initialize = (
            b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
            b'"capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}\n'
        )
        await process.stdin.send(initialize)
        received = b""
        with anyio.fail_after(20):
            while b'"id":1' not in received:
                received += await process.stdout.receive()
        assert b'"serverInfo":{"name":"mcp-armor"' in received
        await process.stdin.aclose()
        with anyio.fail_after(20):
            await process.wait()
