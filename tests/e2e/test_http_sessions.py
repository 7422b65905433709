"""Who owns an HTTP session: a stateless 2026-07-28 session is its authenticated principal, whatever
session id or client the request declares; a handshake-era session answers only the principal that
opened it, ends only when its DELETE is accepted, and an approval's `requestState` is redeemed only by
the principal it was issued to. Each attack is tried over real HTTP against a real gateway process.

The two principals, `alice` and `bob`, are named ones, issued with `mcp-armor principal add` before the
gateway starts.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import DEFAULT_CLIENT_INFO
from mcp.client.streamable_http import streamable_http_client

from gateway.downstream.http_edge import SESSIONS_PER_PRINCIPAL
from gateway.schema import canonical_json
from tests.conftest import ServerLog, events, fixture_upstream, http_gateway, read_records, run_cli, text_of
from tests.conftest import write_config as write_gateway_config
from tests.e2e.test_http_and_cli import TOKEN, RawHttpSession, _session_end, answer_of

pytestmark = pytest.mark.anyio

OWNER, OTHER = "alice", "bob"
MODERN = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
MODERN = {**MODERN, "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "box__echo"}
POLICY = """
[[rule]]
id = "echo-budget"
tools = ["box__echo"]
effect = "allow"
rate = "3/minute"

[[rule]]
id = "notes-need-approval"
tools = ["box__write_note"]
effect = "ask"
reason = "notes are written to disk"
"""
NOTE = {"path": "notes/a.txt", "body": "hello"}
_PARAMS = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}


def write_config(directory: Path, **http: Any) -> Path:
    record = str(directory / "calls.jsonl")
    upstreams = {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=record)}
    return write_gateway_config(directory, upstreams, policy=POLICY, http=http)


def two_principals(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Issue `alice` (the owner) and `bob` (the intruder) with `mcp-armor principal add`: their headers."""
    headers = []
    config = str(directory / "upstreams.toml")
    for name in (OWNER, OTHER):
        added = run_cli("principal", "add", name, "--json", "--config", config, cwd=directory)
        assert added.returncode == 0, added.stderr
        headers.append({"authorization": f"Bearer {json.loads(added.stdout)['token']}"})
    return headers[0], headers[1]


