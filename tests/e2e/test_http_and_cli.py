"""Streamable HTTP downstream (token, Host/Origin checks, both eras), npm upstreams, and the CLI's error lines."""

from __future__ import annotations

import json
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.config.test_models import CASES as CONFIG_CASES
from tests.conftest import (
    REPO,
    events,
    fixture_upstream,
    gateway_client,
    gateway_process,
    http_gateway,
    node_server,
    run_cli,
    text_of,
    write_config,
)

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def http_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, http={"token": TOKEN})


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_http_serves_both_eras_with_the_token(http_config: Path, mode: str) -> None:
    async with http_gateway(http_config) as url:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
            Client(streamable_http_client(url, http_client=http), mode=mode) as client,
        ):
            assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
            assert "box__echo" in {tool.name for tool in (await client.list_tools()).tools}
            assert text_of(await client.call_tool("box__echo", {"text": "over http"})) == "over http"
            refused = await client.call_tool("box__add", {"a": "1", "b": 2})
            assert refused.is_error and "at 'a'" in text_of(refused)


@pytest.mark.anyio
async def test_http_refuses_missing_or_wrong_token_and_foreign_host_or_origin(http_config: Path) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    async with http_gateway(http_config) as url, httpx2.AsyncClient(timeout=10) as http:
        missing = await http.post(url, json=body, headers=headers)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await http.post(url, json=body, headers={**headers, "Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401
        authorised = {**headers, "Authorization": f"Bearer {TOKEN}"}
        foreign_host = await http.post(url, json=body, headers={**authorised, "Host": "evil.example:80"})
        assert foreign_host.status_code == 421
        foreign_origin = await http.post(url, json=body, headers={**authorised, "Origin": "http://evil.example"})
        assert foreign_origin.status_code == 403


_JSON_OR_SSE = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


class RawHttpSession:
    """A handshake-era session over plain HTTP requests, as a health check holds one: no GET stream."""

    def __init__(self, http: httpx2.AsyncClient, url: str) -> None:
        self.http = http
        self.url = url
        self.id = ""

    async def open(self) -> str:
        """Initialize, and list the tools (the gateway records a session once it lists or calls)."""
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
        opened = await self.http.post(
            self.url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}, headers=_JSON_OR_SSE
        )
        assert opened.status_code == 200, opened.text
        self.id = opened.headers["mcp-session-id"]
        initialized = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert initialized.status_code == 202
        assert "box__echo" in json.dumps(await self.ask(1, "tools/list"))
        return self.id

    def headers(self) -> dict[str, str]:
        return {**_JSON_OR_SSE, "mcp-session-id": self.id, "mcp-protocol-version": "2025-11-25"}

    async def post(self, message: dict[str, Any]) -> httpx2.Response:
        return await self.http.post(self.url, json=message, headers=self.headers())

    async def ask(self, request_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result of one request (its answer comes as a server-sent event)."""
        answer = await self.reply(request_id, method, params)
        result: dict[str, Any] = answer["result"]
        return result

    async def reply(self, request_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole answer to one request: its result or its error."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        return answer_of(await self.post(message), request_id)


def answer_of(response: httpx2.Response, request_id: int) -> dict[str, Any]:
    """The JSON-RPC answer to `request_id` in an HTTP response, sent as JSON or as a server-sent event."""
    assert response.status_code in (200, 400, 404), response.text
    if response.headers["content-type"].startswith("application/json"):
        answer: dict[str, Any] = response.json()
        return answer
    for line in response.text.splitlines():
        if line.startswith("data:") and (answer := json.loads(line[5:])).get("id") == request_id:
            return answer
    raise AssertionError(f"no answer to request {request_id} in {response.text!r}")


async def _serving_url(log: Any) -> str:
    match = await log.wait_for(r"serving streamable HTTP at (http://\S+/mcp)", seconds=30)
    return str(match[1])


def _session_ends(config_dir: Path) -> dict[str, str]:
    return {event["session_id"]: event["reason"] for event in events(config_dir) if event["kind"] == "session_end"}


async def _session_end(config_dir: Path, session_id: str) -> str:
    """The reason recorded for the session's end, polling the log (another process writes it) until there is one."""
    with anyio.fail_after(30):
        while True:
            if (reason := _session_ends(config_dir).get(session_id)) is not None:
                return reason
            await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_http_sessions_open_when_the_gateway_is_stopped_are_recorded_as_ended(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """Both open sessions get their `session_end`, the one holding a GET stream open too."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with (
        gateway_process(config, "--http", "127.0.0.1:0") as (proc, log),
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
        AsyncExitStack() as streams,
    ):
        url = await _serving_url(log)
        first, second = RawHttpSession(http, url), RawHttpSession(http, url)
        opened = {await first.open(), await second.open()}
        listening = await streams.enter_async_context(http.stream("GET", url, headers=second.headers()))
        assert listening.status_code == 200
        assert _session_ends(tmp_path) == {}
        proc.send_signal(stop)
        with anyio.fail_after(20):
            assert await proc.wait() == 0  # stopped in order, as over stdio
    assert _session_ends(tmp_path) == dict.fromkeys(opened, "the gateway shut down")


@pytest.mark.anyio
async def test_an_idle_http_session_is_closed_and_recorded_as_ended(tmp_path: Path) -> None:
    """A session that goes quiet is closed after `session_idle_timeout` (its id then unknown: 404) and its
    end recorded; a request in flight longer than that keeps it open, and another session's DELETE is
    recorded as the client's."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, http={"session_idle_timeout": "2s"})
    async with (
        http_gateway(config) as url,
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
    ):
        idle, deleted = RawHttpSession(http, url), RawHttpSession(http, url)
        await deleted.open()
        assert (await http.delete(url, headers=deleted.headers())).status_code == 200
        await idle.open()
        slow = await idle.ask(2, "tools/call", {"name": "box__slow", "arguments": {"steps": 60}})  # 3 s
        assert slow["content"] == [{"type": "text", "text": "slept 60 steps"}]
        assert await _session_end(tmp_path, idle.id) == "no request for 2s ([gateway.http] session_idle_timeout)"
        assert _session_ends(tmp_path)[deleted.id] == "the client ended the session"
        gone = await idle.post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert gone.status_code == 404
    logged = events(tmp_path)
    kinds = [(event["kind"], event["session_id"]) for event in logged]
    assert kinds.index(("session_end", idle.id)) > kinds.index(("outcome", idle.id))  # not ended during the call


@pytest.mark.anyio
async def test_npm_typescript_upstreams_through_the_gateway(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the filesystem server\n")
    config = write_config(
        tmp_path,
        {
            "everything": {"command": node_server("mcp-server-everything"), "args": ["stdio"]},
            "files": {"command": node_server("mcp-server-filesystem"), "args": [str(shared)]},
        },
    )
    async with gateway_client(config, mode="auto") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"everything__echo", "files__read_text_file"} <= names
        echoed = await client.call_tool("everything__echo", {"message": "through the gateway"})
        assert "through the gateway" in text_of(echoed)
        read = await client.call_tool("files__read_text_file", {"path": str(shared / "hello.txt")})
        assert "hello from the filesystem server" in text_of(read)
        outside = await client.call_tool("files__read_text_file", {"path": "/etc/hostname"})
        assert outside.is_error


# The config-loader table, through the command line: the same files, the same one-line messages.
CLI_CASE_IDS = {
    "unknown-upstream-key",
    "bad-name-uppercase",
    "missing-env-var",
    "both-command-and-url",
    "colliding-upstream-names",
}
CLI_ERRORS = [case for case in CONFIG_CASES if case.id in CLI_CASE_IDS]


@pytest.mark.parametrize(("text", "message"), CLI_ERRORS)
@pytest.mark.parametrize("command", ["serve", "tools"])
def test_cli_config_errors_are_one_line_without_traceback(
    tmp_path: Path, text: str, message: str, command: str
) -> None:
    (tmp_path / "upstreams.toml").write_text(text)
    result = run_cli(command, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mcp-armor: error: upstreams.toml: ")
    assert message in lines[0]


def test_cli_tools_lists_exposed_tools_and_reports_unreachable_upstreams(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {"box": fixture_upstream("toolbox.py"), "remote": {"url": "http://127.0.0.1:9/mcp"}},
        startup_timeout="2s",
    )
    result = run_cli("tools", "--config", str(config), "--json", cwd=REPO)
    assert result.returncode == 1
    listing = json.loads(result.stdout)
    rows = {row["name"]: row for row in listing["tools"]}
    assert rows["box__echo"] == {
        "name": "box__echo",
        "upstream": "box",
        "upstream_tool": "echo",
        "shortened": False,
        "policy": "allow (default)",
        "description": "Echo the text back.",
    }
    unreachable = [line for line in result.stderr.splitlines() if "upstream 'remote' unavailable" in line]
    assert len(unreachable) == 1
    assert "Traceback" not in result.stderr


def test_cli_tools_table(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    result = run_cli("tools", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TOOL", "UPSTREAM", "UPSTREAM", "TOOL", "POLICY"]
    assert any(line.split() == ["box__echo", "box", "echo", "allow", "(default)"] for line in lines)


def test_cli_bad_http_argument(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    result = run_cli("serve", "--config", str(config), "--http", "localhost:notaport", cwd=tmp_path)
    assert result.returncode == 2
    assert "--http: expected HOST:PORT" in result.stderr


@pytest.mark.anyio
async def test_streamable_http_upstream_with_headers(tmp_path: Path) -> None:
    """An upstream reached by URL: here another gateway serving HTTP, guarded by a token sent as a header."""
    front = tmp_path / "front"
    front.mkdir()
    upstream_config = write_config(front, {"box": fixture_upstream("toolbox.py")}, http={"token": TOKEN})
    async with http_gateway(upstream_config) as url:
        config = write_config(
            tmp_path, {"remote": {"url": url, "headers": {"Authorization": f"Bearer {TOKEN}"}, "timeout": "30s"}}
        )
        async with gateway_client(config, mode="auto") as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert "remote__box__echo" in names
            assert text_of(await client.call_tool("remote__box__echo", {"text": "two hops"})) == "two hops"
            refused = await client.call_tool("remote__box__add", {"a": 1})
            assert refused.is_error and "'b' is a required property" in text_of(refused)


UNSERVED = {"vendor/anything": {"path": "/etc/passwd"}}
UNSERVED_IN_2026 = {"logging/setLevel": {"level": "info"}, "resources/subscribe": {"uri": "toolbox://readme"}}
"""Served on handshake-era connections; the 2026-07-28 specification does not define them."""
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}


@pytest.mark.anyio
async def test_http_refuses_and_records_a_method_the_gateway_does_not_serve_in_both_eras(http_config: Path) -> None:
    authorised = {"Authorization": f"Bearer {TOKEN}"}
    async with http_gateway(http_config) as url, httpx2.AsyncClient(headers=authorised, timeout=30) as http:
        legacy = RawHttpSession(http, url)
        await legacy.open()
        modern_headers = {**_JSON_OR_SSE, "mcp-protocol-version": "2026-07-28"}
        for number, (method, params) in enumerate({**UNSERVED, **UNSERVED_IN_2026}.items(), start=2):
            answered = [await legacy.reply(number, method, params)] if method in UNSERVED else []
            message = {"jsonrpc": "2.0", "id": number, "method": method, "params": {**params, "_meta": MODERN_META}}
            modern = await http.post(url, json=message, headers={**modern_headers, "mcp-method": method})
            answered.append(answer_of(modern, number))
            for answer in answered:
                assert answer["error"]["code"] == types.METHOD_NOT_FOUND, answer
        assert "still here" in json.dumps(
            await legacy.ask(9, "tools/call", {"name": "box__echo", "arguments": {"text": "still here"}})
        )
    recorded = [event for event in events(http_config.parent) if event.get("method") is not None]
    decisions = sorted(event["method"] for event in recorded if event["kind"] == "decision")
    outcomes = sorted(event["method"] for event in recorded if event["kind"] == "outcome")
    assert decisions == outcomes == sorted([*UNSERVED, *UNSERVED, *UNSERVED_IN_2026])
    assert all(event["stage"] == "unknown-method" for event in recorded if event["kind"] == "decision")
