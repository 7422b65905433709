"""The approval queue under attack, with real gateway processes and real clients: a queue file others could
have written, an agent flooding the queue, the queue failing while a call waits. Each proves the call is
refused (never let through) and the gateway keeps serving."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.audit.approvals import Status
from gateway.errors import ApprovalsError
from gateway.schema import digest
from tests.conftest import (
    RawSession,
    events,
    fixture_upstream,
    gateway_client,
    gateway_process,
    http_gateway,
    text_of,
    write_config,
)
from tests.e2e.test_approval_queue import NOTE, configure, pending, queue_of, received, until
from tests.e2e.test_http_sessions import two_principals

pytestmark = pytest.mark.anyio

UNAVAILABLE = "the approval queue is unavailable (see the gateway's log)"


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


async def test_a_group_writable_queue_file_refuses_the_call_and_is_left_as_found(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    queue.close_out("none", Status.VOID, "")  # makes the file, empty
    os.chmod(queue.path, 0o660)
    async with gateway_client(config) as client:
        with anyio.fail_after(30):
            refused = await client.call_tool("box__write_note", NOTE)
        assert refused.is_error and UNAVAILABLE in text_of(refused)
        assert not (await client.call_tool("box__echo", {"text": "still serving"})).is_error
    assert os.stat(queue.path).st_mode & 0o777 == 0o660
    os.chmod(queue.path, 0o600)
    assert queue.entries() == []
    assert received(record) == [{"text": "still serving"}]


def future_schema(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA user_version = 2")


def unknown_status(db: sqlite3.Connection) -> None:
    db.execute("UPDATE approvals SET status = 'approved-by-mallory'")


@pytest.mark.parametrize("spoil", [future_schema, unknown_status])
async def test_a_queue_spoiled_while_a_call_waits_refuses_it_and_the_gateway_keeps_serving(
    tmp_path: Path, record: Path, spoil: Callable[[sqlite3.Connection], None]
) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    results: list[types.CallToolResult] = []
    async with gateway_client(config) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        await pending(queue)
        with closing(sqlite3.connect(queue.path)) as db, db:
            spoil(db)
        await until(lambda: results)
        assert not (await client.call_tool("box__echo", {"text": "still serving"})).is_error
    (result,) = results
    assert result.is_error and UNAVAILABLE in text_of(result)
    assert received(record) == [{"text": "still serving"}]


async def test_a_2026_agent_asking_without_end_leaves_at_most_max_calls_per_session_waiting(
    tmp_path: Path, record: Path
) -> None:
    """A 2026-07-28 call that asks returns `input_required` at once, so no limit on calls in flight holds
    back an agent that never retries: the queue takes `max_calls_per_session` of its session's approvals."""
    config = configure(tmp_path, record, max_calls_per_session=3)
    queue = queue_of(config)

    async def never(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        raise AssertionError("the agent never retries")

    async with gateway_client(config, mode="auto", elicitation=never) as client:
        for number in range(8):
            asked = await client.session.call_tool(
                "box__write_note", {**NOTE, "body": str(number)}, allow_input_required=True
            )
            assert isinstance(asked, types.InputRequiredResult)  # its own client can still be asked
        assert not (await client.call_tool("box__echo", {"text": "still serving"})).is_error
        waiting = queue.entries(pending_only=True)  # while its gateway holds them
    assert sorted(entry.call.arguments["body"] for entry in waiting) == ["0", "1", "2"]
    assert received(record) == [{"text": "still serving"}]


MASKED = """
[defaults]
effect = "allow"

[[rule]]
id = "notes-need-approval"
tools = ["box__write_note"]
effect = "ask"
mask = ["body"]
"""


async def test_a_masked_value_cannot_be_tested_against_the_binding_the_queue_shows(tmp_path: Path) -> None:
    """The queue (and each notice) shows the binding beside the masked arguments: were it a plain hash of
    the call, a reader could try guesses of the masked value (a password, a PIN) until one matched."""
    box = fixture_upstream("toolbox.py")
    config = write_config(tmp_path, {"box": box}, policy=MASKED)
    queue = queue_of(config)
    sent = {"path": "notes/p", "body": "hunter2"}
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "box__write_note", sent)
        (entry,) = await pending(queue)
        tg.cancel_scope.cancel()
    shown = entry.call
    assert shown.arguments["body"].startswith("[masked:policy:")
    catalog = [event for event in events(tmp_path) if event["kind"] == "catalog"]
    (definition,) = {event["tool_digest"] for event in catalog if event["tool"] == "box__write_note"}
    who = {"session": shown.session, "principal": shown.principal, "tool": shown.tool, "upstream": shown.upstream}
    guess = {**who, "definition": definition, "arguments": sent, "revision": shown.revision, "forwarded": sent}
    assert digest(guess) != entry.binding
    assert all(b"hunter2" not in file.read_bytes() for file in queue.path.parent.glob("approvals.db*"))