def modern_echo(number: int, client: tuple[str, str] = ("raw", "1")) -> dict[str, Any]:
    """A stateless 2026-07-28 `tools/call` of `box__echo`, declaring `client` (name, version) in its envelope."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": client[0], "version": client[1]},
    }
    params = {"name": "box__echo", "arguments": {"text": f"call {number}"}, "_meta": meta}
    return {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": params}


def echo(number: int) -> dict[str, Any]:
    params = {"name": "box__echo", "arguments": {"text": f"call {number}"}}
    return {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": params}


def went_ahead(answer: dict[str, Any]) -> bool:
    result = answer.get("result")
    return isinstance(result, dict) and not result.get("isError", False)


def decisions(config_dir: Path, tool: str) -> list[dict[str, Any]]:
    return [event for event in events(config_dir) if event["kind"] == "decision" and event.get("tool") == tool]


@pytest.mark.parametrize("credentials", ["shared token", "none"])
async def test_a_stateless_2026_session_is_its_principal_whatever_session_id_or_client_it_declares(
    tmp_path: Path, credentials: str
) -> None:
    """A fresh `mcp-session-id` or a new client version per call gets no fresh rate budget: 3 of 6 go ahead.
    The client each request declared is recorded with its call, as a label."""
    config = write_config(tmp_path, token=TOKEN) if credentials == "shared token" else write_config(tmp_path)
    headers = {"authorization": f"Bearer {TOKEN}"} if credentials == "shared token" else {}
    async with http_gateway(config) as url, httpx2.AsyncClient(headers=headers, timeout=30) as http:
        answers = []
        for number in range(6):
            sent = {**MODERN, "mcp-session-id": uuid.uuid4().hex}
            message = modern_echo(number, (f"agent-{number % 2}", str(number)))
            answers.append(answer_of(await http.post(url, json=message, headers=sent), number))
    assert [went_ahead(answer) for answer in answers] == [True] * 3 + [False] * 3
    decided = decisions(tmp_path, "box__echo")
    assert len({event["session_id"] for event in decided}) == 1
    assert [event["client"] for event in decided] == [f"agent-{number % 2}" for number in range(6)]
    principal = "token" if credentials == "shared token" else None
    assert {event["principal"] for event in decided} == {principal}


async def test_a_handshake_session_answers_only_the_principal_that_opened_it(tmp_path: Path) -> None:
    """Another principal's POST (either era), GET and DELETE carrying the session's id are answered exactly
    as an unknown session is, logged, recorded nowhere, and use none of the owner's budget."""
    config = write_config(tmp_path)
    owner_headers, intruder_headers = two_principals(tmp_path)
    logs: list[ServerLog] = []
    async with (
        http_gateway(config, logs) as url,
        httpx2.AsyncClient(headers=owner_headers, timeout=30) as owner_http,
        httpx2.AsyncClient(headers=intruder_headers, timeout=30) as intruder_http,
    ):
        owner = RawHttpSession(owner_http, url)
        await owner.open()
        intruder = RawHttpSession(intruder_http, url)
        intruder.id = uuid.uuid4().hex
        unknown = await intruder.post(echo(1))  # the SDK's own answer to a session it does not know
        assert unknown.status_code == 404
        intruder.id = owner.id
        tried = [await intruder.post(echo(number)) for number in range(2, 5)]
        tried.append(await intruder_http.post(url, json=modern_echo(5), headers={**MODERN, "mcp-session-id": owner.id}))
        tried.append(await intruder_http.get(url, headers=intruder.headers(), timeout=10))  # on a stream: bounded
        tried.append(await intruder_http.delete(url, headers=intruder.headers()))
        assert [(answer.status_code, answer.content) for answer in tried] == [(404, unknown.content)] * len(tried)
        answers = [await owner.reply(number, "tools/call", echo(number)["params"]) for number in range(10, 14)]
        assert [went_ahead(answer) for answer in answers] == [True] * 3 + [False]
    assert logs[0].text.count("carried the session id of another principal's session") == len(tried)
    decided = decisions(tmp_path, "box__echo")
    assert [event["session_id"] for event in decided if event["session_id"] == owner.id] == [owner.id] * 4
    assert all(event["principal"] == OWNER for event in decided)  # the intruder's calls reached nothing
    sessions = json.loads(run_cli("audit", "sessions", "--json", cwd=tmp_path).stdout)
    (recorded,) = [session for session in sessions if session["session_id"] == owner.id]
    assert (recorded["client"], recorded["principal"], recorded["calls"]) == ("raw 1", OWNER, 4)


async def test_a_delete_the_gateway_refuses_leaves_the_session_open(tmp_path: Path) -> None:
    """A DELETE refused for its foreign `Host` (421) ends nothing: the session's rate-limit counts stay and
    no `session_end` is recorded until a DELETE is accepted."""
    config = write_config(tmp_path)
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        session = RawHttpSession(http, url)
        await session.open()
        answers = [await session.reply(number, "tools/call", echo(number)["params"]) for number in range(1, 4)]
        refused = await http.delete(url, headers={**session.headers(), "host": "evil.example:80"})
        assert refused.status_code == 421
        answers.append(await session.reply(4, "tools/call", echo(4)["params"]))
        assert [went_ahead(answer) for answer in answers] == [True] * 3 + [False]
        assert (await http.delete(url, headers=session.headers())).status_code == 200
        assert await _session_end(tmp_path, session.id) == "the client ended the session"
    kinds = [(event["kind"], event["session_id"]) for event in events(tmp_path)]
    assert kinds.count(("session_end", session.id)) == kinds.count(("session_start", session.id)) == 1
    assert kinds.index(("session_end", session.id)) > max(
        index for index, kind in enumerate(kinds) if kind == ("outcome", session.id)
    )


