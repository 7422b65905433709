"""The approval queue and the approval states in the shared store, as several replicas use them: each
"replica" here is its own queue or desk object on its own connection to the same database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio
import anyio.to_thread
import pytest

from gateway.audit.approvals import AskedCall, Entry, Status
from gateway.audit.shared_approvals import SharedApprovalQueue, SharedApprovalStates
from gateway.calls import Answer, Decision, Effect, SessionInfo, ToolCall
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.core.approvals import ApprovalDesk
from gateway.core.asking import QueueAsker
from gateway.errors import ApprovalsError
from gateway.store.postgres import Database
from tests.postgres import PASSWORD, cluster, server_missing

CALL = AskedCall("c1", "s1", "client 1", "", "box__write", "box", "write", {"path": "notes/a"}, ("r",), "why", "rev")
ACCEPT = {"action": "accept", "content": {"approve": True}}
T = TypeVar("T")
DECISION = Decision(Effect.ASK, "rule 'w' needs a person's approval", "rev", ("w",))


@pytest.fixture
def store(store_url: str) -> Database:
    database = Database(store_url)
    database.migrate()
    return database


@pytest.fixture
def replicas(store: Database) -> Iterator[tuple[SharedApprovalQueue, SharedApprovalQueue]]:
    a, b = SharedApprovalQueue(store), SharedApprovalQueue(store)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def call() -> ToolCall:
    listing = normalise_listing("box", [{"name": "write", "inputSchema": {"type": "object"}}])
    tool = Catalog.build([listing], "__").tools["box__write"]
    return ToolCall(SessionInfo("s1", "stdio", "2026-07-28"), tool, {"path": "notes/a"})


def until(look: Callable[[], T], holds: Callable[[T], bool], seconds: float = 10) -> T:
    """`look()` once `holds` of it, looked at until the deadline (another connection is changing it)."""
    deadline = time.monotonic() + seconds
    while not holds(seen := look()):
        assert time.monotonic() < deadline, f"still {seen!r}"
        time.sleep(0.02)
    return seen


def test_an_approval_asked_on_one_replica_is_listed_and_decided_on_another(
    replicas: tuple[SharedApprovalQueue, SharedApprovalQueue],
) -> None:
    a, b = replicas
    asked = a.ask(CALL, "binding", 600)
    assert [entry.id for entry in b.entries(pending_only=True)] == [asked.id]
    before = a.version()
    decided = b.decide(asked.id, approve=True, by="alice", channel="cli", binding="binding")
    assert decided.status is Status.APPROVED and decided.decided_by == "alice"
    assert a.version() != before
    seen = a.get(asked.id)
    assert seen is not None and seen.status is Status.APPROVED and seen.channel == "cli"
    assert a.spend(asked.id, "binding") and not b.spend(asked.id, "binding")
    assert b.entries(pending_only=True) == []
    assert [(rule.rule, rule.asked, rule.approved) for rule in b.stats(0)] == [("r", 1, 1)]
    with pytest.raises(ApprovalsError, match=f"approval {asked.id} is used by alice"):
        a.decide(asked.id, approve=False, by="bob", channel="console")


def test_a_session_with_its_most_approvals_waiting_is_refused_on_every_replica(
    replicas: tuple[SharedApprovalQueue, SharedApprovalQueue],
) -> None:
    a, b = replicas
    a.ask(CALL, "one", 600, most=2)
    b.ask(CALL, "two", 600, most=2)
    with pytest.raises(ApprovalsError, match="session s1 already has 2 approvals waiting"):
        a.ask(CALL, "three", 600, most=2)


def test_when_two_replicas_decide_at_once_the_first_decision_wins(
    store: Database, replicas: tuple[SharedApprovalQueue, SharedApprovalQueue]
) -> None:
    """A decides and, before its transaction commits (while its decision is being recorded), B decides
    too: B waits on the row, then finds it decided and changes nothing."""
    a, b = replicas
    asked = a.ask(CALL, "binding", 600)
    outcome: list[Entry | str] = []

    def b_decides() -> None:
        try:
            outcome.append(b.decide(asked.id, approve=False, by="bob", channel="console"))
        except ApprovalsError as exc:
            outcome.append(str(exc))

    def record(decided: Entry) -> None:
        """Inside A's transaction: B's decision starts, and is left waiting on the row A holds."""
        assert decided.status is Status.APPROVED
        rival.start()
        with store.session() as watcher:
            until(
                lambda: watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                ).fetchone(),
                lambda row: row is not None and row[0] == 1,
            )

    rival = threading.Thread(target=b_decides)
    decided = a.decide(asked.id, approve=True, by="alice", channel="cli", record=record)
    rival.join(timeout=30)
    assert decided.status is Status.APPROVED
    assert outcome == [f"approval {asked.id} is approved by alice (cli): nothing to decide"]
    final = b.get(asked.id)
    assert final is not None and final.status is Status.APPROVED and final.decided_by == "alice"


def test_replicas_deciding_together_many_times_succeed_exactly_once_each_time(
    replicas: tuple[SharedApprovalQueue, SharedApprovalQueue],
) -> None:
    a, b = replicas

    def decide(queue: SharedApprovalQueue, name: str, entry_id: str, start: threading.Barrier, wins: list[str]) -> None:
        start.wait()
        try:
            queue.decide(entry_id, approve=name == "a", by=name, channel="cli")
        except ApprovalsError:
            return
        wins.append(name)

    for _ in range(10):
        asked = a.ask(CALL, "binding", 600)
        start = threading.Barrier(2)
        wins: list[str] = []
        threads = [
            threading.Thread(target=decide, args=(queue, name, asked.id, start, wins))
            for queue, name in ((a, "a"), (b, "b"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(wins) == 1
        final = a.get(asked.id)
        assert final is not None and final.decided_by == wins[0]


def test_a_failed_record_leaves_the_approval_pending_for_every_replica(
    replicas: tuple[SharedApprovalQueue, SharedApprovalQueue],
) -> None:
    a, b = replicas
    asked = a.ask(CALL, "binding", 600)

    def record(decided: Entry) -> None:
        raise ApprovalsError("the audit log cannot be written")

    with pytest.raises(ApprovalsError, match="audit log cannot be written"):
        b.decide(asked.id, approve=True, by="alice", channel="cli", record=record)
    assert [entry.id for entry in a.entries(pending_only=True)] == [asked.id]


# The audit's replica is named `host:pid/random` (SharedRecorder.name), the call's holder `host:pid`.
@pytest.mark.parametrize("replica", ["elsewhere:4242", "elsewhere:4242/1a2b3c4d"])
def test_an_approval_held_by_a_replica_settled_as_gone_is_not_offered(
    store: Database, replicas: tuple[SharedApprovalQueue, SharedApprovalQueue], replica: str
) -> None:
    a, b = replicas
    held = AskedCall(**{**CALL.to_record(), "gateway": "elsewhere:4242", "rules": ("r",), "paths": ()})
    asked = a.ask(held, "binding", 600)
    with store.session() as db:
        db.execute("INSERT INTO replicas (name, lock_key, host, pid) VALUES (%s, 1, 'elsewhere', 4242)", (replica,))
    assert [entry.id for entry in b.entries(pending_only=True)] == [asked.id]  # live on its host
    with store.session() as db:
        db.execute("UPDATE replicas SET settled = now() WHERE name = %s", (replica,))
    assert b.entries(pending_only=True) == []
    with pytest.raises(ApprovalsError, match=r"is expired: the gateway holding it \(elsewhere:4242\) is gone"):
        b.decide(asked.id, approve=True, by="alice", channel="cli")
    closed = a.get(asked.id)
    assert closed is not None and closed.status is Status.EXPIRED


def test_a_holder_whose_process_id_a_live_replica_reuses_is_still_offered(
    store: Database, replicas: tuple[SharedApprovalQueue, SharedApprovalQueue]
) -> None:
    # A container restarted keeps its host name and pid 1: the settled replica before it is not this one.
    a, b = replicas
    held = AskedCall(**{**CALL.to_record(), "gateway": "box:1", "rules": ("r",), "paths": ()})
    asked = a.ask(held, "binding", 600)
    with store.session() as db:
        db.execute(
            "INSERT INTO replicas (name, lock_key, host, pid, settled) VALUES "
            "('box:1/old', 1, 'box', 1, now()), ('box:1/new', 2, 'box', 1, NULL), ('box:10/x', 3, 'box', 10, now())"
        )
    assert [entry.id for entry in b.entries(pending_only=True)] == [asked.id]


@pytest.mark.anyio
async def test_a_call_waiting_on_one_replica_is_released_by_a_decision_on_another(
    store: Database, replicas: tuple[SharedApprovalQueue, SharedApprovalQueue], call: ToolCall
) -> None:
    a, b = replicas
    asker = QueueAsker(a, ApprovalDesk(600, states=SharedApprovalStates(store)), lambda c, d: CALL, lambda: "rev")
    await anyio.to_thread.run_sync(asker.desk.ready)
    answers = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def waits() -> None:
                answers.append(await asker.ask(call, DECISION))

            tg.start_soon(waits)
            listed = await anyio.to_thread.run_sync(lambda: until(lambda: b.entries(pending_only=True), bool))
            await anyio.to_thread.run_sync(lambda: b.decide(listed[0].id, approve=True, by="alice", channel="cli"))
    asker.desk.close()
    assert answers[0].answer is Answer.GRANTED and answers[0].reason == "approved by alice (cli)"
    spent = b.get(listed[0].id)
    assert spent is not None and spent.status is Status.USED


def test_a_state_sealed_on_one_replica_is_honoured_on_another_and_never_again(store: Database, call: ToolCall) -> None:
    desk_a, desk_b, desk_c = (ApprovalDesk(60, states=SharedApprovalStates(store)) for _ in range(3))
    state = desk_a.pending(call, DECISION).pending
    assert state is not None
    assert desk_b.binding(call) == desk_a.binding(call)
    assert desk_b.redeem(state["requestState"], ACCEPT, call).answer is Answer.GRANTED
    replayed = desk_c.redeem(state["requestState"], ACCEPT, call)
    assert replayed.answer is Answer.INVALID and "already used" in replayed.reason
    local = ApprovalDesk(60)  # a gateway without the store has a key of its own
    assert "not issued by this gateway" in local.redeem(desk_a.seal(call), ACCEPT, call).reason
    for desk in (desk_a, desk_b, desk_c):
        desk.close()


@pytest.mark.anyio
@pytest.mark.skipif(server_missing() is not None, reason=str(server_missing()))
async def test_a_store_down_refuses_asking_and_deciding_in_one_line_then_recovers(call: ToolCall) -> None:
    with cluster() as own:
        url = own.url(own.new_database())
        database = Database(url)
        database.migrate()
        queue, other = SharedApprovalQueue(database), SharedApprovalQueue(database)
        desk = ApprovalDesk(600, states=SharedApprovalStates(database))
        asker = QueueAsker(queue, desk, lambda c, d: CALL, lambda: "rev")
        asked = await anyio.to_thread.run_sync(lambda: queue.ask(CALL, "binding", 600))
        await anyio.to_thread.run_sync(desk.ready)
        sealed = desk.seal(call)
        own.stop("fast")
        try:
            refused = await asker.ask(call, DECISION)
            assert refused.answer is Answer.CANNOT_ASK
            unavailable = f"the approval queue in the store {database.shown} is unavailable (see the gateway's log)"
            assert refused.reason == unavailable
            with pytest.raises(ApprovalsError) as failed:
                other.decide(asked.id, approve=True, by="alice", channel="cli")
            message = str(failed.value)
            assert database.shown in message and PASSWORD not in message and "\n" not in message
            unchecked = desk.redeem(sealed, ACCEPT, call)
            assert unchecked.answer is Answer.INVALID and database.shown in unchecked.reason
            fresh = ApprovalDesk(600, states=SharedApprovalStates(database))
            with pytest.raises(ApprovalsError, match="the approval state cannot be used"):
                fresh.ready()
        finally:
            own.start()
        decided = await anyio.to_thread.run_sync(
            lambda: other.decide(asked.id, approve=True, by="alice", channel="cli")
        )
        assert decided.status is Status.APPROVED
        assert desk.redeem(sealed, ACCEPT, call).answer is Answer.GRANTED
        again = await anyio.to_thread.run_sync(lambda: queue.ask(CALL, "again", 600))
        assert other.get(again.id) == again
        for each in (queue, other, desk, fresh):
            each.close()
