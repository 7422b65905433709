"""The stdio server the gateway runs itself: MCP's server side in both eras, with no SDK server loaded.

A real gateway process, driven over its pipes by a plain JSON-RPC client, is asked what an SDK
server is asked (the handshake and its gate, the 2026-07-28 envelope ladder, lists with their cache
hints, listen streams, malformed input) and must answer exactly as the SDK server answers. Also: an
upstream's own sampling and elicitation requests relayed to the caller's client (and recorded; over
streamable HTTP too), resource-template routing, and input and output that are files rather than pipes.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.uri_template import InvalidUriTemplate as SdkInvalid
from mcp.shared.uri_template import UriTemplate as SdkTemplate

from gateway.catalog.uri_template import UriTemplate
from gateway.errors import InvalidUriTemplate
from tests.conftest import (
    RawSession,
    ServerLog,
    calls,
    client_over,
    events,
    fixture_upstream,
    gateway_command,
    gateway_process,
    text_of,
    write_config,
)

pytestmark = pytest.mark.anyio
VERSION = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
INFO = "io.modelcontextprotocol/clientInfo"
SERVER_INFO = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION = "io.modelcontextprotocol/subscriptionId"
INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}


def envelope(**params: Any) -> dict[str, Any]:
    """2026-07-28 request parameters: `params` plus the per-request envelope."""
    meta = {VERSION: "2026-07-28", CAPABILITIES: {}, INFO: {"name": "raw", "version": "1"}}
    return {**params, "_meta": meta}


class Session(RawSession):
    """A raw session that keeps the notifications seen while waiting for an answer."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        super().__init__(proc)
        self.notifications: list[dict[str, Any]] = []

    async def ask(self, request_id: Any, method: str, params: Any = None) -> dict[str, Any]:
        message: dict[str, Any] = {"id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.answer(request_id)

    async def answer(self, request_id: Any) -> dict[str, Any]:
        with anyio.fail_after(20):
            while True:
                message = await self.receive()
                if "method" in message:
                    self.notifications.append(message)
                elif message.get("id") == request_id:
                    return message

    async def notification(self, method: str) -> dict[str, Any]:
        with anyio.fail_after(20):
            while True:
                for message in self.notifications:
                    if message["method"] == method:
                        self.notifications.remove(message)
                        return message
                message = await self.receive()
                if "method" in message:
                    self.notifications.append(message)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})


@asynccontextmanager
async def session(config: Path) -> AsyncIterator[tuple[Session, ServerLog]]:
    async with gateway_process(config) as (proc, log):
        yield Session(proc), log


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert "error" in reply, reply
    error: dict[str, Any] = reply["error"]
    return error


