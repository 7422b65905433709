"""Named principals over streamable HTTP, end to end: `mcp-armor principal add | revoke` against a running
`mcp-armor serve --http`, real HTTP clients, and what the audit log records of who called."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import (
    ServerLog,
    events,
    fixture_upstream,
    gateway_process,
    http_gateway,
    run_cli,
    text_of,
    write_config,
)
from tests.e2e.test_http_and_cli import RawHttpSession

SHARED = "shared-token-0123456789abcdef"
_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
}


async def cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        lambda: run_cli(*args, "--config", str(directory / "upstreams.toml"), cwd=directory)
    )


async def issue(directory: Path, name: str, *extra: str) -> dict[str, Any]:
    result = await cli(directory, "principal", "add", name, "--json", *extra)
    assert result.returncode == 0, result.stderr
    issued: dict[str, Any] = json.loads(result.stdout)
    return issued


async def status(http: httpx2.AsyncClient, url: str, token: str) -> int:
    """The HTTP status of an `initialize` carrying `token`."""
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {token}"}
    return (await http.post(url, json=_INITIALIZE, headers=headers)).status_code


async def echo(url: str, token: str, text: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        assert text_of(await client.call_tool("box__echo", {"text": text})) == text


async def recorded_call(directory: Path, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The session_start and decision events of the echo of `text` (polling: the gateway process writes them)."""
    with anyio.fail_after(30):
        while True:
            logged = events(directory)
            decision = next(
                (e for e in logged if e["kind"] == "decision" and text in json.dumps(e.get("arguments"))), None
            )
            if decision is not None:
                start = next(
                    e for e in logged if e["kind"] == "session_start" and e["session_id"] == decision["session_id"]
                )
                return start, decision
            await anyio.sleep(0.05)


def expire(directory: Path, token_id: str) -> None:
    """Move a token's expiry into the past, as time passing would."""
    with sqlite3.connect(directory / ".mcp-armor" / "principals.db") as db:
        db.execute("UPDATE tokens SET expires = '2000-01-01T00:00:00.000Z' WHERE id = ?", (token_id,))
    db.close()


@pytest.mark.anyio
async def test_principals_tokens_authenticate_and_revocation_holds_in_the_running_gateway(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, http={"token": SHARED})
    first = await issue(tmp_path, "alice", "--role", "admin")
    second = await issue(tmp_path, "alice")  # rotation: a second token for the same principal
    bob = await issue(tmp_path, "bob")
    ci = await issue(tmp_path, "ci-nightly", "--expires", "1h")
    log: list[ServerLog] = []
    async with http_gateway(config, log) as url, httpx2.AsyncClient(timeout=30) as http:
        await echo(url, first["token"], "from alice")
        start, decision = await recorded_call(tmp_path, "from alice")
        assert start["principal"] == "alice" and decision["principal"] == "alice"
        await echo(url, SHARED, "from the shared token")
        start, decision = await recorded_call(tmp_path, "from the shared token")
        assert start["principal"] == "token" and decision["principal"] == "token"

        assert await status(http, url, second["token"]) == 200
        assert await status(http, url, ci["token"]) == 200
        unknown = "mcpa_0badc0de_" + first["token"][14:]  # the right shape, an id never issued
        altered = first["token"][:-1] + ("B" if first["token"].endswith("A") else "A")
        assert await status(http, url, unknown) == 401
        assert await status(http, url, altered) == 401

        expire(tmp_path, ci["token_id"])
        assert await status(http, url, ci["token"]) == 401

        revoked = await cli(tmp_path, "principal", "revoke", first["token_id"])
        assert revoked.returncode == 0 and f"token {first['token_id']} revoked" in revoked.stdout
        assert await status(http, url, first["token"]) == 401
        assert await status(http, url, second["token"]) == 200

        assert (await cli(tmp_path, "principal", "revoke", "alice")).returncode == 0
        assert await status(http, url, second["token"]) == 401
        assert await status(http, url, bob["token"]) == 200
        assert await status(http, url, SHARED) == 200
        await log[0].wait_for(rf"token {ci['token_id']} of principal 'ci-nightly' expired")
        await log[0].wait_for(rf"token {first['token_id']} of principal 'alice' was revoked")

    listed = {p["name"]: p for p in json.loads((await cli(tmp_path, "principal", "list", "--json")).stdout)}
    assert [t["state"] for t in listed["alice"]["tokens"]] == ["revoked", "revoked"]
    assert [t["state"] for t in listed["ci-nightly"]["tokens"]] == ["expired"]
    assert listed["alice"]["roles"] == ["admin"] and "hash" not in json.dumps(listed)
    changes = [(e["change"], e["principal"], e["credential"]) for e in events(tmp_path) if e["kind"] == "principal"]
    assert changes[-2:] == [
        ("token_revoked", "alice", first["token_id"]),
        ("token_revoked", "alice", second["token_id"]),
    ]
    state = b"".join(path.read_bytes() for path in (tmp_path / ".mcp-armor").rglob("*") if path.is_file())
    for issued in (first, second, bob, ci):
        secret = issued["token"][len("mcpa_12345678_") :]
        assert issued["token"].encode() not in state and secret.encode() not in state
        assert issued["token"] not in log[0].text


