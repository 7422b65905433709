"""Gateway replicas behind HAProxy running docs/deploy/haproxy.cfg: handshake-era sessions stay with the
replica that opened them, stateless 2026-07-28 requests go to any, and a session's id at a replica that
does not hold it is answered 404 (so its client opens a new session).

Which replica served a call is told by the toolbox's `pid` tool: each replica runs its own toolbox.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.downstream.http_edge import SESSION_NOT_FOUND
from tests.conftest import ALLOW_ALL, REPO, fixture_upstream, text_of
from tests.e2e.test_http_and_cli import RawHttpSession
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


async def test_many_handshake_sessions_through_the_proxy_each_stay_with_the_replica_that_opened_it(
    tmp_path: Path,
) -> None:
    """60 concurrent sessions of 5 calls each: every call is answered by its session's replica, the sessions
    spread over all three replicas, and the audit log holds one decision and one outcome per call."""
    served: dict[int, list[str]] = {}
    async with running_replicas(tmp_path, UPSTREAMS, 3, policy=ALLOW_ALL) as gateways:
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
    unknown session (404), so the client opens a new one; at its own replica it is served."""
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
