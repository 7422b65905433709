"""Gateway replicas behind HAProxy running docs/deploy/haproxy.cfg: handshake-era sessions stay with the
replica that opened them, stateless 2026-07-28 requests go to any, and a session's id at a replica that
does not hold it is answered 404 (so its client opens a new session).

Which replica served a call is told by the toolbox's `pid` tool: each replica runs its own toolbox.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.downstream.http_edge import SESSION_NOT_FOUND
from gateway.store.postgres import Database
from tests.conftest import ALLOW_ALL, REPO, ServerLog, fixture_upstream, http_gateway, text_of, write_config
from tests.e2e.test_approval_queue import until
from tests.e2e.test_http_and_cli import TOKEN, RawHttpSession
from tests.postgres import Cluster
from tests.replicas import Replicas, proxy_config, running_replicas

pytestmark = pytest.mark.anyio

SESSIONS = 60
CALLS = 5
UPSTREAMS = {"box": fixture_upstream("toolbox.py")}


def exported(config: Path) -> list[dict[str, Any]]:
    """Every audit event, through `mcp-armor audit export` (JSON lines), whichever store holds them."""
    command = [sys.executable, "-m", "gateway", "audit", "export", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


async def one_session(gateways: Replicas, served: dict[int, list[str]], number: int) -> None:
    """A real SDK client through the proxy: `CALLS` calls of `box__pid`, each answered by its toolbox."""
    async with (
        gateways.client() as http,
        Client(streamable_http_client(gateways.url, http_client=http), mode="legacy") as client,
    ):
        for _ in range(CALLS):
            answered = await client.call_tool("box__pid", {})
            assert not answered.is_error, text_of(answered)
            served.setdefault(number, []).append(text_of(answered))


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_many_handshake_sessions_through_the_proxy_each_stay_with_the_replica_that_opened_it(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    """60 concurrent sessions of 5 calls each: every call is answered by its session's replica, the sessions
    spread over all three replicas, and the audit log holds one decision and one outcome per call. With a
    shared store, each session is recorded as held by one replica, and closed once the replicas stop."""
    store_url = request.getfixturevalue("store_url") if store == "postgresql" else None
    served: dict[int, list[str]] = {}
    async with running_replicas(tmp_path, UPSTREAMS, 3, policy=ALLOW_ALL, store_url=store_url) as gateways:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for number in range(SESSIONS):
                    tg.start_soon(one_session, gateways, served, number)
    assert len(served) == SESSIONS
    assert all(len(set(pids)) == 1 and len(pids) == CALLS for pids in served.values()), served
    assert len({pids[0] for pids in served.values()}) == 3  # every replica's toolbox answered some session
    events = exported(gateways.config)
    kinds = Counter((event["call_id"], event["kind"]) for event in events if event["kind"] in ("decision", "outcome"))
    per_call = Counter(call for call, _ in kinds)
    assert len(per_call) == SESSIONS * CALLS
    assert set(kinds.values()) == {1} and set(per_call.values()) == {2}
    decided = [event for event in events if event["kind"] == "decision"]
    assert {event["tool"] for event in decided} == {"box__pid"}
    assert len({event["session_id"] for event in decided}) == SESSIONS
    if store_url is not None:
        rows = session_rows(store_url)
        assert len(rows) == SESSIONS and all(row[3] is not None for row in rows.values())
        held = Counter(row[0] for row in rows.values())
        pids = {f"{socket.gethostname()}:{replica.process.pid}" for replica in gateways.replicas}
        assert set(held) == pids


async def test_stateless_2026_requests_are_served_by_every_replica(tmp_path: Path) -> None:
    """A 2026-07-28 client's requests carry no session: the proxy spreads them, and each is served."""
    async with (
        running_replicas(tmp_path, UPSTREAMS, 3, policy=ALLOW_ALL) as gateways,
        gateways.client() as http,
        Client(streamable_http_client(gateways.url, http_client=http), mode="auto") as client,
    ):
        assert client.protocol_version == "2026-07-28"
        answered = [await client.call_tool("box__pid", {}) for _ in range(12)]
    assert not any(answer.is_error for answer in answered)
    assert len({text_of(answer) for answer in answered}) == 3