@pytest.mark.anyio
async def test_the_first_principal_added_makes_a_running_gateway_require_authentication(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    bare = {"Accept": "application/json, text/event-stream"}
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        assert (await http.post(url, json=_INITIALIZE, headers=bare)).status_code == 200  # no credentials yet
        alice = await issue(tmp_path, "alice")
        missing = await http.post(url, json=_INITIALIZE, headers=bare)
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert await status(http, url, SHARED) == 401
        assert await status(http, url, alice["token"]) == 200


LISTEN = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "subscriptions/listen",
    "params": {
        "notifications": {"toolsListChanged": True},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"},
        },
    },
}
LISTENING = {
    "Accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2026-07-28",
    "mcp-method": "subscriptions/listen",
}


async def stream_until_closed(
    http: httpx2.AsyncClient, url: str, session: RawHttpSession | None, opened: anyio.Event
) -> None:
    """Hold the session's GET stream (`None`: a 2026-07-28 listen stream) open until the gateway ends it."""
    if session is not None:
        opening = http.stream("GET", url, headers=session.headers())
    else:
        opening = http.stream("POST", url, json=LISTEN, headers=LISTENING)
    async with opening as stream:
        assert stream.status_code == 200
        opened.set()
        async for _ in stream.aiter_bytes():
            pass


async def ended_after(http: httpx2.AsyncClient, url: str, session: RawHttpSession | None, change: Any) -> None:
    """Open the session's GET stream (`None`: a listen stream), make `change`, and wait (bounded) for the
    gateway to end the stream."""
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            opened = anyio.Event()
            tg.start_soon(stream_until_closed, http, url, session, opened)
            await opened.wait()
            await change()


