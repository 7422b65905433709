"""The audit log in the shared store: one chain that several replicas append to, verified end to end, against
a real PostgreSQL server."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import anyio
import pytest

from gateway.audit.queries import Filters, glob_regex
from gateway.audit.shared import GONE_AFTER, SharedAuditStore, SharedRecorder
from gateway.audit.store import event
from gateway.errors import AuditError
from gateway.store.postgres import Database
from tests.postgres import cluster, server_missing

pytestmark = pytest.mark.anyio


def _decision(call: str, session: str = "s1", **fields: Any) -> dict[str, Any]:
    return event("decision", session_id=session, call_id=call, tool="box__echo", decision="allow", **fields)


def _outcome(call: str, session: str = "s1", outcome: str = "ok") -> dict[str, Any]:
    return event("outcome", session_id=session, call_id=call, tool="box__echo", outcome=outcome)


@contextmanager
def _log(url: str) -> Iterator[SharedAuditStore]:
    with closing(SharedAuditStore.open_reader(Database(url))) as log:
        yield log


async def test_three_replicas_recording_at_once_make_one_chain_with_every_event_once(store_url: str) -> None:
    database = Database(store_url)
    replicas = [SharedRecorder(database) for _ in range(3)]

    async def calls(recorder: SharedRecorder, replica: int) -> None:
        async def one(n: int) -> None:
            call = f"r{replica}-c{n}"
            await recorder.record(_decision(call, session=f"r{replica}"))
            await recorder.record(_outcome(call, session=f"r{replica}"))

        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(one, n)

    with anyio.fail_after(60):
        async with replicas[0].running(), replicas[1].running(), replicas[2].running():
            async with anyio.create_task_group() as tg:
                for index, recorder in enumerate(replicas):
                    tg.start_soon(calls, recorder, index)
    with _log(store_url) as log:
        result = log.verify()
        events = list(log.events())
    assert result.problem is None and result.events == 600 == len(events)
    assert Counter((e["call_id"], e["kind"]) for e in events).most_common(1)[0][1] == 1
    for replica in range(3):  # each replica's own order is kept in the one chain
        mine = [e for e in events if e["session_id"] == f"r{replica}"]
        for n in range(100):
            kinds = [e["kind"] for e in mine if e["call_id"] == f"r{replica}-c{n}"]
            assert kinds == ["decision", "outcome"]


async def test_every_replica_masks_with_the_one_shared_key(store_url: str) -> None:
    database = Database(store_url)
    first, second = SharedRecorder(database), SharedRecorder(database)
    async with first.running(), second.running():
        one = first.redactor.redact({"token": "ghp_" + "a" * 36}).value
        two = second.redactor.redact({"token": "ghp_" + "a" * 36}).value
    assert one == two and "ghp_" not in json.dumps(one)


async def test_a_second_decision_or_outcome_for_a_call_is_left_out(store_url: str) -> None:
    recorder = SharedRecorder(Database(store_url))
    async with recorder.running():
        await recorder.record(_decision("c1"), _decision("c1", reason="again"))
        await recorder.record(_outcome("c1", outcome="interrupted"))
        await recorder.record(_outcome("c1", outcome="ok"))  # a late outcome: the first one stands
        await recorder.record(event("session_start", session_id="s1"), event("session_start", session_id="s1"))
    with _log(store_url) as log:
        kinds = [(e["kind"], e.get("outcome"), e.get("reason")) for e in log.events()]
        assert log.verify().problem is None
    assert kinds == [("decision", None, None), ("outcome", "interrupted", None), ("session_start", None, None)]


def _tamper(url: str, *statements: str) -> None:
    database = Database(url)
    with database.session() as db:
        db.execute("ALTER TABLE events DISABLE TRIGGER USER")
        for statement in statements:
            db.execute(statement)
        db.execute("ALTER TABLE events ENABLE TRIGGER USER")


async def _five_events(url: str) -> None:
    recorder = SharedRecorder(Database(url))
    async with recorder.running():
        for n in range(5):
            await recorder.record(_decision(f"c{n}"))


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        (["UPDATE events SET body = replace(body, 'allow', 'deny') WHERE seq = 3"], (3, "hash does not match")),
        (["UPDATE events SET decision = 'deny' WHERE seq = 2"], (2, "column decision does not match")),
        (["UPDATE events SET tool = 'box__other' WHERE seq = 4"], (4, "column tool does not match")),
        (["DELETE FROM events WHERE seq = 2"], (2, "missing")),
        (["DELETE FROM events WHERE seq = 5"], (5, "truncated")),
        (
            [
                "DELETE FROM events WHERE seq = 5",
                "UPDATE head SET seq = 4, hash = (SELECT hash FROM events WHERE seq = 4)",
            ],
            None,  # cut short and re-headed: only an anchor shows it (below)
        ),
    ],
)
async def test_verify_finds_what_was_changed_behind_the_gateway(
    store_url: str, statements: list[str], found: tuple[int, str] | None
) -> None:
    await _five_events(store_url)
    with _log(store_url) as log:
        anchor = (5, next(e["hash"] for e in log.events() if e["seq"] == 5))
    _tamper(store_url, *statements)
    with _log(store_url) as log:
        problem = log.verify().problem
        anchored = log.verify([anchor]).problem
    if found is None:
        assert problem is None
        assert anchored is not None and anchored.seq == 5 and "anchored event missing" in anchored.what
    else:
        assert problem is not None and problem.seq == found[0] and found[1] in problem.what, problem


async def test_queries_filter_like_the_sqlite_log(store_url: str) -> None:
    recorder = SharedRecorder(Database(store_url))
    async with recorder.running():
        await recorder.record(
            event("session_start", session_id="s1", principal="alice", lease=recorder.lease_name),
            event("session_start", session_id="s2", principal="bob"),
            _decision("c1", session="s1"),
            event("decision", session_id="s2", call_id="c2", tool="git__status", decision="deny"),
            _outcome("c1", session="s1"),
        )
    with _log(store_url) as log:
        assert [e["call_id"] for e in log.events(Filters(decision="deny"))] == ["c2"]
        assert [e["kind"] for e in log.events(Filters(principal="al*"))] == ["session_start", "decision", "outcome"]
        assert [e["call_id"] for e in log.events(Filters(tool="git__*"))] == ["c2"]
        assert [e["seq"] for e in log.events(newest=2)] == [4, 5]
        assert [e["kind"] for e in log.events(Filters(kinds=("outcome",)))] == ["outcome"]
        sessions = {row["session_id"]: row for row in log.sessions()}
        assert sessions["s1"]["principal"] == "alice" and sessions["s1"]["calls"] == 1
        assert log.last_seq() == 5


def test_globs_read_as_sqlite_reads_them() -> None:
    import re

    for pattern, yes, no in [
        ("git__*", "git__status", "gitx_status"),
        ("a?c", "abc", "ac"),
        ("[ab]x", "bx", "cx"),
        ("[^ab]x", "cx", "ax"),
        ("a.b", "a.b", "axb"),
        ("a+(b)", "a+(b)", "aab"),
    ]:
        regex = glob_regex(pattern)
        assert re.search(regex, yes) and not re.search(regex, no), (pattern, regex)


async def _server_up_long_enough(database: Database) -> None:
    """Wait until the database server has been up for `GONE_AFTER`: a replica last seen before it started
    is given that long to come back before it is taken for gone."""
    with anyio.fail_after(GONE_AFTER + 30):
        while True:
            with database.session() as db:
                row = db.execute("SELECT now() - pg_postmaster_start_time() > make_interval(secs => %s)", (GONE_AFTER,))
                if row.fetchone() == (True,):
                    return
            await anyio.sleep(0.2)


def _left_by_silent_replica(database: Database, *bodies: dict[str, Any]) -> None:
    """`bodies` in the chain, and replica `old:1/x` silent: no lock held, not seen for a minute."""
    database.migrate()
    with database.session() as db:
        db.execute(
            "INSERT INTO replicas (name, lock_key, host, pid, seen) "
            "VALUES ('old:1/x', 42, 'old', 1, now() - '1 min'::interval)"
        )
    with closing(SharedAuditStore.open_writer(database)) as log:
        from gateway.audit.chain import canonical

        log.append([canonical(body) for body in bodies])


async def test_a_gone_replicas_open_calls_and_sessions_are_settled_by_a_survivor(store_url: str) -> None:
    database = Database(store_url)
    await _server_up_long_enough(database)
    _left_by_silent_replica(
        database,
        event("session_start", session_id="s-old", lease="old:1/x"),
        _decision("open", session="s-old"),
        _decision("done", session="s-old"),
        _outcome("done", session="s-old"),
    )
    survivor = SharedRecorder(database)
    async with survivor.running():
        pass
    with _log(store_url) as log:
        settled = [e for e in log.events() if e["seq"] > 4]
        assert log.verify().problem is None
    assert [(e["kind"], e.get("call_id"), e.get("outcome")) for e in settled] == [
        ("outcome", "open", "interrupted"),
        ("session_end", None, None),
    ]
    assert "replica old:1/x ended without recording an outcome" in settled[0]["reason"]
    with database.session() as db:
        row = db.execute("SELECT settled IS NOT NULL FROM replicas WHERE name = 'old:1/x'").fetchone()
    assert row == (True,)


async def test_a_gone_replica_settles_only_its_own_calls_of_a_session_every_replica_serves(store_url: str) -> None:
    # A principal's stateless 2026-07-28 requests have one session id on every replica: the replica that
    # recorded its start going away must not settle (and so hide the real outcome of) another's calls.
    database = Database(store_url)
    database.migrate()
    with database.session() as db:
        db.execute("INSERT INTO replicas (name, lock_key, host, pid) VALUES ('old:1/x', 42, 'old', 1)")
    with closing(SharedAuditStore.open_writer(database)) as log:
        from gateway.audit.chain import canonical

        log.append(
            [
                canonical(event("session_start", session_id="s-shared", lease="old:1/x")),
                canonical(_decision("old-open", session="s-shared", lease="old:1/x")),
            ]
        )
    live = SharedRecorder(database)
    async with live.running():
        await live.record(
            event("session_start", session_id="s-shared", lease=live.lease_name),
            _decision("live-call", session="s-shared", lease=live.lease_name),
        )
        await _server_up_long_enough(database)
        with database.session() as db:  # the replica that started the session goes away now
            db.execute("UPDATE replicas SET seen = now() - '1 min'::interval WHERE name = 'old:1/x'")
        survivor = SharedRecorder(database)
        async with survivor.running():
            pass
        await live.record(_outcome("live-call", session="s-shared"))
    with _log(store_url) as log:
        outcomes = {e["call_id"]: e["outcome"] for e in log.events(Filters(kinds=("outcome",)))}
        assert log.verify().problem is None
    assert outcomes == {"old-open": "interrupted", "live-call": "ok"}


async def test_a_gone_replicas_open_call_in_a_session_another_replica_started_is_settled(store_url: str) -> None:
    database = Database(store_url)
    await _server_up_long_enough(database)
    _left_by_silent_replica(
        database,
        event("session_start", session_id="s-shared", lease="elsewhere:2/y"),
        _decision("old-open", session="s-shared", lease="old:1/x"),
    )
    async with SharedRecorder(database).running():
        pass
    with _log(store_url) as log:
        settled = [(e["kind"], e.get("call_id"), e.get("outcome")) for e in log.events() if e["seq"] > 2]
    assert settled == [("outcome", "old-open", "interrupted")]  # the session is not its to end


async def test_a_live_replica_is_never_settled_however_long_it_was_silent(store_url: str) -> None:
    database = Database(store_url)
    live = SharedRecorder(database)
    async with live.running():
        await live.record(event("session_start", session_id="s", lease=live.lease_name), _decision("c", session="s"))
        with database.session() as db:  # silent for a minute, but its connection still holds its lock
            db.execute("UPDATE replicas SET seen = now() - '1 min'::interval WHERE name = %s", (live.name,))
        other = SharedRecorder(database)
        async with other.running():
            pass
        await live.record(_outcome("c", session="s"))
    with _log(store_url) as log:
        assert [e.get("outcome") for e in log.events(Filters(kinds=("outcome",)))] == ["ok"]


@pytest.mark.skipif(server_missing() is not None, reason=server_missing() or "")
async def test_the_database_away_refuses_at_once_and_nothing_is_lost_when_it_is_back() -> None:
    with cluster() as own:
        url = own.url(own.new_database())
        recorder = SharedRecorder(Database(url))
        with anyio.fail_after(60):
            async with recorder.running():
                await recorder.record(_decision("before"))
                own.stop("immediate")
                with pytest.raises(AuditError, match="cannot write the audit log"):
                    await recorder.record(_decision("away"))
                assert recorder.failure is not None and "armor-test-secret" not in recorder.failure
                # The caller was told; what it queues instead (the refusal it gave) waits for the database.
                recorder.queue(_decision("away", reason="refused"), _outcome("away", outcome="refused"))
                own.start()
                while True:  # the writer comes back by itself
                    try:
                        await recorder.record(_decision("after"))
                        break
                    except AuditError:
                        await anyio.sleep(0.1)
        with _log(url) as log:
            calls = [(e["kind"], e["call_id"]) for e in log.events()]
            reasons = [e["reason"] for e in log.events()]
            assert log.verify().problem is None
    assert calls == [
        ("decision", "before"),
        ("decision", "away"),
        ("outcome", "away"),
        ("decision", "after"),
    ]
    assert reasons == [None, "refused", None, None]


@pytest.mark.skipif(server_missing() is not None, reason=server_missing() or "")
async def test_replicas_are_not_taken_for_gone_while_the_database_server_has_just_started() -> None:
    # A database restarted after an outage longer than GONE_AFTER: every replica's lock was dropped and its
    # `seen` is old, but the live ones are only now reconnecting. The first survivor back settles none.
    with cluster() as own:
        url = own.url(own.new_database())
        database = Database(url)
        _left_by_silent_replica(database, event("session_start", session_id="s", lease="old:1/x"), _decision("c"))
        with anyio.fail_after(60):
            async with SharedRecorder(database).running():
                pass
        _assert_left_alone(database)


async def test_a_reader_of_an_unreachable_store_gets_one_line(store_url: str) -> None:
    from tests.postgres import free_port

    url = f"postgresql://armor:secret@127.0.0.1:{free_port()}/armor"
    with pytest.raises(AuditError, match=r"^cannot read the audit log: postgresql://armor@127\.0\.0\.1:\d+/armor: "):
        SharedAuditStore.open_reader(Database(url))
    assert os.environ.get("PGPASSWORD") is None


async def test_a_replica_whose_keeper_cannot_reach_the_store_is_still_known_and_seen_while_it_writes(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.audit.shared as shared

    async def unreachable(self: SharedRecorder) -> None:  # its liveness connection never gets through
        return None

    monkeypatch.setattr(SharedRecorder, "_keep", unreachable)
    monkeypatch.setattr(shared, "HEARTBEAT", 0.0)  # every commit says it is alive
    database = Database(store_url)
    recorder = SharedRecorder(database)
    async with recorder.running():
        await recorder.record(event("session_start", session_id="s", lease=recorder.lease_name))
        with database.session() as db:
            db.execute("UPDATE replicas SET seen = now() - '1 min'::interval WHERE name = %s", (recorder.name,))
        await recorder.record(_decision("c", session="s"))
        with database.session() as db:
            row = db.execute(
                "SELECT seen > now() - '10 s'::interval FROM replicas WHERE name = %s", (recorder.name,)
            ).fetchone()
    assert row == (True,)  # known (the sessions it records name it) and not silent: never settled while it writes


async def test_a_replica_rejoining_while_a_survivor_settles_it_is_left_alone(store_url: str) -> None:
    database = Database(store_url)
    await _server_up_long_enough(database)
    _left_by_silent_replica(database, event("session_start", session_id="s", lease="old:1/x"), _decision("c"))
    survivor = SharedRecorder(database)
    with database.session() as rejoining, anyio.fail_after(30):
        # The silent replica comes back: it says it is alive (its row locked until that commits) just as the
        # survivor, having listed it as gone and found its lock free, takes its row to settle it.
        rejoining.execute("BEGIN")
        rejoining.execute("UPDATE replicas SET seen = now() WHERE name = 'old:1/x'")
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_briefly, survivor)
            while True:  # the survivor waits on the row
                with database.session() as db:
                    waiting = db.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                        ("%FROM replicas WHERE name = %",),
                    ).fetchone()
                if waiting == (1,):
                    break
                await anyio.sleep(0.02)
            rejoining.execute("COMMIT")
    _assert_left_alone(database)


def _assert_left_alone(database: Database) -> None:
    """The silent replica `_left_by_silent_replica` made is not settled, and its open call has no outcome."""
    with database.session() as db:
        settled = db.execute("SELECT settled FROM replicas WHERE name = 'old:1/x'").fetchone()
    with _log(database.url) as log:
        kinds = [e["kind"] for e in log.events()]
    assert settled == (None,) and kinds == ["session_start", "decision"]


async def _run_briefly(recorder: SharedRecorder) -> None:
    async with recorder.running():  # joining settles what is gone
        pass
