"""Attacks on the HTTP face, on stdio's framing, on answers from upstreams reached by URL, and on
`audit verify` with anchors left from another log: each is answered as the README says, and the
gateway goes on serving.
"""

from __future__ import annotations

import gzip
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.audit.anchor import default_anchor_file
from gateway.downstream.http_edge import listening_socket
from tests.conftest import (
    ServerLog,
    calls,
    client_over,
    fixture_upstream,
    gateway_client,
    gateway_process,
    http_gateway,
    run_cli,
    text_of,
    write_config,
)
from tests.e2e.test_http_and_cli import RawHttpSession, answer_of
from tests.e2e.test_recovery import by_call, settled_by_a_command, start_slow_call, wait_for_decisions
from tests.e2e.test_wire_faults import ENVELOPE, wire

pytestmark = pytest.mark.anyio
JSON_OR_SSE = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
MODERN = {**JSON_OR_SSE, "mcp-protocol-version": "2026-07-28"}


def _listed(request_id: int, era: str) -> dict[str, Any]:
    params: dict[str, Any] = {"_meta": ENVELOPE} if era == "2026" else {}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/list", "params": params}


async def _headers(http: httpx2.AsyncClient, url: str, era: str) -> dict[str, str]:
    if era == "2026":
        return {**MODERN, "mcp-method": "tools/list"}
    session = RawHttpSession(http, url)
    await session.open()
    return session.headers()


async def _raw_http(port: int, request: bytes) -> bytes:
    """Write `request` as it is on a fresh connection and read until the server closes or answers."""
    with anyio.fail_after(30):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            received = b""
            while b"\r\n\r\n" not in received or not _complete(received):
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
            return received


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def _status_and_body(received: bytes) -> tuple[int, bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("era", ["handshake", "2026"])
async def test_odd_bodies_over_http_are_answered_and_serving_goes_on(tmp_path: Path, era: str) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, max_message_size="4KB")
    logs: list[ServerLog] = []
    async with http_gateway(config, logs) as url, httpx2.AsyncClient(timeout=30) as http:
        headers = await _headers(http, url, era)
        listed = json.dumps(_listed(5, era)).encode()
        wrong: dict[str, Any] = {}

        async def expect(shape: str, response: httpx2.Response, status: int, code: int | None) -> None:
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
            answered = (body or {}).get("error", {}).get("code")
            if response.status_code != status or (code is not None and answered != code):
                wrong[shape] = (response.status_code, response.text[:300])

        await expect("an empty body", await http.post(url, content=b"", headers=headers), 400, -32700)
        await expect("only white space", await http.post(url, content=b" \r\n\t" * 100, headers=headers), 400, -32700)
        zipped = {**headers, "content-encoding": "gzip"}
        await expect("a gzip body", await http.post(url, content=gzip.compress(listed), headers=zipped), 400, -32700)
        bomb = gzip.compress(b" " * 10_000_000)  # small on the wire, never inflated by the gateway
        await expect("a gzip bomb", await http.post(url, content=bomb, headers=zipped), 413, -32600)
        deep = b'{"jsonrpc":"2.0","id":3,"method":"tools/list","params":' + b"[" * 2000 + b"]" * 2000 + b"}"
        await expect("nested deep", await http.post(url, content=deep, headers=headers), 400, None)
        nan = json.dumps({**_listed(4, era), "params": {**_listed(4, era)["params"], "cursor": float("nan")}})
        await expect("NaN in params", await http.post(url, content=nan.encode(), headers=headers), 400, -32602)

        def chunks(size: int) -> Any:
            async def body() -> AsyncIterator[bytes]:
                for _ in range(size // 1024):
                    yield b" " * 1024
                yield listed

            return body()

        chunked = await http.post(url, content=chunks(64 * 1024), headers=headers)  # no Content-Length: chunked
        await expect("a chunked body over the limit", chunked, 413, -32600)
        small = await http.post(url, content=chunks(1024), headers=headers)
        await expect("a chunked body under the limit", small, 200, None)
        assert "box__echo" in json.dumps(answer_of(await http.post(url, content=listed, headers=headers), 5))
    assert wrong == {}
    assert "Traceback" not in logs[0].text


async def test_a_body_shorter_or_longer_than_its_content_length_is_never_served_half_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, max_message_size="4KB")
    logs: list[ServerLog] = []
    async with http_gateway(config, logs) as url, httpx2.AsyncClient(timeout=30) as http:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        listed = json.dumps(_listed(6, "2026")).encode()
        head = (
            f"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\naccept: application/json, text/event-stream\r\n"
            "content-type: application/json\r\nmcp-protocol-version: 2026-07-28\r\nmcp-method: tools/list\r\n"
        )
        # Declared longer than sent, then the client goes quiet (half-closed): answered, never a hang.
        short = (head + f"content-length: {len(listed) + 100}\r\n\r\n").encode() + listed
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(short)
                await stream.send_eof()
                received = b""
                while True:
                    try:
                        received += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert b"box__echo" not in received and b"Traceback" not in received
        # Declared shorter than sent: the part declared is one message (broken here), the rest is not served.
        cut = (head + f"content-length: {len(listed) - 10}\r\n\r\n").encode() + listed
        status, body = _status_and_body(await _raw_http(port, cut))
        assert status == 400 and json.loads(body)["error"]["code"] == -32700
        # Both a Content-Length and chunked: read as chunked (RFC 9112), or refused; never half of each.
        both = (head + "content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n").encode()
        chunk = f"{len(listed):x}\r\n".encode() + listed + b"\r\n0\r\n\r\n"
        status, body = _status_and_body(await _raw_http(port, both + chunk))
        assert status == 400 or (status == 200 and b"box__echo" in body), (status, body[:300])
        headers = {**MODERN, "mcp-method": "tools/list"}
        assert "box__echo" in json.dumps(answer_of(await http.post(url, content=listed, headers=headers), 6))
    assert "Traceback" not in logs[0].text


