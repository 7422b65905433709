"""Hostile input on the wire, over stdio, in both protocol eras: every malformed line is answered with
the error JSON-RPC names for it (the request's id where it can be read, else null), the connection
stays up, and the other lines of the same write are served. Numbers JSON cannot carry are refused,
never forwarded as something else; a message over the size limit is answered, and serving resumes at
the next line; an upstream's answer that cannot be taken fails its call, recorded as its outcome.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import RawSession, ServerLog, calls, fixture_upstream, gateway_process, write_config

pytestmark = pytest.mark.anyio
ERAS = ("handshake", "2026")
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}
DEEP = b"[" * 100_000 + b"]" * 100_000

SHAPES: dict[str, tuple[bytes, int, Any]] = {
    "not JSON": (b"not json", -32700, None),
    "a batch": (b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]', -32600, None),
    "an empty batch": (b"[]", -32600, None),
    "a float id": (b'{"jsonrpc": "2.0", "id": 1.5, "method": "tools/list"}', -32600, None),
    "a null id": (b'{"jsonrpc": "2.0", "id": null, "method": "tools/list"}', -32600, None),
    "array params": (b'{"jsonrpc": "2.0", "id": "a", "method": "tools/list", "params": [1]}', -32600, "a"),
    "invalid UTF-8": (b'{"jsonrpc": "2.0", "id": 2, "method": "tools/\xff"}', -32700, None),
    "no jsonrpc member": (b'{"id": 3, "method": "tools/list"}', -32600, 3),
    "a method that is not a string": (b'{"jsonrpc": "2.0", "id": 4, "method": 7}', -32600, 4),
    "a notification whose method is not a string": (b'{"jsonrpc": "2.0", "method": ["x"]}', -32600, None),
    "a response with neither result nor error": (b'{"jsonrpc": "2.0", "id": 5}', -32600, None),
    "nesting past what the parser reads": (
        b'{"jsonrpc": "2.0", "id": 6, "method": "ping", "params": ' + DEEP + b"}",
        -32700,
        None,
    ),
}


class Wire(RawSession):
    """A raw client that opens a connection in one era and writes lines exactly as given."""

    def __init__(self, proc: anyio.abc.Process, era: str) -> None:
        super().__init__(proc)
        self.era = era

    def params(self, **params: Any) -> dict[str, Any]:
        return {**params, "_meta": ENVELOPE} if self.era == "2026" else params

    def line(self, request_id: Any, method: str, **params: Any) -> bytes:
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": self.params(**params)}
        return json.dumps(message).encode()  # NaN and infinities written as Python writes them

    async def open(self) -> None:
        if self.era == "handshake":
            await self.initialize()
        else:
            await self.write(self.line(0, "server/discover"))
            assert "result" in await self.answer(0)

    async def write(self, *lines: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(b"".join(line + b"\n" for line in lines))

    async def answers(self, count: int) -> list[dict[str, Any]]:
        with anyio.fail_after(30):
            received = [await self.receive() for _ in range(count)]
        return [message for message in received if "method" not in message]

    async def answer(self, request_id: Any) -> dict[str, Any]:
        with anyio.fail_after(30):
            while True:
                message = await self.receive()
                if "method" not in message and message.get("id") == request_id:
                    return message


@asynccontextmanager
async def wire(config: Path, era: str) -> AsyncIterator[tuple[Wire, ServerLog]]:
    async with gateway_process(config) as (proc, log):
        session = Wire(proc, era)
        await session.open()
        yield session, log


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    return write_config(tmp_path, {})


@pytest.fixture
def box(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("shape", SHAPES)
async def test_a_malformed_line_is_answered_as_json_rpc_says_and_the_rest_of_the_write_is_served(
    bare: Path, era: str, shape: str
) -> None:
    line, code, answered_id = SHAPES[shape]
    async with wire(bare, era) as (raw, log):
        await raw.write(line, raw.line(10, "tools/list"))
        error, served = await raw.answers(2)
        assert error["jsonrpc"] == "2.0" and error["id"] == answered_id and error["error"]["code"] == code, error
        assert served["id"] == 10 and served["result"]["tools"] == []
        await log.wait_for(r"the client sent .*; answered with error")


@pytest.mark.parametrize("era", ERAS)
async def test_a_call_sent_with_a_line_nested_too_deep_is_still_made(box: Path, era: str) -> None:
    deep = b'{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": ' + DEEP + b"}"
    async with wire(box, era) as (raw, _):
        await raw.write(deep, raw.line(11, "tools/call", name="box__echo", arguments={"text": "after"}))
        assert (await raw.answer(None))["error"]["code"] == -32700
        assert (await raw.answer(11))["result"]["content"] == [{"type": "text", "text": "after"}]


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf"), "1e999"])
async def test_a_number_json_cannot_carry_is_refused_as_invalid_params_never_forwarded(
    box: Path, era: str, number: Any
) -> None:
    async with wire(box, era) as (raw, _):
        line = raw.line(12, "tools/call", name="box__echo", arguments={"text": "x", "n": 0.5})
        await raw.write(
            line.replace(b"0.5", str(number).encode() if isinstance(number, str) else json.dumps(number).encode())
        )
        refused = await raw.answer(12)
        assert refused["error"]["code"] == -32602 and "JSON cannot carry" in refused["error"]["message"], refused
        await raw.write(raw.line(13, "tools/list"))
        assert (await raw.answer(13))["result"]["tools"]
    assert "box__echo" not in calls(box.parent)  # never decided, never forwarded


@pytest.mark.parametrize("era", ERAS)
async def test_an_oversize_request_is_answered_and_serving_resumes_at_the_next_line(tmp_path: Path, era: str) -> None:
    box = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, max_message_size="4KB")
    async with wire(box, era) as (raw, log):
        big = raw.line(14, "tools/call", name="box__echo", arguments={"text": "y" * 5000})
        unnamed = b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"text": "' + b"z" * 5000 + b'"}, "id": 15}'
        noid = b'{"method": "tools/call", "params": {"text": "' + b"z" * 5000 + b'"}, "jsonrpc": "2.0"}'
        await raw.write(big, unnamed, noid, raw.line(16, "tools/call", name="box__echo", arguments={"text": "ok"}))
        first, second, third = (await raw.answers(3))[:3]
        assert [first["id"], second["id"], third["id"]] == [14, 15, None]
        assert all(answer["error"]["code"] == -32600 for answer in (first, second, third))
        assert "over the limit of 4096 bytes ([gateway] max_message_size)" in first["error"]["message"]
        assert (await raw.answer(16))["result"]["content"] == [{"type": "text", "text": "ok"}]
        await log.wait_for(r"the client sent a message of \d+ bytes, over the limit of 4096 bytes")
    assert "box__echo" in calls(box.parent)


@pytest.fixture
def wild(tmp_path: Path) -> Path:
    upstreams = {"wild": fixture_upstream("wild.py")}
    return write_config(tmp_path, upstreams, max_upstream_message_size="512KB")


@pytest.mark.parametrize(
    ("tool", "arguments", "reason"),
    [
        ("nan", {}, "a number JSON cannot carry"),
        ("big", {"size": 1_000_000}, "over the limit of 524288 bytes ([gateway] max_upstream_message_size)"),
    ],
)
async def test_an_upstream_answer_that_cannot_be_taken_fails_its_call_and_is_recorded(
    wild: Path, tool: str, arguments: dict[str, Any], reason: str
) -> None:
    async with wire(wild, "handshake") as (raw, log):
        await raw.write(raw.line(20, "tools/call", name=f"wild__{tool}", arguments=arguments))
        failed = await raw.answer(20)
        await raw.write(raw.line(21, "tools/call", name="wild__ok", arguments={}))
        assert (await raw.answer(21))["result"]["content"] == [{"type": "text", "text": "ok ok"}]
        await log.wait_for(rf"upstream 'wild' sent .*{reason[:20]}")
    text = json.dumps(failed)
    assert "upstream 'wild'" in text and reason in text, failed
    outcome = calls(wild.parent)[f"wild__{tool}"]["outcome"]
    assert outcome["outcome"] == "error" and reason in outcome["reason"]


async def test_an_upstream_line_nested_too_deep_is_ignored_and_its_answer_in_the_same_write_taken(wild: Path) -> None:
    async with wire(wild, "handshake") as (raw, log):
        await raw.write(raw.line(22, "tools/call", name="wild__deep", arguments={}))
        assert (await raw.answer(22))["result"]["content"] == [{"type": "text", "text": "deep ok"}]
        await log.wait_for(r"upstream 'wild' wrote a line nested too deep to parse; ignored")


HTTP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def _http_era(http: Any, url: str, era: str) -> dict[str, str]:
    """Headers a request of `era` carries on this gateway (a handshake-era session is opened first)."""
    if era == "2026":
        return {**HTTP_HEADERS, "mcp-protocol-version": "2026-07-28"}
    from tests.e2e.test_http_and_cli import RawHttpSession

    session = RawHttpSession(http, url)
    await session.open()
    return session.headers()


@pytest.mark.parametrize("era", ERAS)
async def test_over_http_each_malformed_body_is_answered_as_json_rpc_says_and_serving_goes_on(
    tmp_path: Path, era: str
) -> None:
    import httpx2

    from tests.conftest import http_gateway
    from tests.e2e.test_http_and_cli import answer_of

    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, max_message_size="256KB")
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        headers = await _http_era(http, url, era)
        wrong: dict[str, tuple[int, str]] = {}
        for shape, (line, code, answered_id) in SHAPES.items():
            response = await http.post(url, content=line, headers=headers)
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
            if response.status_code != 400 or body != {"jsonrpc": "2.0", "id": answered_id, "error": body["error"]}:
                wrong[shape] = (response.status_code, response.text[:200])
            elif body["error"]["code"] != code:
                wrong[shape] = (response.status_code, response.text[:200])
        params: dict[str, Any] = {"_meta": ENVELOPE} if era == "2026" else {}
        call = {"name": "box__echo", "arguments": {"text": float("nan")}, **params}
        nan = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": call}).encode()
        refused = await http.post(url, content=nan, headers=headers)
        assert refused.status_code == 400 and refused.json()["id"] == 7 and refused.json()["error"]["code"] == -32602
        big = json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {"x": "y" * 300_000}})
        oversize = await http.post(url, content=big.encode(), headers=headers)
        assert oversize.status_code == 413 and oversize.json()["error"]["code"] == -32600
        assert "max_message_size" in oversize.json()["error"]["message"]
        listed = {"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": params}
        headers = {**headers, "mcp-method": "tools/list"} if era == "2026" else headers
        assert "box__echo" in json.dumps(answer_of(await http.post(url, json=listed, headers=headers), 9))
    assert wrong == {}
