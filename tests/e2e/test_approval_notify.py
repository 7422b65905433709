"""Approval notices end to end: a real gateway process, a real MCP client, and a real HTTP receiver.

A call a rule asks about waits in the queue (the client cannot elicit) and is announced to
`[gateway.approvals] notify`; it is decided in the queue as `mcp-armor approvals` would, and completes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.audit.approvals import ApprovalQueue
from gateway.config.models import load_config
from tests.conftest import NOTES_NEED_APPROVAL, ServerLog, fixture_upstream, http_gateway, text_of, write_config

pytestmark = pytest.mark.anyio

POLICY = NOTES_NEED_APPROVAL
SECRET = "AKIAIOSFODNN7EXAMPLE"
"""An argument the audit masks (an AWS access key id): never in a notice."""
TOKEN = "notice-token-5f1c2a"
CONSOLE = "https://gateway.internal/console/"
NOTE = {"path": "notes/today", "body": f"deploy key {SECRET}"}
HANG = -1
"""A status the receiver never answers with: it holds the request until released."""


class Receiver:
    """A local HTTP server recording each POST and answering with the next of `statuses` (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered = 0
        self.release = threading.Event()
        self._changed = threading.Condition()

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("content-length", "0")))
        with self._changed:
            self.requests.append(({key.lower(): value for key, value in request.headers.items()}, body))
            status = self.statuses.pop(0) if self.statuses else 200
            self._changed.notify_all()
        if status == HANG:
            self.release.wait(60)
            return
        request.send_response(status)
        request.send_header("content-length", "0")
        request.end_headers()
        with self._changed:
            self.answered += 1

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """The JSON of the first `count` notices, once they have arrived."""

        def arrived() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: len(self.requests) >= count, timeout=30)

        with anyio.fail_after(40):
            assert await anyio.to_thread.run_sync(arrived), f"{len(self.requests)} of {count} notices arrived"
        return [json.loads(body) for _, body in self.requests[:count]]


@contextmanager
def receiving(receiver: Receiver) -> Iterator[str]:
    """Serve `receiver` on a free local port; yield the notice address (a query carrying a secret)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/approvals?key=query-secret"
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@asynccontextmanager
async def gateway(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Client, ServerLog]]:
    """A gateway process over streamable HTTP announcing approvals to `url`, and a client that cannot elicit."""
    monkeypatch.setenv("NOTICE_TOKEN", TOKEN)
    approvals = {
        "notify": url,
        "notify_headers": {"Authorization": "Bearer ${NOTICE_TOKEN}"},
        "console_url": CONSOLE,
    }
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY, approvals=approvals)
    log: list[ServerLog] = []
    async with (
        http_gateway(config, log) as mcp_url,
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
        Client(streamable_http_client(mcp_url, http_client=http)) as client,
    ):
        yield client, log[0]


def decide(tmp_path: Path, entry_id: str, *, approve: bool = True) -> None:
    """Decide a waiting approval in the queue, as `mcp-armor approvals` does."""
    queue = ApprovalQueue(load_config(tmp_path / "upstreams.toml").approvals_path)
    queue.decide(entry_id, approve=approve, by="tester", channel="cli")


async def call_decided(client: Client, tmp_path: Path, receiver: Receiver, *, approve: bool = True) -> Any:
    """Call `box__write_note`; once its first notice arrives, decide it. The call's result and that notice."""
    results: list[types.CallToolResult] = []
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (first,) = await receiver.wait_for(1)
        decide(tmp_path, first["approval"]["id"], approve=approve)
    return results[0], first


async def test_an_asked_call_is_announced_once_and_completes_once_decided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()
    with receiving(receiver) as url:
        async with gateway(tmp_path, url, monkeypatch) as (client, _):
            with anyio.fail_after(60):
                result, notice = await call_decided(client, tmp_path, receiver)
            assert not result.is_error and text_of(result) == "stored notes/today"
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    assert headers["content-type"] == "application/json" and headers["authorization"] == f"Bearer {TOKEN}"
    assert SECRET.encode() not in body
    approval = notice["approval"]
    entry_id = approval["id"]
    link = f"{CONSOLE}#approval-{entry_id}"
    assert notice["console"] == link
    assert "`box__write_note`" in notice["text"] and f"(id {entry_id})" in notice["text"]
    assert "; `rule 'notes-need-approval' needs a person's approval: notes are written to disk`; " in notice["text"]
    assert notice["text"].endswith(f"\nDecide: {link}")
    assert approval["status"] == "pending" and approval["tool"] == "box__write_note"
    assert approval["rules"] == ["notes-need-approval"]
    assert approval["arguments"]["path"] == "notes/today"
    assert approval["arguments"]["body"].startswith("deploy key ") and SECRET not in approval["arguments"]["body"]


async def test_a_notice_answered_500_twice_arrives_on_the_third_attempt_and_no_secret_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver(500, 500)
    with receiving(receiver) as url:
        async with gateway(tmp_path, url, monkeypatch) as (client, log):
            results: list[types.CallToolResult] = []
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    results.append(await client.call_tool("box__write_note", NOTE))

                tg.start_soon(call)
                notices = await receiver.wait_for(3)
                decide(tmp_path, notices[0]["approval"]["id"], approve=False)
            assert results[0].is_error and "denied by tester (cli)" in text_of(results[0])
            port = url.split(":")[2].split("/")[0]
            address = f"http://127.0.0.1:{port}/hooks/…"
            await log.wait_for(rf"to {address} failed \(attempt 2\): answered 500; trying again in 2s")
    assert len(receiver.requests) == 3 and receiver.answered == 3
    assert len({notice["approval"]["id"] for notice in notices}) == 1
    assert all(headers["authorization"] == f"Bearer {TOKEN}" for headers, _ in receiver.requests)
    assert f"to {address} failed (attempt 1): answered 500; trying again in 1s" in log.text
    assert TOKEN not in log.text and "query-secret" not in log.text and SECRET not in log.text


async def test_a_receiver_that_never_answers_does_not_hold_up_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver(HANG)
    with receiving(receiver) as url:
        async with gateway(tmp_path, url, monkeypatch) as (client, _):
            with anyio.fail_after(60):
                result, _ = await call_decided(client, tmp_path, receiver)
            assert not result.is_error and text_of(result) == "stored notes/today"
            # The call went ahead while its notice was still held unanswered by the receiver.
            assert receiver.answered == 0 and not receiver.release.is_set()
