"""The approval queue end to end: a real client calls through a real gateway process, and a person decides
in the queue (here through `ApprovalQueue`, as `mcp-armor approvals` and the console do).

Each test proves what reached the upstream (the fixture records every call it receives), what the agent
was told, and what the queue and the audit log say of who decided.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest

from gateway.audit.approvals import ApprovalQueue, Entry, Status
from gateway.errors import ApprovalsError
from tests.conftest import (
    NOTES_NEED_APPROVAL,
    calls,
    client_over,
    events,
    fixture_upstream,
    gateway_client,
    read_records,
    text_of,
    write_config,
    write_policy,
)

pytestmark = pytest.mark.anyio

POLICY = NOTES_NEED_APPROVAL
NOTE = {"path": "notes/plan.txt", "body": "the plan"}


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


def configure(tmp_path: Path, record: Path, **gateway: Any) -> Path:
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))
    return write_config(tmp_path, {"box": box}, policy=POLICY, **gateway)


def received(record: Path) -> list[dict[str, Any]]:
    return [entry["arguments"] for entry in read_records(record)] if record.exists() else []


async def until(done: Callable[[], object], seconds: float = 30) -> None:
    """Wait, looking every 20 ms, until `done()` holds (state in another process: no event to await)."""
    with anyio.fail_after(seconds):
        while not done():  # noqa: ASYNC110 - the state is another process's
            await anyio.sleep(0.02)


async def pending(queue: ApprovalQueue, count: int = 1) -> list[Entry]:
    """The pending approvals once there are `count` of them."""
    await until(lambda: len(queue.entries(pending_only=True)) >= count)
    return queue.entries(pending_only=True)


def queue_of(config: Path) -> ApprovalQueue:
    return ApprovalQueue(config.parent / ".mcp-armor" / "approvals.db")


TRANSPORTS = [
    pytest.param("stdio", "legacy", id="stdio"),
    pytest.param("http", "legacy", id="http-handshake-era"),
    pytest.param("http", "auto", id="http-2026-era"),
]


@pytest.mark.parametrize(("transport", "mode"), TRANSPORTS)
async def test_a_client_without_elicitation_waits_in_the_queue_until_a_person_approves(
    tmp_path: Path, record: Path, transport: str, mode: str
) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    results: list[types.CallToolResult] = []
    async with client_over(transport, config, mode) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        assert received(record) == []  # nothing goes ahead while it waits
        shown = entry.call
        assert (shown.tool, shown.upstream, shown.upstream_tool) == ("box__write_note", "box", "write_note")
        assert shown.arguments == NOTE and shown.rules == ("notes-need-approval",)
        assert shown.reason.endswith("notes are written to disk") and shown.revision
        assert shown.client.startswith("mcp") and shown.gateway.rsplit(":", 1)[1].isdigit()
        assert entry.expires - entry.created == 120
        queue.decide(entry.id, approve=True, by="alice", channel="cli", binding=entry.binding)
    (result,) = results
    assert not result.is_error, text_of(result)
    assert received(record) == [NOTE]
    assert queue.get(entry.id).status is Status.USED  # type: ignore[union-attr]
    decision = calls(tmp_path)["box__write_note"]["decision"]
    request = decision["approval_request"]
    assert decision["approval"] == "granted"
    assert request["answer"] == "granted" and request["via"] == "queue"
    assert (request["entry"], request["by"], request["through"]) == (entry.id, "alice", "cli")
    assert request["at"].endswith("Z")


async def test_a_denial_in_the_queue_refuses_the_call_with_the_persons_reason(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    results: list[types.CallToolResult] = []
    async with gateway_client(config) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        queue.decide(entry.id, approve=False, by="bob", channel="console", note="not on a Friday")
    (result,) = results
    assert result.is_error
    assert "denied by bob (console): not on a Friday" in text_of(result)
    assert received(record) == []
    with pytest.raises(ApprovalsError, match=f"approval {entry.id} is denied by bob \\(console\\): nothing to decide"):
        queue.decide(entry.id, approve=True, by="mallory", channel="cli")


async def test_a_waiting_call_sends_progress_so_its_client_keeps_waiting(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    heard: list[tuple[float, float | None, str | None]] = []
    results: list[types.CallToolResult] = []
    progressed = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, total, message))
        progressed.set()

    async with gateway_client(config) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE, progress_callback=on_progress))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        with anyio.fail_after(30):
            await progressed.wait()
        queue.decide(entry.id, approve=True, by="alice", channel="cli")
    assert not results[0].is_error
    progress, total, message = heard[0]
    assert progress > 0 and total == 120
    assert message is not None and message.startswith(f"waiting for a person's approval ({entry.id};")


async def test_an_unanswered_approval_expires_and_the_call_is_refused(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record, ask_timeout="1s")
    queue = queue_of(config)
    async with gateway_client(config) as client:
        refused = await client.call_tool("box__write_note", NOTE)
    assert refused.is_error and "no answer within 1s" in text_of(refused)
    (entry,) = queue.entries()
    assert entry.status is Status.EXPIRED and entry.note == "no decision within 1s"
    request = calls(tmp_path)["box__write_note"]["decision"]["approval_request"]
    assert (request["answer"], request["via"], request["entry"]) == ("no answer", "queue", entry.id)
    with pytest.raises(ApprovalsError, match="is expired"):
        queue.decide(entry.id, approve=True, by="late", channel="cli")
    assert received(record) == []


async def test_a_call_cancelled_while_it_waits_is_withdrawn_from_the_queue(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    async with gateway_client(config) as client:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "box__write_note", NOTE)
                await pending(queue)
                scope.cancel()
        await until(lambda: queue.entries()[0].status is not Status.PENDING)
    (entry,) = queue.entries()
    assert entry.status is Status.WITHDRAWN
    assert received(record) == []


async def test_a_policy_reload_while_a_call_waits_voids_its_approval(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    results: list[types.CallToolResult] = []
    async with gateway_client(config) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        write_policy(tmp_path / "policies", POLICY.replace("notes are written to disk", "notes are kept"))
        await until(lambda: any(event["kind"] == "policy_reload" for event in events(tmp_path)))
        queue.decide(entry.id, approve=True, by="alice", channel="cli")
    (result,) = results
    assert result.is_error and "the policy was reloaded while the call waited" in text_of(result)
    assert queue.get(entry.id).status is Status.VOID  # type: ignore[union-attr]
    assert received(record) == []


class SlowPerson:
    """A person at the agent's client who answers only when told to (or never)."""

    def __init__(self, answer: str = "approve") -> None:
        self.answer = answer
        self.asked = anyio.Event()
        self.go = anyio.Event()
        self.withdrawn = False

    async def __call__(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.asked.set()
        try:
            await self.go.wait()
        except anyio.get_cancelled_exc_class():
            self.withdrawn = True
            raise
        if self.answer == "approve":
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action="decline")