async def test_the_handshake_era_gate_errors_and_lists(config: Path) -> None:
    async with session(config) as (raw, _):
        assert (await raw.ask(1, "ping"))["result"] == {}  # ping needs no handshake
        assert error_of(await raw.ask(2, "tools/list")) == {
            "code": -32602,
            "message": "Invalid request parameters",
            "data": "",
        }
        assert error_of(await raw.ask(3, "foo/bar")) == {
            "code": -32601,
            "message": "Method not found",
            "data": "foo/bar",
        }
        assert error_of(await raw.ask(4, "initialize", {"capabilities": {}}))["code"] == -32602

        opened = (await raw.ask(5, "initialize", {**INIT, "protocolVersion": "1999-01-01"}))["result"]
        assert opened == {
            "protocolVersion": "2025-11-25",  # an unknown version is answered with the latest
            "capabilities": {
                "prompts": {"listChanged": True},
                "resources": {"subscribe": True, "listChanged": True},
                "tools": {"listChanged": True},
                "logging": {},
                "completions": {},
            },
            "serverInfo": {"name": "mcp-armor", "version": opened["serverInfo"]["version"]},
        }
        await raw.send({"method": "notifications/initialized"})

        tools = (await raw.ask(6, "tools/list"))["result"]
        assert "ttlMs" not in tools and "resultType" not in tools  # 2026 vocabulary is sieved out
        assert "box__echo" in {tool["name"] for tool in tools["tools"]}
        prompt = (await raw.ask(7, "prompts/get", {"name": "box__greet", "arguments": {"who": "Ann"}}))["result"]
        assert prompt["messages"][0]["content"]["text"] == "Hello, Ann!"
        assert error_of(await raw.ask(8, "prompts/get", {"name": "nope"})) == {
            "code": -32602,
            "message": "Unknown prompt: nope",
        }
        assert error_of(await raw.ask(9, "prompts/get", {}))["message"] == "Invalid request parameters"
        read = (await raw.ask(10, "resources/read", {"uri": "toolbox://readme"}))["result"]
        assert read["contents"][0]["text"] == "contents of toolbox://readme"
        for method in ("server/discover", "subscriptions/listen"):  # 2026-07-28's own
            assert error_of(await raw.ask(11, method, {"uri": "x", "level": "info"}))["code"] == -32601
        assert (await raw.ask(11, "logging/setLevel", {"level": "info"}))["result"] == {}
        assert error_of(await raw.ask(11, "resources/subscribe", {"uri": "x"}))["message"] == "Unknown resource: x"
        refused = error_of(await raw.ask(12, "tools/list", envelope()))
        assert refused["code"] == -32600 and "handshake protocol era" in refused["message"]
        assert (await raw.ask("s-1", "ping", {}))["result"] == {}  # string ids too


async def test_malformed_lines_are_answered_with_a_warning_and_serving_goes_on(config: Path) -> None:
    async with session(config) as (raw, log):
        assert raw.proc.stdin is not None
        for line in (
            b"not json",
            b"[1, 2]",
            b'{"jsonrpc": "2.0", "id": 4}',
            b'{"jsonrpc": "1.0", "id": 5, "method": "ping"}',
        ):
            await raw.proc.stdin.send(line + b"\n")
        await raw.send({"id": None, "method": "ping"})
        await raw.send({"id": True, "method": "ping"})
        await raw.send({"id": 6, "method": "tools/list", "params": "x"})
        answered = [await raw.receive() for _ in range(7)]
        assert [(reply["id"], reply["error"]["code"]) for reply in answered] == [
            (None, -32700),
            (None, -32600),
            (None, -32600),  # a response's id names a request of the gateway's: not answered to
            (5, -32600),
            (None, -32600),
            (None, -32600),
            (6, -32600),
        ]
        assert (await raw.ask(7, "ping"))["result"] == {}
        await log.wait_for(r"a line that is not JSON; answered with error")
        await log.wait_for(r"a JSON value that is not a message object")
        await log.wait_for(r"a response without a valid id")
        await log.wait_for(r'without "jsonrpc": "2.0"')
        await log.wait_for(r"a request whose id is not a string or an integer")
        await log.wait_for(r"a message whose params are not an object")