async def test_an_approval_whose_gateway_was_killed_cannot_be_approved_and_reads_as_expired(
    tmp_path: Path, record: Path
) -> None:
    """`kill -9` leaves the row pending (nobody closed it): approving it would read as approved, yet no
    process is left to spend it. The decision is refused and the row closed, saying why."""
    config = configure(tmp_path, record)
    queue = queue_of(config)
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await raw.initialize()
        await raw.send(raw.call(1, "box__write_note", NOTE))
        (entry,) = await pending(queue)
        proc.kill()
        with anyio.fail_after(20):
            await proc.wait()
    assert entry.call.gateway == f"{os.uname().nodename}:{proc.pid}"
    assert queue.entries(pending_only=True) == []  # not offered to anyone to decide
    with pytest.raises(ApprovalsError, match=f"the gateway holding it \\({entry.call.gateway}\\) is gone"):
        queue.decide(entry.id, approve=True, by="alice", channel="cli")
    gone = queue.get(entry.id)
    assert gone is not None and gone.status is Status.EXPIRED and gone.decided_by is None
    assert queue.entries(pending_only=True) == []
    assert received(record) == []


async def test_the_same_call_made_twice_at_once_waits_twice_and_one_approval_releases_one(
    tmp_path: Path, record: Path
) -> None:
    """Both waiting calls have the same binding: each still has its own entry, and an approval is spent by
    the call it was given for only."""
    config = configure(tmp_path, record)
    queue = queue_of(config)
    results: list[types.CallToolResult] = []
    async with gateway_client(config) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        tg.start_soon(call)
        first, second = await pending(queue, 2)
        assert first.binding == second.binding and first.id != second.id
        queue.decide(first.id, approve=True, by="alice", channel="cli")
        await until(lambda: results)
        assert received(record) == [NOTE]
        assert queue.get(second.id).status is Status.PENDING  # type: ignore[union-attr]
        queue.decide(second.id, approve=False, by="alice", channel="cli")
    assert [result.is_error for result in results] == [False, True]
    assert received(record) == [NOTE]
    assert queue.get(first.id).status is Status.USED  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_approval_of_one_principals_call_releases_no_other_principals_same_call(
    tmp_path: Path, record: Path, mode: str
) -> None:
    config = configure(tmp_path, record, approvals={"via": ["queue"]})
    queue = queue_of(config)
    alice, bob = two_principals(tmp_path)
    results: dict[str, types.CallToolResult] = {}
    async with (
        http_gateway(config) as url,
        httpx2.AsyncClient(headers=alice, timeout=httpx2.Timeout(30, read=60)) as alice_http,
        httpx2.AsyncClient(headers=bob, timeout=httpx2.Timeout(30, read=60)) as bob_http,
        Client(streamable_http_client(url, http_client=alice_http), mode=mode) as alice_client,  # type: ignore[arg-type]
        Client(streamable_http_client(url, http_client=bob_http), mode=mode) as bob_client,  # type: ignore[arg-type]
        anyio.create_task_group() as tg,
    ):

        async def call(who: str, client: Client) -> None:
            results[who] = await client.call_tool("box__write_note", NOTE)

        tg.start_soon(call, "alice", alice_client)
        tg.start_soon(call, "bob", bob_client)
        waiting = {entry.call.principal: entry for entry in await pending(queue, 2)}
        assert waiting["alice"].binding != waiting["bob"].binding
        queue.decide(waiting["alice"].id, approve=True, by="carol", channel="cli")
        await until(lambda: "alice" in results)
        assert queue.get(waiting["bob"].id).status is Status.PENDING  # type: ignore[union-attr]
        queue.decide(waiting["bob"].id, approve=False, by="carol", channel="cli")
        await until(lambda: "bob" in results)
    assert not results["alice"].is_error and results["bob"].is_error
    assert received(record) == [NOTE]