async def approve(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    """A client that can ask a person (the retries below answer for them)."""
    return types.ElicitResult(action="accept", content={"approve": True})


def altered(state: str, principal: str) -> str:
    """`state` with the principal it names changed, its seal kept."""
    body, _, seal = state.partition(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["p"] = principal
    return base64.urlsafe_b64encode(canonical_json(claims)).decode().rstrip("=") + "." + seal


async def test_an_approval_state_is_redeemed_only_by_the_principal_it_was_issued_to(tmp_path: Path) -> None:
    """Another principal declaring the same client, an unauthenticated requester, and a state altered to
    name the other principal are each refused (recorded `invalid`); the owner's retry then goes ahead."""
    config = write_config(tmp_path)
    owner_headers, intruder_headers = two_principals(tmp_path)
    yes = {"mcp-armor-approval": types.ElicitResult(action="accept", content={"approve": True})}
    async with (
        http_gateway(config) as url,
        httpx2.AsyncClient(headers=owner_headers, timeout=httpx2.Timeout(30, read=60)) as owner_http,
        httpx2.AsyncClient(headers=intruder_headers, timeout=httpx2.Timeout(30, read=60)) as intruder_http,
        Client(streamable_http_client(url, http_client=owner_http), mode="auto", elicitation_callback=approve) as owner,
        Client(
            streamable_http_client(url, http_client=intruder_http), mode="auto", elicitation_callback=approve
        ) as intruder,
        httpx2.AsyncClient(timeout=30) as anonymous,
    ):
        asked = await owner.session.call_tool("box__write_note", NOTE, allow_input_required=True)
        assert isinstance(asked, types.InputRequiredResult) and asked.request_state is not None
        state = asked.request_state
        refusals = []
        for who, sent in ((intruder, state), (intruder, altered(state, OTHER)), (owner, altered(state, OTHER))):
            retried = await who.session.call_tool(
                "box__write_note", NOTE, input_responses=yes, request_state=sent, allow_input_required=True
            )
            assert isinstance(retried, types.CallToolResult) and retried.is_error
            refusals.append(text_of(retried))
        retry = modern_echo(1, (DEFAULT_CLIENT_INFO.name, DEFAULT_CLIENT_INFO.version))  # as the owner declares
        retry["params"] = {**retry["params"], "name": "box__write_note", "arguments": NOTE, "requestState": state}
        unauthenticated = await anonymous.post(url, json=retry, headers={**MODERN, "mcp-name": "box__write_note"})
        assert unauthenticated.status_code == 401
        done = await owner.session.call_tool("box__write_note", NOTE, input_responses=yes, request_state=state)
        assert isinstance(done, types.CallToolResult) and not done.is_error
    assert "the approval was given to another principal" in refusals[0]
    assert all("was not issued by this gateway" in refusal for refusal in refusals[1:])
    answered = [
        (event["principal"], event["approval_request"]["answer"]) for event in decisions(tmp_path, "box__write_note")
    ]
    assert answered == [
        (OWNER, "pending"),
        (OTHER, "invalid"),
        (OTHER, "invalid"),
        (OWNER, "invalid"),
        (OWNER, "granted"),
    ]
    assert [record["tool"] for record in read_records(tmp_path / "calls.jsonl")] == ["write_note"]


async def test_one_principal_cannot_take_every_session_the_gateway_can_hold(tmp_path: Path) -> None:
    """The gateway holds at most so many handshake-era sessions at once; one principal opening session
    after session (never ending them) is refused its own beyond `SESSIONS_PER_PRINCIPAL` (503, logged),
    while another principal still opens its own, and each one it ends frees a place. Its 2026-07-28
    requests, which open no session, still go ahead."""
    config = write_config(tmp_path)
    owner_headers, intruder_headers = two_principals(tmp_path)
    logs: list[ServerLog] = []
    opening = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": _PARAMS}
    accept = {"accept": "application/json, text/event-stream"}
    async with (
        http_gateway(config, logs) as url,
        httpx2.AsyncClient(headers=owner_headers, timeout=30) as owner_http,
        httpx2.AsyncClient(headers=intruder_headers, timeout=30) as intruder_http,
    ):
        opened = []
        for _ in range(SESSIONS_PER_PRINCIPAL):
            answer = await intruder_http.post(url, json=opening, headers=accept)
            assert answer.status_code == 200
            opened.append(answer.headers["mcp-session-id"])
        refused = await intruder_http.post(url, json=opening, headers=accept)
        assert refused.status_code == 503 and "mcp-session-id" not in refused.headers
        assert refused.json()["error"]["message"] == "Too many open sessions for this principal"
        assert (await owner_http.post(url, json=opening, headers=accept)).status_code == 200
        modern = await intruder_http.post(url, json=modern_echo(1), headers=MODERN)
        assert went_ahead(answer_of(modern, 1))
        ended = await intruder_http.delete(url, headers={**accept, "mcp-session-id": opened[0]})
        assert ended.status_code == 200
        assert (await intruder_http.post(url, json=opening, headers=accept)).status_code == 200
    assert logs[0].text.count(f"principal '{OTHER}' has {SESSIONS_PER_PRINCIPAL} sessions open") == 1
