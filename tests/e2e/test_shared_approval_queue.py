"""A real gateway process with `[gateway] store` set: a call that asks waits in the queue in PostgreSQL,
is released by a decision taken on another connection (another replica, the command line, the
console), and is refused in one line naming the store while the store is down, then asked again once
it is back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import mcp_types as types
import pytest

from gateway.audit.approvals import Entry, Status
from gateway.audit.shared_approvals import SharedApprovalQueue
from gateway.store.postgres import Database
from tests.conftest import NOTES_NEED_APPROVAL, fixture_upstream, gateway_client, read_records, text_of, write_config
from tests.postgres import PASSWORD, cluster, server_missing

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(server_missing() is not None, reason=str(server_missing())),
]

NOTE = {"path": "notes/plan.txt", "body": "the plan"}


def configure(tmp_path: Path, record: Path, url: str) -> Path:
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))
    return write_config(tmp_path, {"box": box}, policy=NOTES_NEED_APPROVAL, store=url)


async def waiting(queue: SharedApprovalQueue, seconds: float = 30) -> Entry:
    """The one pending approval, once there is one (entered by the gateway process)."""
    look: Callable[[], list[Entry]] = lambda: queue.entries(pending_only=True)  # noqa: E731
    with anyio.fail_after(seconds):
        while not (found := await anyio.to_thread.run_sync(look)):  # noqa: ASYNC110 - another process writes it
            await anyio.sleep(0.02)
    return found[0]


async def approved_call(client: object, queue: SharedApprovalQueue) -> types.CallToolResult:
    results: list[types.CallToolResult] = []
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))  # type: ignore[attr-defined]

        tg.start_soon(call)
        entry = await waiting(queue)
        await anyio.to_thread.run_sync(lambda: queue.decide(entry.id, approve=True, by="alice", channel="cli"))
    return results[0]


async def test_a_call_waits_in_the_store_and_is_refused_while_it_is_down(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    with cluster() as own:
        url = own.url(own.new_database())
        store = Database(url)
        store.migrate()
        queue = SharedApprovalQueue(store)
        config = configure(tmp_path, record, url)
        async with gateway_client(config) as client:
            first = await approved_call(client, queue)
            assert not first.is_error, text_of(first)
            assert [entry["arguments"] for entry in read_records(record)] == [NOTE]
            (used,) = await anyio.to_thread.run_sync(lambda: queue.entries())
            assert used.status is Status.USED and used.decided_by == "alice"
            own.stop("fast")
            try:
                refused = await client.call_tool("box__write_note", NOTE)
            finally:
                own.start()
            said = text_of(refused)
            assert refused.is_error and store.shown in said and PASSWORD not in said
            again = await approved_call(client, queue)
            assert not again.is_error, text_of(again)
        assert len(read_records(record)) == 2
        assert not (tmp_path / ".mcp-armor" / "approvals.db").exists()  # the queue is only in the store
        queue.close()