async def test_the_queue_deciding_first_wins_over_the_clients_elicitation(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    person = SlowPerson("decline")
    results: list[types.CallToolResult] = []
    async with gateway_client(config, elicitation=person) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        with anyio.fail_after(30):
            await person.asked.wait()  # both channels ask at once
        queue.decide(entry.id, approve=True, by="alice", channel="console")
        await until(lambda: results)
        await until(lambda: person.withdrawn)  # the client is told its request was withdrawn
    assert not results[0].is_error
    assert received(record) == [NOTE]
    request = calls(tmp_path)["box__write_note"]["decision"]["approval_request"]
    assert (request["by"], request["through"]) == ("alice", "console")


async def test_the_clients_answer_first_is_entered_in_the_queue_and_wins(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record)
    queue = queue_of(config)
    person = SlowPerson("decline")
    results: list[types.CallToolResult] = []
    async with gateway_client(config, elicitation=person) as client, anyio.create_task_group() as tg:

        async def call() -> None:
            results.append(await client.call_tool("box__write_note", NOTE))

        tg.start_soon(call)
        (entry,) = await pending(queue)
        with anyio.fail_after(30):
            await person.asked.wait()
        person.go.set()
    assert results[0].is_error and "the person declined it" in text_of(results[0])
    decided = queue.get(entry.id)
    assert decided is not None and decided.status is Status.DENIED and decided.channel == "elicitation"
    with pytest.raises(ApprovalsError, match="nothing to decide"):
        queue.decide(entry.id, approve=True, by="alice", channel="cli")
    assert received(record) == []


async def test_queue_fallback_asks_only_a_client_that_cannot_elicit(tmp_path: Path, record: Path) -> None:
    config = configure(tmp_path, record, approvals={"queue": "fallback"})
    queue = queue_of(config)
    person = SlowPerson("approve")
    person.go.set()
    async with gateway_client(config, elicitation=person) as client:
        assert not (await client.call_tool("box__write_note", NOTE)).is_error
    assert queue.entries() == []  # the client could ask: the queue was not used
    assert received(record) == [NOTE]


async def test_a_2026_retry_answers_the_call_waiting_in_the_queue(tmp_path: Path, record: Path) -> None:
    """2026-07-28 with elicitation: the call is entered in the queue too, and the client's retry enters
    its person's answer there (one approval, used once)."""
    config = configure(tmp_path, record)
    queue = queue_of(config)
    person = SlowPerson("approve")
    person.go.set()
    async with gateway_client(config, mode="auto", elicitation=person) as client:
        assert not (await client.call_tool("box__write_note", NOTE)).is_error
    (entry,) = queue.entries()
    assert entry.status is Status.USED and entry.channel == "input_required"
    assert received(record) == [NOTE]


async def test_the_queue_shows_the_reason_masked_as_the_audit_log_records_it(tmp_path: Path, record: Path) -> None:
    key = "AKIA" + "Q" * 16  # a secret the audit log masks wherever it appears, free text too
    policy = POLICY.replace("notes are written to disk", f"notes may hold {key}")
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=policy)
    queue = queue_of(config)
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(client.call_tool, "box__write_note", NOTE)
        (entry,) = await pending(queue)
        queue.decide(entry.id, approve=False, by="alice", channel="cli")
    decision = calls(tmp_path)["box__write_note"]["decision"]
    assert key not in entry.call.reason and key not in decision["reason"]
    assert entry.call.reason == decision["reason"].split("; denied by")[0]