async def test_the_2026_era_envelope_ladder_and_results(config: Path) -> None:
    async with session(config) as (raw, _):
        discovered = (await raw.ask(1, "server/discover", envelope()))["result"]
        assert discovered["supportedVersions"] == ["2026-07-28"]
        assert discovered["capabilities"]["resources"] == {"subscribe": True, "listChanged": True}
        assert (discovered["ttlMs"], discovered["cacheScope"], discovered["resultType"]) == (0, "private", "complete")
        assert discovered["_meta"][SERVER_INFO]["name"] == "mcp-armor"

        missing = error_of(await raw.ask(2, "tools/list"))
        assert missing["code"] == -32602 and "params._meta must be an object" in missing["message"]
        half = error_of(await raw.ask(3, "tools/list", {"_meta": {VERSION: "2026-07-28"}}))
        assert half["message"] == f"params._meta is missing the required envelope key(s): {CAPABILITIES}"
        old = error_of(await raw.ask(4, "tools/list", {"_meta": {VERSION: "2025-06-18", CAPABILITIES: {}}}))
        assert old == {
            "code": -32022,
            "message": "Unsupported protocol version",
            "data": {"supported": ["2026-07-28"], "requested": "2025-06-18"},
        }
        handshake = error_of(await raw.ask(5, "initialize", INIT))
        assert handshake["code"] == -32022 and handshake["data"]["requested"] == "2025-06-18"
        assert error_of(await raw.ask(6, "ping", envelope()))["code"] == -32601  # no ping in 2026

        tools = (await raw.ask(7, "tools/list", envelope()))["result"]
        assert (tools["ttlMs"], tools["cacheScope"], tools["resultType"]) == (0, "private", "complete")
        called = (await raw.ask(8, "tools/call", envelope(name="box__echo", arguments={"text": "hi"})))["result"]
        assert called["content"] == [{"type": "text", "text": "hi"}] and called["resultType"] == "complete"
        assert called["_meta"][SERVER_INFO]["name"] == "mcp-armor"
        prompt = (await raw.ask(9, "prompts/get", envelope(name="box__greet", arguments={"who": "Bo"})))["result"]
        assert "ttlMs" not in prompt and prompt["resultType"] == "complete"  # prompts/get is not cacheable
        unknown = error_of(await raw.ask(10, "tools/call", envelope(name="nope")))
        assert unknown == {"code": -32602, "message": "Unknown tool: nope"}


async def test_listen_streams_carry_list_changes_until_cancelled(config: Path) -> None:
    async with session(config) as (raw, _):
        asked = {"toolsListChanged": True, "promptsListChanged": False, "resourceSubscriptions": ["toolbox://readme"]}
        await raw.send({"id": 1, "method": "subscriptions/listen", "params": envelope(notifications=asked)})
        acknowledged = await raw.notification("notifications/subscriptions/acknowledged")
        assert acknowledged["params"] == {  # resource subscriptions are not honoured on listen streams
            "notifications": {"toolsListChanged": True},
            "_meta": {SUBSCRIPTION: 1},
        }
        await raw.ask(2, "tools/call", envelope(name="box__grow"))  # the upstream adds a tool and says so
        changed = await raw.notification("notifications/tools/list_changed")
        assert changed["params"] == {"_meta": {SUBSCRIPTION: 1}}
        tools = (await raw.ask(3, "tools/list", envelope()))["result"]["tools"]
        assert "box__grown" in {tool["name"] for tool in tools}

        await raw.send({"method": "notifications/cancelled", "params": {"requestId": 1}})
        assert (await raw.ask(4, "tools/list", envelope()))["id"] == 4
        invalid = error_of(await raw.ask(5, "subscriptions/listen", envelope()))
        assert invalid["message"] == "Invalid request parameters"
    # The cancelled stream was never answered: every reply seen had an id asked for after it.


async def test_handshake_era_clients_are_told_of_list_changes(config: Path) -> None:
    async with session(config) as (raw, _):
        await raw.initialize()
        await raw.ask(1, "tools/call", {"name": "box__grow"})
        changed = await raw.notification("notifications/tools/list_changed")
        assert "params" not in changed


async def test_stdio_serving_never_loads_the_sdk(config: Path) -> None:
    """Every import the serving process makes is listed by `-X importtime`: none is the `mcp` package."""
    command = gateway_command(config)
    command[1:1] = ["-X", "importtime"]
    async with await anyio.open_process(command, stderr=subprocess.PIPE) as proc:
        raw = Session(proc)
        await raw.initialize()
        assert "box__echo" in json.dumps(await raw.ask(1, "tools/list"))
        called = await raw.ask(2, "tools/call", raw.call(2, "box__echo", {"text": "x"})["params"])
        assert called["result"]["content"][0]["text"] == "x"
        assert proc.stdin is not None and proc.stderr is not None
        await proc.stdin.aclose()
        with anyio.fail_after(20):
            stderr = b"".join([chunk async for chunk in proc.stderr]).decode()
            await proc.wait()
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "mcp_types" in imported and "gateway.downstream.stdio" in imported
    assert not {name for name in imported if name == "mcp" or name.startswith("mcp.")}