@pytest.mark.anyio
async def test_an_open_stream_ends_once_its_request_would_no_longer_be_let_in(tmp_path: Path) -> None:
    """A stream outlasts the check its request passed: a GET stream opened without credentials ends once
    the first principal is added (and its session is then no one's); one opened with a token, and a
    2026-07-28 listen stream, end once that token is revoked. None goes on receiving what the gateway
    sends (list changes, resource updates) after that."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    timeout = httpx2.Timeout(30, read=None)
    issued: list[dict[str, Any]] = []

    async def add_alice() -> None:
        issued.append(await issue(tmp_path, "alice"))

    async def revoke_alice() -> None:
        assert (await cli(tmp_path, "principal", "revoke", issued[0]["token_id"])).returncode == 0

    log: list[ServerLog] = []
    async with http_gateway(config, log) as url, httpx2.AsyncClient(timeout=timeout) as anonymous_http:
        anonymous = RawHttpSession(anonymous_http, url)
        await anonymous.open()
        await ended_after(anonymous_http, url, anonymous, add_alice)
        headers = {"Authorization": f"Bearer {issued[0]['token']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=timeout) as alice_http:
            alice = RawHttpSession(alice_http, url)
            await alice.open()
            # The session opened without credentials is no one's: alice's request carrying its id is refused.
            adopted = await alice_http.post(url, json=_INITIALIZE, headers=anonymous.headers())
            assert adopted.status_code == 404
            await issue(tmp_path, "alice")  # another token of alice's: the stream's own token is what is checked
            await ended_after(alice_http, url, alice, revoke_alice)
            assert (await alice_http.get(url, headers=alice.headers())).status_code == 401
        bob = {"Authorization": f"Bearer {(await issue(tmp_path, 'bob'))['token']}"}
        async with httpx2.AsyncClient(headers=bob, timeout=timeout) as bob_http:

            async def revoke_bob() -> None:
                assert (await cli(tmp_path, "principal", "revoke", "bob")).returncode == 0

            await ended_after(bob_http, url, None, revoke_bob)
    assert log[0].text.count("an open HTTP stream from 127.0.0.1 would no longer be let in: ended") == 3
    assert "Traceback" not in log[0].text and "ASGI" not in log[0].text


@pytest.mark.anyio
async def test_a_request_carrying_two_authorization_headers_is_refused_whichever_comes_first(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, http={"token": SHARED})
    alice = await issue(tmp_path, "alice")
    accept = ("Accept", "application/json, text/event-stream")
    body = json.dumps(_INITIALIZE).encode()
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        for pair in ((alice["token"], SHARED), (alice["token"], "mcpa_0badc0de_" + alice["token"][14:])):
            for first, second in (pair, pair[::-1]):
                headers = [accept, ("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
                answer = await http.post(url, content=body, headers=[*headers, ("Content-Type", "application/json")])
                assert answer.status_code == 400 and answer.json()["error"] == "invalid_request", answer.text
        assert await status(http, url, alice["token"]) == 200


@pytest.mark.anyio
async def test_a_gateway_started_with_principals_requires_authentication_while_its_store_is_moved_aside(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    alice = await issue(tmp_path, "alice")
    store = tmp_path / ".mcp-armor" / "principals.db"
    bare = {"Accept": "application/json, text/event-stream"}
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        store.rename(store.with_suffix(".old"))  # a restore from backup, say: for a moment there is no store
        assert (await http.post(url, json=_INITIALIZE, headers=bare)).status_code == 401
        assert await status(http, url, alice["token"]) == 401
        store.with_suffix(".old").rename(store)
        assert (await http.post(url, json=_INITIALIZE, headers=bare)).status_code == 401
        assert await status(http, url, alice["token"]) == 200


@pytest.mark.anyio
async def test_a_principals_store_that_cannot_be_read_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    store = tmp_path / ".mcp-armor" / "principals.db"
    store.parent.mkdir()
    store.write_bytes(b"not a database " * 500)
    async with gateway_process(config, "--http", "127.0.0.1:0") as (proc, log):
        with anyio.fail_after(30):
            assert await proc.wait() == 2
    lines = [line for line in log.text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mcp-armor: error: {store}: "), lines


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("add", "bad name"), "principal name 'bad name' must match"),
        (("add", "alice", "--expires", "2020-01-01"), "--expires: 2020-01-01T00:00:00.000Z is not in the future"),
        (("add", "alice", "--expires", "soon"), "--expires: expected a duration"),
        (("add", "alice", "--expires", "99999999999d"), "--expires: '99999999999d' is further than a date can be"),
        (("revoke", "nobody"), "no principal or token 'nobody'"),
    ],
)
def test_principal_command_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], error: str) -> None:
    write_config(tmp_path, {})
    result = run_cli("principal", *args, "--config", str(tmp_path / "upstreams.toml"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"mcp-armor: error: {error}") and result.stderr.count("\n") == 1


@pytest.mark.anyio
async def test_serving_beyond_loopback_with_neither_token_nor_principal_is_warned_about(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    warning = r"serving on 0\.0\.0\.0 without \[gateway\.http\] token or any principal"
    async with gateway_process(config, "--http", "0.0.0.0:0") as (_, log):
        await log.wait_for(warning, seconds=30)
    await issue(tmp_path, "alice")
    async with gateway_process(config, "--http", "0.0.0.0:0") as (_, log):
        await log.wait_for(r"serving streamable HTTP at", seconds=30)
        assert re.search(warning, log.text) is None