@pytest.mark.parametrize("era", ["handshake", "2026"])
async def test_a_body_without_json_content_type_never_reaches_a_tool(tmp_path: Path, era: str) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        headers = await _headers(http, url, era)
        params: dict[str, Any] = {"name": "box__echo", "arguments": {"text": "typed"}}
        if era == "2026":
            params["_meta"] = ENVELOPE
            headers = {**headers, "mcp-method": "tools/call", "mcp-name": "box__echo"}
        call = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            sent = {key: value for key, value in headers.items() if key.lower() != "content-type"}
            if content_type is not None:
                sent["content-type"] = content_type
            response = await http.post(url, content=call, headers=sent)
            assert response.status_code in (400, 415), (content_type, response.status_code, response.text)
            assert "Traceback" not in response.text
        listing = {**headers, "mcp-method": "tools/list"} if era == "2026" else headers
        assert "box__echo" in json.dumps(answer_of(await http.post(url, json=_listed(8, era), headers=listing), 8))
    assert "box__echo" not in calls(config.parent)


async def test_crlf_lines_a_bom_a_lone_cr_and_a_long_blank_line_on_stdio(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, max_message_size="64KB")
    async with wire(config, "handshake") as (raw, _):
        crlf = raw.line(30, "tools/call", name="box__echo", arguments={"text": "crlf"}) + b"\r"
        await raw.write(crlf)
        assert (await raw.answer(30))["result"]["content"] == [{"type": "text", "text": "crlf"}]
        await raw.write(b"\r", b" " * 1_000_000, b"\t \r")  # blank lines, one of them over the limit
        await raw.write(raw.line(31, "tools/list"))
        oversize, listed = await raw.answers(2)
        assert oversize["id"] is None and oversize["error"]["code"] == -32600, oversize
        assert listed["id"] == 31 and listed["result"]["tools"], listed
    async with wire(config, "2026") as (raw, _):
        await raw.write(b"\xef\xbb\xbf" + raw.line(32, "tools/list"))  # a BOM: not JSON, or read past
        (first,) = await raw.answers(1)
        assert first.get("error", {}).get("code") == -32700 or first.get("id") == 32, first
        await raw.write(raw.line(33, "tools/call", name="box__echo", arguments={"text": "after"}))
        assert (await raw.answer(33))["result"]["content"] == [{"type": "text", "text": "after"}]


# ---- upstreams reached by URL -------------------------------------------------------------------------

WILD_NAMES = ("nan", "inf", "big", "deep", "garbled", "nanprogress", "nanlog", "ok")
WILD_TOOLS = [{"name": name, "inputSchema": {"type": "object"}} for name in WILD_NAMES]