def test_input_and_output_that_are_files_are_relayed(config: Path, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "box__echo", "arguments": {"text": "f"}},
        },
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    with requests.open("rb") as stdin, answers.open("wb") as stdout:
        subprocess.run(gateway_command(config), stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL, timeout=60)
    replies = {reply["id"]: reply for reply in map(json.loads, answers.read_text().splitlines())}
    assert replies[0]["result"]["serverInfo"]["name"] == "mcp-armor"
    # Input ended right after the call: the call is cancelled at shutdown and never answered, or it won the race.
    assert set(replies) <= {0, 1}
    if 1 in replies:
        assert replies[1]["result"]["content"][0]["text"] == "f"


def _piped_session(era: str) -> list[dict[str, Any]]:
    """A whole session as a client would have written it, in one era: lists, then several calls."""
    requests: list[tuple[str, dict[str, Any]]] = [
        ("tools/list", {}),
        ("tools/call", {"name": "box__echo", "arguments": {"text": "piped"}}),
        ("tools/call", {"name": "box__slow", "arguments": {"steps": 4}, "_meta": {"progressToken": "p"}}),
        ("tools/call", {"name": "box__add", "arguments": {"a": 2, "b": 3}}),
    ]
    lines: list[dict[str, Any]] = []
    if era == "handshake":
        lines += [
            {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
        ]
    for number, (method, params) in enumerate(requests, start=1):
        if era == "2026-07-28":
            params = {**params, "_meta": {**params.get("_meta", {}), **envelope()["_meta"]}}
        lines.append({"jsonrpc": "2.0", "id": number, "method": method, "params": params})
    return lines


async def _pipe_whole_session(
    config: Path, lines: list[dict[str, Any]], *, last_newline: bool = True
) -> dict[Any, dict[str, Any]]:
    """Run `mcp-armor serve`, write `lines` (the last one without its newline unless `last_newline`) and
    close its input at once; its answers, by id, once it exited."""
    async with await anyio.open_process(gateway_command(config), stderr=subprocess.DEVNULL) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        with anyio.fail_after(60):
            text = "\n".join(json.dumps(line) for line in lines) + ("\n" if last_newline else "")
            await proc.stdin.send(text.encode())
            await proc.stdin.aclose()
            output = b"".join([chunk async for chunk in proc.stdout])
            assert await proc.wait() == 0
    messages = [json.loads(line) for line in output.decode().splitlines()]
    return {message["id"]: message for message in messages if "id" in message}


@pytest.mark.parametrize("era", ["handshake", "2026-07-28"])
async def test_a_whole_session_piped_in_is_answered_before_the_gateway_exits(config: Path, era: str) -> None:
    """`cat session.jsonl | mcp-armor serve`: the input ends right after the last request, and every
    request read is still answered, each call recorded as decided and completed, then the session ended."""
    lines = _piped_session(era)
    replies = await _pipe_whole_session(config, lines)
    assert set(replies) == {line["id"] for line in lines if "id" in line}
    assert "box__echo" in {tool["name"] for tool in replies[1]["result"]["tools"]}
    assert replies[2]["result"]["content"] == [{"type": "text", "text": "piped"}]
    assert replies[3]["result"]["content"] == [{"type": "text", "text": "slept 4 steps"}]
    assert replies[4]["result"]["structuredContent"] == {"sum": 5}
    seen = calls(config.parent)
    assert sorted(seen) == ["box__add", "box__echo", "box__slow"]
    assert {(call["decision"]["decision"], call["outcome"]["outcome"]) for call in seen.values()} == {("allow", "ok")}
    assert _session_end_after_every_outcome(config.parent)["reason"] == "the client disconnected"


async def test_calls_still_running_when_the_piped_input_ends_are_cancelled_after_call_timeout(tmp_path: Path) -> None:
    """What the gateway still has running `call_timeout` after the input ended is cancelled (and
    recorded so), never answered; what finished in time was answered."""
    box = {**fixture_upstream("toolbox.py"), "timeout": "2m"}  # the upstream would wait; the gateway does not
    config = write_config(tmp_path, {"box": box}, call_timeout="1s")
    lines = _piped_session("handshake")
    lines[4]["params"]["arguments"]["steps"] = 2000  # box__slow: 100 seconds
    replies = await _pipe_whole_session(config, lines)
    assert set(replies) == {0, 1, 2, 4}
    seen = calls(tmp_path)
    assert seen["box__slow"]["decision"]["decision"] == "allow"
    assert seen["box__slow"]["outcome"]["outcome"] == "cancelled"
    assert seen["box__echo"]["outcome"]["outcome"] == seen["box__add"]["outcome"]["outcome"] == "ok"
    assert _session_end_after_every_outcome(tmp_path)["reason"] == "the client disconnected"


async def test_an_approval_cannot_be_asked_once_the_piped_input_ended(tmp_path: Path) -> None:
    """The client declared elicitation, but its input has ended: nobody can answer, so the call is refused."""
    policy = '[defaults]\neffect = "allow"\n\n[[rule]]\nid = "asked"\ntools = ["box__write_note"]\neffect = "ask"\n'
    box = {"box": fixture_upstream("toolbox.py")}
    config = write_config(tmp_path, box, policy=policy, approvals={"via": ["client"]})
    lines = [
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {**INIT, "capabilities": {"elicitation": {}}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "box__write_note", "arguments": {"path": "notes/a", "body": "x"}},
        },
    ]
    replies = await _pipe_whole_session(config, lines)
    refused = replies[1]["result"]
    assert refused["isError"] and "the client could not ask a person" in refused["content"][0]["text"]
    assert calls(tmp_path)["box__write_note"]["outcome"]["outcome"] == "refused"


