"""The console's guard, against its ASGI app: the token exchange, Host, CSRF and Origin, the headers,
the roles of principals, and decisions made through it (recorded in the audit log first)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from gateway.audit.approvals import ApprovalQueue, AskedCall, Status
from gateway.catalog.pins import Lock
from gateway.config.models import Config, load_config
from gateway.console.access import CSP, SESSION_LIFETIME, AccessToken, PrincipalGate, Sessions, Viewer
from gateway.console.app import MAX_BODY, console_app
from gateway.console.serve import console_gate
from gateway.errors import ConfigError
from gateway.principals.store import LocalTokens, PrincipalStore
from tests.conftest import events, fixture_upstream, run_cli, write_config
from tests.e2e.test_http_edge import _self_signed

pytestmark = pytest.mark.anyio

HOSTS = ["127.0.0.1:9999", "localhost:9999"]
BASE = "http://127.0.0.1:9999"
ORIGIN = {"origin": BASE}


def _config(tmp_path: Path, **settings: Any) -> Config:
    return load_config(write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, **settings))


def _client(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=BASE)


async def _signed_in(http: httpx2.AsyncClient, token: str) -> str:
    """Exchange the token for the session cookie; the page's CSRF token."""
    answer = await http.get("/console/", params={"token": token})
    assert answer.status_code == 303, answer.text
    page = await http.get("/console/")
    assert page.status_code == 200
    return page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def _ask(config: Config, tool: str = "box__write_note") -> str:
    call = AskedCall(
        call_id="c1",
        session="s1",
        client="agent",
        principal="",
        tool=tool,
        upstream="box",
        upstream_tool="write_note",
        arguments={"path": "notes/a.txt", "body": "<img src=x onerror=alert(1)>"},
        rules=("writes-need-approval",),
        reason="writes need a person",
        revision="r1",
    )
    return ApprovalQueue(config.approvals_path).ask(call, "binding-1", 60).id


async def test_the_url_token_becomes_an_httponly_strict_cookie_and_leaves_the_address(tmp_path: Path) -> None:
    gate = AccessToken()
    async with _client(console_app(_config(tmp_path), gate, HOSTS, tls=False)) as http:
        answer = await http.get("/console/", params={"token": gate.token})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("mcpa_console=") and gate.token not in cookie
        parts = {part.strip().split("=")[0] for part in cookie.split(";")}
        assert {"HttpOnly", "SameSite", "Path"} <= parts and "Secure" not in parts
        assert "SameSite=Strict" in cookie and "Path=/console" in cookie
        page = await http.get("/console/")
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"
        assert '<meta name="csrf-token" content="' in page.text and "__CSRF_TOKEN__" not in page.text
        assert "<script>" not in page.text and "style=" not in page.text  # nothing inline for the CSP to refuse
        script = await http.get("/console/static/console.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text
        assert (await http.get("/console/static/../access.py")).status_code == 404


async def test_a_secure_cookie_over_tls(tmp_path: Path) -> None:
    gate = AccessToken()
    app = console_app(_config(tmp_path), gate, HOSTS, tls=True)
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="https://127.0.0.1:9999") as http:
        answer = await http.get("/console/", params={"token": gate.token})
        assert "; Secure" in answer.headers["set-cookie"]


