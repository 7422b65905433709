"""The console against an adversary: a page on another port of the same host (same-site, so it carries the
Strict cookie), bodies built to cost the server, agent strings built to look like something else, a
session outlasting its lifetime on a live stream, and a flood of live streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from gateway.audit.approvals import ApprovalQueue, AskedCall, Status
from gateway.audit.logs import record_first
from gateway.audit.store import event as audit_event
from gateway.config.models import Config
from gateway.console.access import SESSION_LIFETIME, SESSIONS_PER_VIEWER, AccessToken, Sessions
from gateway.console.app import MAX_BODY, MAX_STREAMS, console_app
from gateway.console.feed import AuditFeed, Walks, approval
from tests.console.test_access import HOSTS, ORIGIN, _client, _config, _signed_in
from tests.console.test_console_process import console_process

pytestmark = pytest.mark.anyio


def _waiting(config: Config, **call: object) -> str:
    fields: dict[str, object] = {
        "call_id": "c1",
        "session": "s1",
        "client": "agent",
        "principal": "",
        "tool": "box__write_note",
        "upstream": "box",
        "upstream_tool": "write_note",
        "arguments": {"path": "notes/a.txt", "body": "hello"},
        "rules": ("writes-need-approval",),
        "reason": "writes need a person",
        "revision": "r1",
    }
    return ApprovalQueue(config.approvals_path).ask(AskedCall(**(fields | call)), "binding-1", 60).id  # type: ignore[arg-type]


async def test_a_page_on_a_sibling_port_is_refused_though_its_requests_carry_the_cookie(tmp_path: Path) -> None:
    """Cookies are not port-isolated and SameSite counts 127.0.0.1:3000 as the same site: an <img> there
    pointed at /console/pins would start every upstream, at /console/events hold a stream open."""
    gate = AccessToken()
    async with _client(console_app(_config(tmp_path), gate, HOSTS, tls=False)) as http:
        await _signed_in(http, gate.token)
        for path in ("/console/pins", "/console/events", "/console/state", "/console/"):
            answer = await http.get(path, headers={"sec-fetch-site": "same-site", "sec-fetch-mode": "no-cors"})
            assert answer.status_code == 403, path
        own = await http.get("/console/state", headers={"sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"})
        typed = await http.get("/console/", headers={"sec-fetch-site": "none", "sec-fetch-mode": "navigate"})
        assert own.status_code == 200 and typed.status_code == 200


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for _ in range(size // 4096 + 1):
        yield b" " * 4096


async def test_a_decision_without_a_length_is_cut_at_the_limit_and_a_deep_one_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    entry = _waiting(config)
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        headers = {**ORIGIN, "x-csrf-token": csrf}
        chunked = await http.post(f"/console/approvals/{entry}", content=_chunks(MAX_BODY * 4), headers=headers)
        assert chunked.status_code == 413
        deep = await http.post(f"/console/approvals/{entry}", content=b"[" * (MAX_BODY - 1), headers=headers)
        assert deep.status_code == 400 and "expected" in deep.json()["error"]
    assert ApprovalQueue(config.approvals_path).get(entry).status is Status.PENDING  # type: ignore[union-attr]


def test_an_agents_strings_in_an_approval_cannot_draw_lines_or_reorder_what_follows(tmp_path: Path) -> None:
    """A client name with a right-to-left override, a reason or a session with a line break: written as
    escapes, as the arguments are, so the approval reads as what it is."""
    config = _config(tmp_path)
    entry = _waiting(config, client="agent\u202e)txt.gnp", session="s1\nbody: harmless", tool="box__write_note\u200b")
    shown = approval(ApprovalQueue(config.approvals_path).get(entry))  # type: ignore[arg-type]
    assert shown["client"] == "agent\\u202e)txt.gnp"
    assert shown["session"] == "s1\\nbody: harmless"
    assert shown["tool"] == "box__write_note\\u200b"


async def test_a_client_name_in_the_calls_and_sessions_is_shown_escaped(tmp_path: Path) -> None:
    config = _config(tmp_path)
    start = audit_event("session_start", session_id="s1", client_name="Claude\u2066\u202e", client_version="1")
    decision = audit_event("decision", session_id="s1", call_id="c1", tool="box__write_note\u202e", decision="allow")
    record_first(config, [start, decision], RuntimeError)  # type: ignore[arg-type]
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        await _signed_in(http, gate.token)
        state = (await http.get("/console/state")).json()
    session = next(m for m in state if m["type"] == "session")
    call = next(m for m in state if m["type"] == "call")
    assert session["client"] == "Claude\\u2066\\u202e 1" == call["client"]
    assert call["tool"] == "box__write_note\\u202e"


def _ticks(expire_after: int) -> Iterator[float]:
    for _ in range(expire_after):
        yield 0.0
    while True:
        yield SESSION_LIFETIME + 1


async def test_the_live_stream_ends_when_its_session_expires(tmp_path: Path) -> None:
    """A page left open does not outlive its session: the stream's re-check holds it to its lifetime."""
    gate = AccessToken()
    app = console_app(_config(tmp_path), gate, HOSTS, tls=False)
    ticks = _ticks(2)  # the sign-in, the stream's request; its first re-check finds it expired
    app.sessions = Sessions(clock=lambda: next(ticks))
    async with _client(app) as http:
        assert (await http.get("/console/", params={"token": gate.token})).status_code == 303
        with anyio.fail_after(20):
            stream = await http.get("/console/events")
    assert stream.status_code == 200 and stream.text.startswith("data: ")