async def test_listen_streams_end_unanswered_once_the_piped_input_ended(tmp_path: Path) -> None:
    """A listen stream never ends by itself: once the input ended it is closed at once (never answered),
    and the gateway exits as soon as the rest is answered, not `call_timeout` later."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, call_timeout="10m")
    listen, echo = envelope(notifications={"toolsListChanged": True}), {"text": "after listen"}
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": listen},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": envelope(name="box__echo", arguments=echo)},
    ]
    replies = await _pipe_whole_session(config, lines)
    assert set(replies) == {2} and replies[2]["result"]["content"][0]["text"] == "after listen"


async def test_a_request_reusing_the_id_of_one_in_flight_is_refused_and_the_gateway_still_exits(tmp_path: Path) -> None:
    """A client that reuses the id of a request still in flight gets an Invalid Request error for the second
    (its answer could not be told from the first's); the first, a listen stream, is cancelled like the rest
    once the input ends, so the gateway exits."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, call_timeout="10m")
    listen, echo = envelope(notifications={"toolsListChanged": True}), {"text": "after listens"}
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": listen},
        {"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen", "params": listen},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": envelope(name="box__echo", arguments=echo)},
    ]
    replies = await _pipe_whole_session(config, lines)
    assert set(replies) == {1, 2} and replies[2]["result"]["content"][0]["text"] == "after listens"
    assert replies[1]["error"]["code"] == -32600 and "still in flight" in replies[1]["error"]["message"]


async def test_a_last_request_without_its_newline_is_answered(config: Path) -> None:
    """A file that does not end in a newline (`printf`, an editor's): its last request is read at the end
    of the input and answered, as the SDK's stdio server reads it."""
    lines = _piped_session("handshake")
    replies = await _pipe_whole_session(config, lines, last_newline=False)
    assert replies[4]["result"]["structuredContent"] == {"sum": 5}
    assert "box__add" in calls(config.parent)