async def test_a_wrong_token_or_no_cookie_is_401_and_sets_nothing(tmp_path: Path) -> None:
    gate = AccessToken()
    async with _client(console_app(_config(tmp_path), gate, HOSTS, tls=False)) as http:
        wrong = await http.get("/console/", params={"token": gate.token[:-1] + "x"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        assert wrong.headers["content-security-policy"] == CSP
        for path in ("/console/", "/console/state", "/console/events", "/console/static/console.js"):
            assert (await http.get(path)).status_code == 401, path
        forged = await http.get("/console/state", headers={"cookie": "mcpa_console=made-up"})
        assert forged.status_code == 401


async def test_a_foreign_host_is_refused_before_anything_else(tmp_path: Path) -> None:
    gate = AccessToken()
    async with _client(console_app(_config(tmp_path), gate, HOSTS, tls=False)) as http:
        answer = await http.get("/console/", params={"token": gate.token}, headers={"host": "attacker.example:9999"})
        assert answer.status_code == 421 and "set-cookie" not in answer.headers
        await _signed_in(http, gate.token)
        assert (await http.get("/console/state", headers={"host": "attacker.example"})).status_code == 421
        assert (await http.get("/console/state", headers={"host": "localhost:9999"})).status_code == 200


async def test_a_post_needs_the_csrf_token_and_the_consoles_own_origin(tmp_path: Path) -> None:
    config = _config(tmp_path)
    entry = _ask(config)
    gate = AccessToken()
    body = {"approve": True, "binding": "binding-1"}
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        path = f"/console/approvals/{entry}"
        assert (await http.post(path, json=body, headers=ORIGIN)).status_code == 403
        assert (await http.post(path, json=body, headers={**ORIGIN, "x-csrf-token": "guess"})).status_code == 403
        assert (await http.post(path, json=body, headers={"x-csrf-token": csrf})).status_code == 403  # no Origin
        foreign = {"origin": "http://attacker.example", "x-csrf-token": csrf}
        assert (await http.post(path, json=body, headers=foreign)).status_code == 403
        other_port = {"origin": "http://127.0.0.1:1", "x-csrf-token": csrf}
        assert (await http.post(path, json=body, headers=other_port)).status_code == 403
        assert ApprovalQueue(config.approvals_path).get(entry).status is Status.PENDING  # type: ignore[union-attr]
        answer = await http.post(path, json=body, headers={**ORIGIN, "x-csrf-token": csrf})
        assert answer.status_code == 200, answer.text
    decided = ApprovalQueue(config.approvals_path).get(entry)
    assert decided is not None and decided.status is Status.APPROVED and decided.channel == "console"
    assert decided.decided_by is not None and decided.decided_by.startswith("console (")


async def test_a_denial_is_recorded_before_it_is_taken_and_a_second_decision_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    entry = _ask(config)
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        headers = {**ORIGIN, "x-csrf-token": csrf}
        state = (await http.get("/console/state")).json()
        (pending,) = next(m for m in state if m["type"] == "approvals")["pending"]
        assert pending["id"] == entry and pending["rule"] == "writes-need-approval"
        assert '"body": "<img src=x onerror=alert(1)>"' in pending["args"]  # as text: the page sets textContent
        deny = {"approve": False, "binding": pending["binding"], "note": "not that file"}
        assert (await http.post(f"/console/approvals/{entry}", json=deny, headers=headers)).status_code == 200
        again = await http.post(f"/console/approvals/{entry}", json={**deny, "approve": True}, headers=headers)
        assert again.status_code == 409 and "denied" in again.json()["error"]
        wrong_binding = {"approve": True, "binding": "another-call"}
        other = _ask(config)
        assert (await http.post(f"/console/approvals/{other}", json=wrong_binding, headers=headers)).status_code == 409
        malformed = await http.post(f"/console/approvals/{other}", content=b"approve", headers=headers)
        assert malformed.status_code == 400
    (approval,) = [event for event in events(tmp_path) if event["kind"] == "approval"]
    assert approval["entry"] == entry and approval["approval"] == "denied" and approval["channel"] == "console"
    assert approval["note"] == "not that file" and approval["tool"] == "box__write_note"
    assert approval["call_id"] == "c1" and approval["session_id"] == "s1" and approval["by"].startswith("console (")


async def test_an_in_memory_audit_log_is_said_to_be_not_on_disk(tmp_path: Path) -> None:
    config = _config(tmp_path, audit=":memory:")
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        await _signed_in(http, gate.token)
        state = (await http.get("/console/state")).json()
    assert state[0] == {"type": "hello", "viewer": state[0]["viewer"], "approver": True, "on_disk": False}
    integrity = next(m for m in state if m["type"] == "integrity")
    assert "not on disk" in integrity["status"]


def _principal(config: Config, name: str, *roles: str) -> str:
    return PrincipalStore(config.principals_path).add(name, roles, record=lambda issued: None).token


async def test_principals_approve_watch_or_are_refused_by_role_and_a_revocation_ends_the_session(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    approver = _principal(config, "alice", "approver")
    viewer = _principal(config, "bob", "viewer")
    nobody = _principal(config, "carol", "operator")
    gate = PrincipalGate([LocalTokens.open(config.principals_path)])
    app = console_app(config, gate, HOSTS, tls=False)
    entry = _ask(config)
    body = {"approve": True, "binding": "binding-1"}
    async with _client(app) as http:
        refused = await http.get("/console/", params={"token": nobody})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
        assert (await http.get("/console/", params={"token": "mcpa_00000000_" + "x" * 43})).status_code == 401
    async with _client(app) as http:
        csrf = await _signed_in(http, viewer)
        assert (await http.get("/console/state")).json()[0]["approver"] is False
        pins = (await http.get("/console/pins")).json()  # a review starts every upstream: not for watching
        assert pins["pins"] == [] and pins["note"].startswith("definitions to review are shown to approvers")
        answer = await http.post(f"/console/approvals/{entry}", json=body, headers={**ORIGIN, "x-csrf-token": csrf})
        assert answer.status_code == 403
    async with _client(app) as http:
        csrf = await _signed_in(http, approver)
        PrincipalStore(config.principals_path).revoke("alice", record=lambda principal, ids: None)
        answer = await http.post(f"/console/approvals/{entry}", json=body, headers={**ORIGIN, "x-csrf-token": csrf})
        assert answer.status_code == 401
    assert ApprovalQueue(config.approvals_path).get(entry).status is Status.PENDING  # type: ignore[union-attr]
    async with _client(app) as http:
        csrf = await _signed_in(http, _principal(config, "alice", "approver"))
        answer = await http.post(f"/console/approvals/{entry}", json=body, headers={**ORIGIN, "x-csrf-token": csrf})
        assert answer.status_code == 200
    assert ApprovalQueue(config.approvals_path).get(entry).decided_by == "alice"  # type: ignore[union-attr]


async def test_a_refused_decision_on_a_new_queue_leaves_it_readable(tmp_path: Path) -> None:
    config = _config(tmp_path)
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        body = {"approve": True, "binding": "b"}
        answer = await http.post("/console/approvals/abcdefgh", json=body, headers={**ORIGIN, "x-csrf-token": csrf})
        assert answer.status_code == 409 and "no approval 'abcdefgh'" in answer.json()["error"]
        state = await http.get("/console/state")
        assert state.status_code == 200
        assert next(m for m in state.json() if m["type"] == "approvals")["pending"] == []


async def test_a_pin_approved_in_the_console_is_recorded_then_written_to_the_lock(tmp_path: Path) -> None:
    write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    assert run_cli("lock", "--config", str(tmp_path / "upstreams.toml"), cwd=tmp_path).returncode == 0
    # A second upstream, not pinned yet: everything of it is new.
    config = load_config(
        write_config(tmp_path, {"box": fixture_upstream("toolbox.py"), "more": fixture_upstream("toolbox.py")})
    )
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        headers = {**ORIGIN, "x-csrf-token": csrf}
        listed = (await http.get("/console/pins", timeout=60)).json()
        shown = {pin["selector"]: pin for pin in listed["pins"]}
        assert "more.echo" in shown and not any(selector.startswith("box.") for selector in shown)
        echo = shown["more.echo"]
        assert echo["title"] == "tool more.echo: new" and echo["diff"].startswith("--- (not pinned)")
        stale = await http.post(
            "/console/pins/approve", json={"selector": "more.echo", "digest": "0" * 64}, headers=headers, timeout=60
        )
        assert stale.status_code == 409 and "not what the page showed" in stale.json()["error"]
        assert "more" not in Lock.read(config.lock_path).upstreams  # type: ignore[union-attr]
        answer = await http.post(
            "/console/pins/approve",
            json={"selector": "more.echo", "digest": echo["digest"]},
            headers=headers,
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        again = (await http.get("/console/pins", timeout=60)).json()
        assert "more.echo" not in {pin["selector"] for pin in again["pins"]}
    pins = Lock.read(config.lock_path).upstreams["more"].pins  # type: ignore[union-attr]
    assert [name for _, name in pins] == ["echo"]
    (pin,) = [event for event in events(tmp_path) if event["kind"] == "pin" and event.get("change") == "approved"]
    assert (
        pin["name"] == "echo"
        and pin["reason"].startswith("new; approved by console (")
        and pin["reason"].endswith("(console)")
    )


async def test_a_session_expires_and_an_oversized_decision_is_refused(tmp_path: Path) -> None:
    now = [0.0]
    gate = AccessToken()
    app = console_app(_config(tmp_path), gate, HOSTS, tls=False)
    app.sessions = Sessions(clock=lambda: now[0])
    async with _client(app) as http:
        csrf = await _signed_in(http, gate.token)
        big = await http.post(
            "/console/approvals/abcdefgh", content=b"x" * (MAX_BODY + 1), headers={**ORIGIN, "x-csrf-token": csrf}
        )
        assert big.status_code == 413
        now[0] += SESSION_LIFETIME - 1
        assert (await http.get("/console/state")).status_code == 200
        now[0] += 1
        assert (await http.get("/console/state")).status_code == 401


class _Revoked:
    """A gate that lets a viewer in once, then no longer (as a revoked principal's token)."""

    def __init__(self) -> None:
        self.checks = 0

    async def admit(self, token: str) -> Viewer | None:
        return Viewer("dave", approver=False, credential=token) if token == "dave" else None

    async def still(self, viewer: Viewer) -> bool:
        self.checks += 1
        return self.checks == 1


async def test_the_live_stream_ends_once_its_viewer_is_no_longer_let_in(tmp_path: Path) -> None:
    async with _client(console_app(_config(tmp_path), _Revoked(), HOSTS, tls=False)) as http:
        assert (await http.get("/console/", params={"token": "dave"})).status_code == 303
        with anyio.fail_after(20):
            stream = await http.get("/console/events")  # ends by itself at the first re-check
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    first = json.loads(stream.text.split("data: ", 1)[1].split("\n\n", 1)[0])
    assert first["messages"][0] == {"type": "hello", "viewer": "dave", "approver": False, "on_disk": True}


def test_beyond_loopback_only_over_tls_and_only_for_principals(tmp_path: Path) -> None:
    _self_signed(tmp_path)
    tls = {"tls_certificate": "gateway.crt", "tls_key": "gateway.key"}
    assert isinstance(console_gate(_config(tmp_path), "127.0.0.1")[0], AccessToken)
    with pytest.raises(ConfigError, match="only over TLS"):
        console_gate(_config(tmp_path, http=tls), "0.0.0.0")  # TLS, but no principal
    _principal(_config(tmp_path), "alice", "approver")
    with pytest.raises(ConfigError, match="only over TLS"):
        console_gate(_config(tmp_path), "0.0.0.0")  # principals, but no TLS
    gate, files = console_gate(_config(tmp_path, http=tls), "0.0.0.0")
    assert isinstance(gate, PrincipalGate) and files == (str(tmp_path / "gateway.crt"), str(tmp_path / "gateway.key"))


async def test_a_pin_approved_in_the_console_with_a_store_is_written_to_the_stores_lock(
    tmp_path: Path, store_url: str
) -> None:
    from gateway.catalog.shared_pins import shared_pins

    config_path = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, store=store_url)
    locked = run_cli("lock", "--config", str(config_path), cwd=tmp_path)
    assert locked.returncode == 0, locked.stderr
    config = load_config(
        write_config(
            tmp_path, {"box": fixture_upstream("toolbox.py"), "more": fixture_upstream("toolbox.py")}, store=store_url
        )
    )
    store = shared_pins(config)
    assert store is not None and store.read()[0] == 1
    gate = AccessToken()
    async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
        csrf = await _signed_in(http, gate.token)
        shown = {pin["selector"]: pin for pin in (await http.get("/console/pins", timeout=60)).json()["pins"]}
        assert "more.echo" in shown and not any(selector.startswith("box.") for selector in shown)
        answer = await http.post(
            "/console/pins/approve",
            json={"selector": "more.echo", "digest": shown["more.echo"]["digest"]},
            headers={**ORIGIN, "x-csrf-token": csrf},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert f"{store.label} written" in answer.json()["message"] and "armor-test-secret" not in answer.text
    revision, lock = store.read()
    assert revision == 2 and lock is not None and [name for _, name in lock.upstreams["more"].pins] == ["echo"]
    assert not config.lock_path.exists()


async def test_with_a_store_the_console_shows_the_stores_log_and_queue_and_decides_there(
    tmp_path: Path, store_url: str
) -> None:
    from gateway.audit.shared import SharedAuditStore, SharedRecorder
    from gateway.audit.shared_approvals import approval_queue
    from gateway.audit.store import event
    from gateway.store.postgres import Database

    config = _config(tmp_path, store=store_url)
    recorder = SharedRecorder(Database(store_url))
    call = AskedCall(
        call_id="c1",
        session="s1",
        client="agent",
        principal="",
        tool="box__write_note",
        upstream="box",
        upstream_tool="write_note",
        arguments={"path": "notes/a.txt"},
        rules=("writes-need-approval",),
        reason="writes need a person",
        revision="r1",
    )
    queue = approval_queue(config)
    gate = AccessToken()
    # The recorder stands for this process's gateway: the queue offers only calls whose holder is alive.
    async with recorder.running():
        await recorder.record(
            event("session_start", session_id="s1", client_name="agent", lease=recorder.lease_name),
            event("decision", session_id="s1", call_id="c0", tool="box__echo", decision="allow", rules=["r"]),
            event("outcome", session_id="s1", call_id="c0", tool="box__echo", outcome="ok", duration_ms=1.0),
        )
        entry = await anyio.to_thread.run_sync(lambda: queue.ask(call, "binding-1", 60).id)
        async with _client(console_app(config, gate, HOSTS, tls=False)) as http:
            csrf = await _signed_in(http, gate.token)
            state = (await http.get("/console/state")).json()
            integrity = next(m for m in state if m["type"] == "integrity")
            assert integrity["status"] == "ok" and integrity["head"].startswith("3:")
            assert any(m["type"] == "call" and m["call_id"] == "c0" for m in state)
            (pending,) = next(m for m in state if m["type"] == "approvals")["pending"]
            assert pending["id"] == entry
            approve = {"approve": True, "binding": pending["binding"]}
            headers = {**ORIGIN, "x-csrf-token": csrf}
            answer = await http.post(f"/console/approvals/{entry}", json=approve, headers=headers)
            assert answer.status_code == 200, answer.text
    decided = await anyio.to_thread.run_sync(lambda: queue.get(entry))
    assert decided is not None and decided.status is Status.APPROVED and decided.channel == "console"
    log = SharedAuditStore.open_reader(Database(store_url))
    try:
        (approval,) = [e for e in log.events() if e["kind"] == "approval"]
        assert approval["entry"] == entry and approval["approval"] == "approved"
    finally:
        log.close()
    assert not (tmp_path / ".mcp-armor" / "audit.db").exists()
    queue.close()