async def test_one_viewer_holds_a_bounded_number_of_live_streams(tmp_path: Path) -> None:
    """Each stream looks at the log and the queue four times a second: one viewer cannot open them without end.
    A stream closed gives its place back."""
    async with console_process(_config(tmp_path).path) as (url, _log), httpx2.AsyncClient(timeout=30) as http:
        signed_in = await http.get(url)
        assert signed_in.status_code == 303
        http.cookies = signed_in.cookies
        base = url.split("/console/", 1)[0]
        events = f"{base}/console/events"
        async with AsyncExitStack() as streams:
            for _ in range(MAX_STREAMS):
                answer = await streams.enter_async_context(http.stream("GET", events))
                assert answer.status_code == 200
            refused = await http.get(events)
            assert refused.status_code == 429 and f"{MAX_STREAMS} console pages" in refused.json()["error"]
        with anyio.fail_after(20):  # the server hears of the closed ones as their connections go
            while True:
                async with http.stream("GET", events) as answer:
                    if answer.status_code == 200:
                        break


async def test_the_pages_of_one_console_share_one_walk_of_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk reads the whole log (about 5 s for 200,000 events here): pages opened together take one."""
    walked: list[int] = []
    integrity = AuditFeed.integrity

    def counted(feed: AuditFeed) -> dict[str, Any]:
        walked.append(1)
        return integrity(feed)

    monkeypatch.setattr(AuditFeed, "integrity", counted)
    gate = AccessToken()
    async with _client(console_app(_config(tmp_path), gate, HOSTS, tls=False)) as http:
        await _signed_in(http, gate.token)
        for _ in range(5):
            state = (await http.get("/console/state")).json()
            assert any(message["type"] == "integrity" for message in state)
    assert len(walked) == 1


class _Costly:
    """A feed whose walk takes `cost` seconds of the clock."""

    def __init__(self, now: list[float], cost: float) -> None:
        self.now, self.cost, self.walks = now, cost, 0

    def integrity(self) -> dict[str, str]:
        self.now[0] += self.cost
        self.walks += 1
        return {"type": "integrity", "status": f"walk {self.walks}"}


def test_walks_come_no_closer_than_ten_times_their_cost_and_a_page_takes_one_started_after_it_asked() -> None:
    now = [100.0]
    walks = Walks(10.0, clock=lambda: now[0])
    feed = _Costly(now, 3.0)
    assert walks.integrity(feed, 100.0) == {"type": "integrity", "status": "walk 1"}  # type: ignore[arg-type]
    assert walks.every() == 30.0
    assert walks.integrity(feed, 99.0) == {"type": "integrity", "status": "walk 1"}  # type: ignore[arg-type]
    now[0] = 120.0
    assert not walks.ready(110.0) and walks.integrity(feed, 110.0) is None  # type: ignore[arg-type]
    now[0] = 130.0
    assert walks.ready(110.0)
    assert walks.integrity(feed, 110.0) == {"type": "integrity", "status": "walk 2"}  # type: ignore[arg-type]
    assert feed.walks == 2


async def test_signing_in_again_and_again_keeps_a_bounded_number_of_sessions(tmp_path: Path) -> None:
    """Each use of the URL opens a session, held in memory for 12 hours: one viewer's are bounded, the
    oldest closed first."""
    gate = AccessToken()
    app = console_app(_config(tmp_path), gate, HOSTS, tls=False)
    opened = []
    async with _client(app) as http:
        for _ in range(SESSIONS_PER_VIEWER + 8):
            answer = await http.get("/console/", params={"token": gate.token})
            opened.append(answer.cookies["mcpa_console"])
        assert len(app.sessions._sessions) == SESSIONS_PER_VIEWER
        http.cookies.clear()
        oldest = await http.get("/console/state", headers={"cookie": f"mcpa_console={opened[0]}"})
        newest = await http.get("/console/state", headers={"cookie": f"mcpa_console={opened[-1]}"})
    assert oldest.status_code == 401 and newest.status_code == 200