def _session_end_after_every_outcome(config_dir: Path) -> dict[str, Any]:
    """The one `session_end` in the log, asserted to come after every call's outcome."""
    logged = events(config_dir)
    kinds = [event["kind"] for event in logged]
    assert kinds.count("session_end") == 1
    assert kinds.index("session_end") > max(index for index, kind in enumerate(kinds) if kind == "outcome")
    return logged[kinds.index("session_end")]


TEMPLATES = [
    "toolbox://notes/{name}",
    "file:///{+path}",
    "logs://{service}{?since,level}",
    "/files{/path*}",
    "x://{a}/{b}.txt",
    "api://v1{;id}",
    "str://{a,b}",
    "x://{.ext}",
]
URIS = [
    "toolbox://notes/a",
    "toolbox://notes/a/b",
    "toolbox://notes/",
    "file:///etc/passwd",
    "logs://api",
    "logs://api?level=e&since=5m",
    "logs://a/b",
    "/files/a/b/c",
    "/files",
    "x://1/2.txt",
    "x://1/2/3.txt",
    "api://v1;id=3",
    "str://x,y",
    "x://.tar",
]


def test_uri_templates_route_as_the_sdk_matches() -> None:
    for template in TEMPLATES:
        ours, theirs = UriTemplate.parse(template), SdkTemplate.parse(template)
        for uri in URIS:
            assert ours.match(uri) == (theirs.match(uri) is not None), (template, uri)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("x://{}", "empty expression at position 4"),
        ("x://{a", "unclosed expression at position 4"),
        ("x://a}", "'}' without '{' at position 5"),
        ("x://{1 bad}", "invalid variable name '1 bad'"),
        ("x://{=a}", "reserved operator '='"),
        ("x://{a}/{a}", "variable 'a' appears more than once"),
        ("x://{a:0}", "invalid prefix length '0'"),
    ],
)
def test_malformed_uri_templates_are_refused_saying_where(template: str, problem: str) -> None:
    with pytest.raises(InvalidUriTemplate, match=problem.replace("{", r"\{").replace("}", r"\}")):
        UriTemplate.parse(template)
    if problem.startswith(("empty", "unclosed", "invalid variable", "variable")):
        with pytest.raises(SdkInvalid):
            SdkTemplate.parse(template)