async def _wild_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A streamable-HTTP MCP server answering with JSON bodies written as Python writes them."""
    assert scope["type"] == "http"
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body", False):
            break
    message = json.loads(body)
    if "id" not in message:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    method, result = message["method"], {}
    if method == "initialize":
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}, "logging": {}},
            "serverInfo": {"name": "wild-http", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": WILD_TOOLS}
    elif method == "tools/call":
        name = message["params"]["name"]
        result = {"content": [{"type": "text", "text": "x" * 1_000_000 if name == "big" else f"{name} ok"}]}
        if name in ("nan", "inf"):
            result["structuredContent"] = {"x": float(name)}
    text = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
    token = ((message.get("params") or {}).get("_meta") or {}).get("progressToken")
    if method == "tools/call" and message["params"]["name"] == "nanprogress" and token is not None:
        stream = b""
        for progress, total in ((float("nan"), float("inf")), (1.0, 2.0)):
            params = {"progressToken": token, "progress": progress, "total": total}
            notice = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})
            stream += f"event: message\ndata: {notice}\n\n".encode()
        stream += f"event: message\ndata: {text.decode()}\n\n".encode()
        await _events(send, stream)
        return
    if method == "tools/call" and message["params"]["name"] == "nanlog":
        stream = b""
        for data in ({"x": float("nan")}, "fine"):
            params = {"level": "error", "data": data}
            notice = json.dumps({"jsonrpc": "2.0", "method": "notifications/message", "params": params})
            stream += f"event: message\ndata: {notice}\n\n".encode()
        stream += f"event: message\ndata: {text.decode()}\n\n".encode()
        await _events(send, stream)
        return
    if method == "tools/call" and message["params"]["name"] == "deep":
        text = text.replace(b'"deep ok"', b"[" * 100_000 + b"]" * 100_000)
    if method == "tools/call" and message["params"]["name"] == "garbled":
        text = text[: len(text) // 2]
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(text)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": text})


async def _events(send: Send, stream: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": stream})


@asynccontextmanager
async def wild_http_upstream() -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(_wild_app, log_level="warning", lifespan="off"))
    with listening_socket("127.0.0.1", 0) as sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])  # the socket listens already: connections wait in its backlog
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            server.should_exit = True


@pytest.mark.parametrize(("tool", "reason"), [("nan", "JSON cannot carry"), ("inf", "JSON cannot carry")])
async def test_a_url_upstream_answer_with_a_number_json_cannot_carry_fails_its_call_recorded(
    tmp_path: Path, tool: str, reason: str
) -> None:
    async with wild_http_upstream() as url:
        config = write_config(tmp_path, {"wild": {"url": url, "timeout": "30s"}})
        async with gateway_client(config) as client:
            failed = await client.call_tool(f"wild__{tool}", {})
            assert text_of(await client.call_tool("wild__ok", {})) == "ok ok"
    assert failed.is_error and reason in text_of(failed), failed
    assert failed.structured_content is None, failed.structured_content
    outcome = calls(config.parent)[f"wild__{tool}"]["outcome"]
    assert outcome["outcome"] == "error" and reason in outcome["reason"], outcome


async def test_a_url_upstream_progress_with_numbers_json_cannot_carry_never_reaches_the_agent_as_other_numbers(
    tmp_path: Path,
) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with wild_http_upstream() as url:
        config = write_config(tmp_path, {"wild": {"url": url, "timeout": "30s"}})
        async with gateway_client(config) as client:
            done = await client.call_tool("wild__nanprogress", {}, progress_callback=on_progress)
            assert text_of(await client.call_tool("wild__ok", {})) == "ok ok"
    assert text_of(done) == "nanprogress ok"
    assert seen == [(1.0, 2.0, None)], seen  # never null or 0: numbers the upstream did not send


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
async def test_a_url_upstream_log_message_with_a_number_json_cannot_carry_is_not_passed_on_as_null(
    tmp_path: Path,
) -> None:
    received: list[Any] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params.data)

    async with wild_http_upstream() as url:
        config = write_config(tmp_path, {"wild": {"url": url, "timeout": "30s"}})
        async with client_over("stdio", config, "legacy", logging_callback=on_log) as client:
            await client.list_tools()
            await client.set_logging_level("debug")
            assert text_of(await client.call_tool("wild__nanlog", {})) == "nanlog ok"
            assert text_of(await client.call_tool("wild__ok", {})) == "ok ok"
    assert "fine" in received and {"x": None} not in received, received


@pytest.mark.parametrize("tool", ["deep", "garbled"])
async def test_a_url_upstream_answer_that_cannot_be_parsed_fails_its_call_at_once_recorded(
    tmp_path: Path, tool: str
) -> None:
    async with wild_http_upstream() as url:
        config = write_config(tmp_path, {"wild": {"url": url, "timeout": "30s"}})
        async with gateway_client(config) as client:
            with anyio.fail_after(10):  # well before the call's timeout
                failed = await client.call_tool(f"wild__{tool}", {})
            assert text_of(await client.call_tool("wild__ok", {})) == "ok ok"
    assert failed.is_error and "upstream 'wild'" in text_of(failed), failed
    assert calls(config.parent)[f"wild__{tool}"]["outcome"]["outcome"] == "error"


async def test_a_url_upstream_answer_over_the_upstream_limit_fails_its_call_recorded(tmp_path: Path) -> None:
    async with wild_http_upstream() as url:
        config = write_config(tmp_path, {"wild": {"url": url, "timeout": "30s"}}, max_upstream_message_size="512KB")
        async with gateway_client(config) as client:
            failed = await client.call_tool("wild__big", {})
            assert text_of(await client.call_tool("wild__ok", {})) == "ok ok"
    assert failed.is_error and "max_upstream_message_size" in text_of(failed), text_of(failed)[:200]
    assert calls(config.parent)["wild__big"]["outcome"]["outcome"] == "error"


async def test_verify_of_a_new_log_against_anchors_left_by_a_deleted_one_names_the_anchor_file(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    log = tmp_path / ".mcp-armor" / "audit.db"
    async with gateway_client(config) as client:
        for text in ("one", "two", "three"):
            await client.call_tool("box__echo", {"text": text})
    anchors = default_anchor_file(log)
    assert anchors is not None and anchors.read_text()
    for path in log.parent.glob("audit.db*"):
        path.unlink()
    async with gateway_client(config) as client:
        await client.call_tool("box__echo", {"text": "again"})
    verified = run_cli("audit", "verify", "--config", str(config), cwd=tmp_path)
    assert verified.returncode == 1
    assert "Traceback" not in verified.stdout + verified.stderr
    said = verified.stdout + verified.stderr
    assert said.startswith("broken at seq ") and f"(anchors read from {anchors}: if this log was deleted" in said, said
    assert "move that file aside" in said, said


async def _slow_call_over_http(url: str, started: anyio.Event) -> None:
    """A handshake-era session over HTTP making a call that runs until its gateway ends; `started` is set
    at its first progress. Returns when the response ends (however it ends)."""
    async with httpx2.AsyncClient(timeout=60) as http:
        session = RawHttpSession(http, url)
        await session.open()
        params = {"name": "box__slow", "arguments": {"steps": 100000}, "_meta": {"progressToken": "http"}}
        message = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        try:
            async with http.stream("POST", url, json=message, headers=session.headers()) as response:
                async for line in response.aiter_lines():
                    if "notifications/progress" in line:
                        started.set()
        except httpx2.HTTPError:
            pass  # the gateway went away mid-answer


@pytest.mark.parametrize("killed", ["http", "stdio"])
async def test_killing_one_face_interrupts_only_its_own_call_on_a_shared_state(tmp_path: Path, killed: str) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with (
        gateway_process(config, "--http", "127.0.0.1:0") as (http_proc, http_log),
        gateway_process(config) as (stdio_proc, _),
        anyio.create_task_group() as tg,
    ):
        url = (await http_log.wait_for(r"serving streamable HTTP at (http://\S+/mcp)", seconds=30))[1]
        started = anyio.Event()
        tg.start_soon(_slow_call_over_http, url, started)
        with anyio.fail_after(30):
            await started.wait()
        await start_slow_call(stdio_proc, "stdio")
        await wait_for_decisions(config, 2)
        doomed, live = (http_proc, stdio_proc) if killed == "http" else (stdio_proc, http_proc)
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
        await settled_by_a_command(config)
        per_call = by_call(config)
        ended = {call[0]["session_id"]: call[1]["outcome"] for call in per_call.values() if len(call) == 2}
        assert list(ended.values()) == ["interrupted"], per_call
        open_calls = [call for call in per_call.values() if len(call) == 1]
        assert len(open_calls) == 1, per_call  # the live face's call goes on, with no outcome yet
        (interrupted,) = [call for call in per_call.values() if len(call) == 2]
        assert str(doomed.pid) in interrupted[1]["reason"]
        live.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await live.wait()
        tg.cancel_scope.cancel()
    assert sorted(call[1]["outcome"] for call in by_call(config).values()) == ["cancelled", "interrupted"]


@pytest.mark.parametrize(
    "era",
    ["handshake", "2026"],
)
@pytest.mark.parametrize("depth", [300, 900])
async def test_arguments_nested_hundreds_deep_over_http_are_refused_with_a_decision_and_an_outcome(
    tmp_path: Path, era: str, depth: int
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    logs: list[ServerLog] = []
    async with http_gateway(config, logs) as url, httpx2.AsyncClient(timeout=30) as http:
        headers = await _headers(http, url, era)
        params: dict[str, Any] = {"name": "box__echo", "arguments": {"text": "deep"}}
        if era == "2026":
            params["_meta"] = ENVELOPE
            headers = {**headers, "mcp-method": "tools/call", "mcp-name": "box__echo"}
        call = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params})
        deep = call.replace('"deep"', "[" * depth + "]" * depth).encode()
        response = await http.post(url, content=deep, headers=headers)
        assert response.status_code in (200, 400), (response.status_code, response.text[:300])
        answered = answer_of(response, 9) if response.status_code == 200 else response.json()
        refused = json.dumps(answered)
        assert "nest deeper than" in refused or "error" in answered, refused[:300]
        listing = {**headers, "mcp-method": "tools/list"} if era == "2026" else headers
        assert "box__echo" in json.dumps(answer_of(await http.post(url, json=_listed(10, era), headers=listing), 10))
    assert "Traceback" not in logs[0].text
    recorded = calls(config.parent)
    assert recorded["box__echo"]["decision"]["decision"] == "deny", recorded