async def test_a_session_id_at_a_replica_that_does_not_hold_it_is_answered_404(tmp_path: Path) -> None:
    """The id of a session opened through the proxy, sent straight to another replica, is answered as an
    unknown session (404), so the client opens a new one; at its own replica it is served. A foreign Host
    or Origin through the proxy is refused by the replica."""
    async with running_replicas(tmp_path, UPSTREAMS, 2, policy=ALLOW_ALL) as gateways, gateways.client() as http:
        session = RawHttpSession(http, gateways.url)
        await session.open()
        holder = None
        for replica in gateways.replicas:
            session.url = replica.url
            answer = await session.post({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
            if answer.status_code == 200:
                holder = replica
            else:
                assert answer.status_code == 404
                assert answer.json()["error"]["code"] == SESSION_NOT_FOUND["code"]
        assert holder is not None
        # Host and Origin pass the proxy unchanged and are the replicas' to check: only `allowed_hosts` pass.
        session.url = gateways.url
        ping = {"jsonrpc": "2.0", "id": 8, "method": "ping"}
        foreign_host = await http.post(gateways.url, json=ping, headers={**session.headers(), "host": "evil.example"})
        foreign_origin = {**session.headers(), "origin": "https://evil.example"}
        assert (
            foreign_host.status_code,
            (await http.post(gateways.url, json=ping, headers=foreign_origin)).status_code,
        ) == (421, 403)


async def test_a_killed_replica_is_taken_out_and_its_sessions_answer_404_elsewhere(tmp_path: Path) -> None:
    """Once a replica is killed, its session's next request is routed to a live one (404 there: the client
    opens a new session), and new sessions are served by the replicas left."""
    async with running_replicas(tmp_path, UPSTREAMS, 2, policy=ALLOW_ALL) as gateways, gateways.client() as http:
        session = RawHttpSession(http, gateways.url)
        await session.open()
        holder = [replica for replica in gateways.replicas if await _direct(session, replica.url) == 200]
        assert len(holder) == 1
        await gateways.kill(holder[0])
        session.url = gateways.url
        assert (await session.post({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})).status_code == 404
        again = RawHttpSession(http, gateways.url)
        await again.open()


async def _direct(session: RawHttpSession, url: str) -> int:
    through = session.url
    session.url = url
    try:
        return (await session.post({"jsonrpc": "2.0", "id": 9, "method": "ping"})).status_code
    finally:
        session.url = through


def test_the_shipped_config_is_used_with_only_its_addresses_and_servers_replaced(tmp_path: Path) -> None:
    shipped = (REPO / "docs" / "deploy" / "haproxy.cfg").read_text(encoding="utf-8")
    made = proxy_config(shipped, 4711, tmp_path / "proxy.pem", [("a", 1), ("b", 2)])
    changed = {line.strip() for line in set(made.splitlines()) ^ set(shipped.splitlines())}
    assert {line for line in changed if line.startswith("server ")} == {
        "server a 127.0.0.1:1",
        "server b 127.0.0.1:2",
        "server replica1 10.0.0.11:8765",
        "server replica2 10.0.0.12:8765",
        "server replica3 10.0.0.13:8765",
    }
    assert {line for line in changed if not line.startswith("server ")} == {
        "bind :443 ssl crt /etc/haproxy/certs/mcp-armor.pem alpn http/1.1",
        f"bind 127.0.0.1:4711 ssl crt {tmp_path / 'proxy.pem'} alpn http/1.1",
    }


def session_rows(store_url: str) -> dict[str, tuple[Any, ...]]:
    """The store's session records, by id: (replica, principal, transport, closed)."""
    with Database(store_url).session() as db:
        rows = db.execute("SELECT id, replica, principal, transport, closed FROM sessions").fetchall()
    return {row[0]: tuple(row[1:]) for row in rows}


async def test_with_a_store_a_request_at_the_wrong_replica_is_told_which_replica_holds_its_session(
    tmp_path: Path, store_url: str
) -> None:
    """Two replicas on one store: each records the sessions it opens; a session's request sent straight to
    the other replica is answered 404 naming the replica that holds it, with one warning line there. A
    made-up id is answered as ever; the records are closed when the replicas stop."""
    async with running_replicas(tmp_path, UPSTREAMS, 2, policy=ALLOW_ALL, store_url=store_url) as gateways:
        first, second = gateways.replicas
        holder = f"{socket.gethostname()}:{first.process.pid}"
        async with gateways.client() as http:
            session = RawHttpSession(http, first.url)
            await session.open()
            await until(lambda: session.id in session_rows(store_url))  # written off the request's path
            assert session_rows(store_url)[session.id] == (holder, None, "http", None)
            session.url = second.url
            misrouted = await session.post({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
            assert misrouted.status_code == 404
            error = misrouted.json()["error"]
            assert error["code"] == SESSION_NOT_FOUND["code"]
            assert f"lives on replica {holder}" in error["message"] and "mcp-session-id" in error["message"]
            await second.log.wait_for(rf"a request for a session held by replica {re.escape(holder)} reached replica")
            assert second.log.text.count("a request for a session held by replica") == 1
            session.id = uuid.uuid4().hex
            unknown = await session.post({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})
            assert (unknown.status_code, unknown.json()["error"]) == (404, SESSION_NOT_FOUND)
    (row,) = session_rows(store_url).values()
    assert row[0] == holder and row[3] is not None


async def test_a_session_opens_while_the_store_is_away_and_its_record_follows(
    tmp_path: Path, store_url: str, postgres: Cluster
) -> None:
    """The store stopped: a session still opens and is served, an unknown session id is answered 404 as
    ever, the replica logs one line; once the store is back the record is written."""
    async with running_replicas(tmp_path, UPSTREAMS, 1, policy=ALLOW_ALL, store_url=store_url) as gateways:
        (replica,) = gateways.replicas
        postgres.stop("fast")
        try:
            async with gateways.client() as http:
                session = RawHttpSession(http, gateways.url)
                await session.open()
                assert (await session.reply(2, "tools/call", {"name": "box__pid", "arguments": {}}))["result"]
                # Where an unknown session lives cannot be asked: it is answered as unknown, as ever.
                unknown = {**session.headers(), "mcp-session-id": uuid.uuid4().hex}
                answer = await http.post(
                    gateways.url, json={"jsonrpc": "2.0", "id": 3, "method": "ping"}, headers=unknown
                )
                assert (answer.status_code, answer.json()["error"]) == (404, SESSION_NOT_FOUND)
            await replica.log.wait_for(r"session records: .* sessions are served as ever")
        finally:
            postgres.start()
        await until(lambda: session.id in session_rows(store_url))  # the writer retries every RETRY seconds
        assert replica.log.text.count("sessions are served as ever") == 1
        assert "armor-test-secret" not in replica.log.text


async def test_the_health_endpoint_answers_without_credentials_and_logs_nothing(tmp_path: Path) -> None:
    """A gateway that requires a token answers `GET /healthz` (and `HEAD`) 200 `ok` without one, with no log
    line; every other path still requires the token, and `/healthz` takes nothing but GET and HEAD."""
    config = write_config(tmp_path, UPSTREAMS, http={"token": TOKEN})
    logs: list[ServerLog] = []
    async with http_gateway(config, logs) as url, httpx2.AsyncClient(timeout=10) as http:
        health = url.removesuffix("/mcp") + "/healthz"
        checked = await http.get(health)
        assert (checked.status_code, checked.text, checked.headers["cache-control"]) == (200, "ok\n", "no-store")
        assert (await http.head(health)).status_code == 200
        assert (await http.post(health, json={})).status_code == 401
        assert (await http.get(url)).status_code == 401
        assert (await http.get(health + "/x")).status_code == 401
        # The health checks came first: any line of theirs would be in the log before these three.
        await logs[0].wait_for(r"(?s)(was refused.*){3}")
    assert logs[0].text.count("was refused") == 3