@pytest.fixture
def asker_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"asker": fixture_upstream("asker.py")})


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_an_upstreams_sampling_and_elicitation_reach_the_callers_client(
    asker_config: Path, transport: str
) -> None:
    seen: list[str] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        seen.append(params.messages[0].content.text)  # type: ignore[union-attr]
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="4"), model="m")

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        seen.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with client_over(transport, asker_config, sampling_callback=sample, elicitation_callback=elicit) as client:
        sampled = json.loads(text_of(await client.call_tool("asker__sample", {})))
        confirmed = json.loads(text_of(await client.call_tool("asker__confirm", {})))
    # The person sees which upstream asks: an upstream's form cannot pass for the gateway's approval prompt.
    assert seen == ["2+2?", "[asked by the upstream server 'asker', not by mcp-armor] Go ahead?"]
    assert sampled["content"] == {"type": "text", "text": "4"} and sampled["model"] == "m"
    assert confirmed == {"action": "accept", "content": {"ok": True}}
    relayed = [event for event in events(asker_config.parent) if event["kind"] == "upstream_request"]
    outcomes = {event["call_id"]: event for event in events(asker_config.parent) if event["kind"] == "outcome"}
    assert [(event["reason"], event["outcome"]) for event in relayed] == [
        ("sampling/createMessage", "relayed"),
        ("elicitation/create", "relayed"),
    ]
    assert [outcomes[event["call_id"]]["tool"] for event in relayed] == ["asker__sample", "asker__confirm"]


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_request_the_upstream_withdraws_is_withdrawn_from_the_client_and_never_answered(
    tmp_path: Path, transport: str
) -> None:
    """Cancellation the other way: the upstream cancels its own sampling request while the client is
    working on it; the client is told (its callback is cancelled), the upstream gets no answer for it,
    the call goes on, and the log says the request was cancelled."""
    gate, answers = tmp_path / "gate", tmp_path / "answers.jsonl"
    os.mkfifo(gate)
    config = write_config(
        tmp_path, {"asker": fixture_upstream("asker.py", ASKER_GATE=str(gate), ASKER_LOG=str(answers))}
    )
    withdrawn = anyio.Event()

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        await anyio.to_thread.run_sync(gate.write_bytes, b"x")  # the upstream may now withdraw it
        try:
            await anyio.sleep_forever()
        finally:
            withdrawn.set()
        raise AssertionError("not reached")

    async with client_over(transport, config, sampling_callback=sample) as client:
        with anyio.fail_after(30):
            assert text_of(await client.call_tool("asker__withdraw", {})) == "withdrew up-1"
            await withdrawn.wait()
            assert text_of(await client.call_tool("asker__confirm", {})) != ""  # the connection still serves
    relayed = [event for event in events(tmp_path) if event["kind"] == "upstream_request"]
    assert (relayed[0]["outcome"], relayed[0]["tool"]) == ("cancelled", "asker__withdraw")
    logged = [json.loads(line) for line in answers.read_text().splitlines()] if answers.exists() else []
    assert [answer["id"] for answer in logged if answer["id"] == "up-1"] == []


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_client_that_cannot_take_a_request_has_it_refused_and_recorded(
    asker_config: Path, transport: str
) -> None:
    async with client_over(transport, asker_config) as client:  # declares neither sampling nor elicitation
        answered = json.loads(text_of(await client.call_tool("asker__sample", {})))
    assert answered == {"code": -32600, "message": "the agent's client does not take sampling/createMessage"}
    relayed = [event for event in events(asker_config.parent) if event["kind"] == "upstream_request"]
    assert [(event["outcome"], event["tool"]) for event in relayed] == [("refused", "asker__sample")]
    assert "does not take sampling/createMessage" in relayed[0]["reason"]


async def test_a_client_answering_with_an_id_of_another_type_is_not_taken_as_the_answer(tmp_path: Path) -> None:
    """The gateway asks for approval as request "mcp-armor-1": an answer naming 1 (a number, not that
    string) is another id, logged and dropped; the answer naming the string itself decides."""
    policy = '[defaults]\neffect = "allow"\n\n[[rule]]\nid = "asked"\ntools = ["box__write_note"]\neffect = "ask"\n'
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=policy)
    async with gateway_process(config) as (proc, log):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.send({"id": 0, "method": "initialize", "params": {**INIT, "capabilities": {"elicitation": {}}}})
            while (await raw.receive()).get("id") != 0:
                pass
            await raw.send({"method": "notifications/initialized"})
            await raw.send(
                {
                    "id": 7,
                    "method": "tools/call",
                    "params": {"name": "box__write_note", "arguments": {"path": "notes/a", "body": "x"}},
                }
            )
            while (asked := await raw.receive()).get("method") != "elicitation/create":
                pass
            assert asked["id"] == "mcp-armor-1"
            await raw.send({"id": 1, "result": {"action": "accept", "content": {"approve": True}}})
            await log.wait_for(r"the client answered with id 1, which names no request sent to it")
            await raw.send({"id": asked["id"], "result": {"action": "decline"}})
            while (reply := await raw.receive()).get("id") != 7:
                pass
    assert reply["result"]["isError"]
    assert calls(tmp_path)["box__write_note"]["outcome"]["outcome"] == "refused"


UNSERVED = {"vendor/anything": {"path": "/etc/passwd"}}
UNSERVED_IN_2026 = {"logging/setLevel": {"level": "info"}, "resources/subscribe": {"uri": "toolbox://readme"}}
"""Served on handshake-era connections; the 2026-07-28 specification does not define them."""


def refusals_of(config_dir: Path) -> dict[str, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Per method refused as unserved: the decision and outcome events of each refusal."""
    per_call: dict[str, list[dict[str, Any]]] = {}
    for event in events(config_dir):
        if event.get("method") is not None:
            per_call.setdefault(event["call_id"], []).append(event)
    found: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for pair in per_call.values():
        assert [event["kind"] for event in pair] == ["decision", "outcome"], pair
        found.setdefault(pair[0]["method"], []).append((pair[0], pair[1]))
    return found


async def test_a_method_the_gateway_does_not_serve_is_refused_and_recorded_in_both_eras(config: Path) -> None:
    async with session(config) as (raw, _):
        before = error_of(await raw.ask(1, "vendor/early", {}))  # before the handshake too
        assert before == {"code": -32601, "message": "Method not found", "data": "vendor/early"}
        await raw.initialize()
        for number, (method, params) in enumerate(UNSERVED.items(), start=2):
            assert error_of(await raw.ask(number, method, params)) == {
                "code": -32601,
                "message": "Method not found",
                "data": method,
            }
        echoed = (await raw.ask(9, "tools/call", {"name": "box__echo", "arguments": {"text": "still here"}}))["result"]
        assert echoed["content"][0]["text"] == "still here"
    async with session(config) as (raw, _):
        for number, (method, params) in enumerate({**UNSERVED, **UNSERVED_IN_2026}.items(), start=1):
            modern = error_of(await raw.ask(number, method, envelope(**params)))
            assert modern["code"] == -32601 and modern["data"] == method
    refused = refusals_of(config.parent)
    assert {method: len(pairs) for method, pairs in refused.items()} == {
        "vendor/early": 1,
        "logging/setLevel": 1,
        "resources/subscribe": 1,
        "vendor/anything": 2,
    }
    for method, pairs in refused.items():
        for decision, outcome in pairs:
            assert decision["decision"] == "deny" and decision["tool"] is None and decision["rules"] == []
            assert decision["stage"] == "unknown-method" and method in decision["reason"]
            assert outcome["outcome"] == "refused"
    assert refused["vendor/anything"][0][0]["arguments"] == {"path": "/etc/passwd"}
    assert refused["vendor/anything"][1][0]["arguments"] == UNSERVED["vendor/anything"]  # no envelope
    # A connection refused before its handshake is a session started (by nobody named yet) and ended.
    early = refused["vendor/early"][0][0]["session_id"]
    kinds = [event["kind"] for event in events(config.parent) if event["session_id"] == early]
    assert kinds[0] == "session_start" and kinds[-1] == "session_end"


ASKER_POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "no-sampling-for-asker"
sampling = ["asker"]
effect = "deny"
reason = "this server may not use the agent's model"

[[rule]]
id = "plain-questions-only"
elicitation = ["*"]
effect = "deny"
reason = "no upstream asks the person for secrets"
when = { properties = { message = { pattern = "(?i)password|token" } } }
"""


async def test_policy_decides_an_upstreams_sampling_and_elicitation(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"asker": fixture_upstream("asker.py")}, policy=ASKER_POLICY)
    reached: list[str] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        reached.append("sampling")
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="4"), model="m")

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        reached.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with client_over("stdio", config, sampling_callback=sample, elicitation_callback=elicit) as client:
        sampled = text_of(await client.call_tool("asker__sample", {}))
        confirmed = json.loads(text_of(await client.call_tool("asker__confirm", {})))
    assert reached == ["[asked by the upstream server 'asker', not by mcp-armor] Go ahead?"]  # no sampling
    assert "this server may not use the agent's model" in sampled
    assert confirmed["action"] == "accept"
    relayed = [event for event in events(tmp_path) if event["kind"] == "upstream_request"]
    assert [event["outcome"] for event in relayed] == ["refused", "relayed"]
    assert "denied by rule 'no-sampling-for-asker'" in relayed[0]["reason"]
