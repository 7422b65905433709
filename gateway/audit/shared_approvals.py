"""The approval queue, and the key and used-once record of 2026-07-28 approval states, in the shared store
(`[gateway] store`): every replica enters, decides, spends and lists the same approvals.

`SharedApprovalQueue` is the SQLite queue's interface (`gateway.audit.approvals.Queue`) over the
`approvals` table (gateway/store/schema.py). Whoever decides first wins across replicas: one
`UPDATE … WHERE status = 'pending' RETURNING` takes the row, which stays locked until the decision's
audit event is recorded and the transaction commits (a second decider's update then finds it decided).
Each change also bumps the one row of `approvals_version`, in its own transaction: a gateway holding a
call (which looks every `POLL` seconds) or a console page reads that row to learn that something
changed. A pending row's holder is gone when the audit's `replicas` table says its replica was settled
as gone, or, for a holder on this host, when its process has ended.

`SharedApprovalStates` gives every replica the same key for bindings and sealed `requestState`s (from
the `keys` table), and records each redeemed state's nonce once (`approval_states_used`), so a retry
is honoured on whichever replica it reaches, and once.

Synchronous, over one connection per object (made when first needed, and again after a failure, so a
store back up is used again by itself); the gateway calls it from worker threads. An unreachable
store is an `ApprovalsError` naming it (never with its password).
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gateway.audit.approvals import (
    ApprovalQueue,
    AskedCall,
    Entry,
    Queue,
    Record,
    RuleStats,
    Status,
    _entry,
    _gone,
    new_id,
    refuse_crowding,
    refuse_undecidable,
    tally,
)
from gateway.config.models import Config
from gateway.errors import ApprovalsError, StoreError
from gateway.store.postgres import Database, database, first_line, require_driver, shared_key

if TYPE_CHECKING:
    import psycopg

STATE_KEY = "approval-state"
"""The name, in `keys`, of the key binding approvals and sealing 2026-07-28 approval states."""
PRUNE_EVERY = 60.0
"""Seconds between removals of expired used-once records (by each replica, as it redeems)."""
CLOCK_SLACK = 300.0
"""Seconds a used-once record is kept past its state's expiry: replicas' clocks may differ by that much."""
IDLE_CHECK = 1.0
"""Seconds a connection may sit unused before it is tried before its next use."""
_SESSION_LOCKS = 0x6170
"""The first key of the advisory locks under which one session's approvals are counted and entered."""
_COLUMNS = ("id", "created", "expires", "status", "binding", "call", "decided_at", "decided_by", "channel", "note")
_ROW = ", ".join(f"a.{column}" for column in _COLUMNS)


def approval_queue(config: Config) -> Queue:
    """The approval queue `config` uses: in the shared store when `[gateway] store` names one, else the file."""
    store = database(config)
    return ApprovalQueue(config.approvals_path) if store is None else SharedApprovalQueue(store)


def approval_states(config: Config) -> SharedApprovalStates | None:
    """The approval states' key and used-once record every replica shares (`None` without a store: each
    gateway process keeps its own)."""
    store = database(config)
    return None if store is None else SharedApprovalStates(store)


class _Link:
    """One connection to the store for one caller at a time: made when first needed, dropped when it fails
    (the next use makes another), and tried before use after a while idle (the server may have restarted
    since, and a first statement failing on a connection it closed would refuse a call for nothing)."""

    def __init__(self, store: Database, what: str) -> None:
        self.store = store
        self._what = what
        self._connection: psycopg.Connection[Any] | None = None
        self._used = 0.0
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[psycopg.Connection[Any]]:
        _require_driver(self._what)
        import psycopg

        with self._lock:
            try:
                if self._connection is not None and (
                    time.monotonic() - self._used >= IDLE_CHECK or _has_news(self._connection)
                ):
                    try:
                        self._connection.execute("SELECT 1")
                    except psycopg.Error:
                        self.close()
                if self._connection is None or self._connection.closed:
                    self._connection = None
                    connection = self.store.connect()
                    try:
                        self.store.check_schema(connection)
                    except BaseException:
                        connection.close()
                        raise
                    self._connection = connection
                self._used = time.monotonic()
                yield self._connection
            except StoreError as exc:
                self.close()
                raise ApprovalsError(f"{self._what} cannot be used: {exc}") from None
            except psycopg.Error as exc:
                self.close()  # perhaps broken: a new one next time
                raise ApprovalsError(f"{self.store.shown}: {self._what} cannot be used: {first_line(exc)}") from None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __del__(self) -> None:
        # A queue dropped without `close` (a console's, at the end of its process) lets go of its connection
        # here, rather than leaving the driver to warn about it.
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            connection.close()


def _has_news(connection: psycopg.Connection[Any]) -> bool:
    """Whether the server has said something on an idle connection (it says why it ends one: a restart, an
    administrator), so that it is tried before use however recently it was used."""
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _require_driver(what: str) -> None:
    """`ApprovalsError` saying how to install psycopg, when it is not installed."""
    try:
        require_driver()
    except StoreError as exc:
        raise ApprovalsError(f"{what} cannot be used: {exc}") from None


class SharedApprovalQueue:
    """The approval queue in the shared store: entering, deciding, spending and listing approvals."""

    remote = True

    def __init__(self, store: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.where = f"the store {store.shown}"
        self._clock = clock
        self._link = _Link(store, "the approval queue")

    def now(self) -> float:
        return self._clock()

    def ask(self, call: AskedCall, binding: str, ttl: float, *, most: int | None = None) -> Entry:
        """Enter a pending approval for `call`, expiring `ttl` seconds from now; refused (`ApprovalsError`)
        when its session already has `most` waiting (on any replica)."""
        now = self._clock()
        record = json.dumps(call.to_record())
        with self._link() as db, db.transaction():
            if most is not None:
                # Replicas entering calls of one session take turns: none counts before another's row is in.
                db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SESSION_LOCKS, call.session))
                row = db.execute(
                    "SELECT count(*) FROM approvals WHERE status = 'pending' AND expires > %s AND session_id = %s",
                    (now, call.session),
                ).fetchone()
                refuse_crowding(call, int(row[0]) if row else 0, most)
            while True:  # ~40 bits of id: a clash is rare, and retried
                entry_id = new_id()
                inserted = db.execute(
                    "INSERT INTO approvals (id, created, expires, status, binding, call, session_id, holder) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (entry_id, now, now + ttl, Status.PENDING.value, binding, record, call.session, call.gateway),
                )
                if inserted.rowcount == 1:
                    break
            _changed(db)
        return Entry(entry_id, now, now + ttl, Status.PENDING, binding, call)

    def decide(
        self,
        entry_id: str,
        *,
        approve: bool,
        by: str,
        channel: str,
        note: str = "",
        binding: str | None = None,
        record: Record | None = None,
    ) -> Entry:
        """Approve or deny a pending, unexpired approval: the decided entry, recorded by `record` before it
        commits. Raises `ApprovalsError` (one line) when it is not there to decide, or was decided first
        on another replica."""
        now = self._clock()
        gone: str | None = None
        with self._link() as db, db.transaction():
            entry = _row(db, entry_id)
            if entry is None:
                raise ApprovalsError(f"no approval {entry_id!r} (see `mcp-armor approvals list`)")
            if entry.shown_status(now) is Status.PENDING and _holder_gone(db, entry.call.gateway):
                # Its replica is gone: nobody is left to spend an approval. Closed (and committed) before
                # refusing, so no replica shows it as waiting any more.
                gone = f"the gateway holding it ({entry.call.gateway}) is gone"
                _close(db, entry_id, Status.EXPIRED, gone, now, Status.PENDING)
            else:
                refuse_undecidable(entry, now, binding)
                status = Status.APPROVED if approve else Status.DENIED
                taken = db.execute(
                    "UPDATE approvals AS a SET status = %s, decided_at = %s, decided_by = %s, channel = %s, note = %s "
                    f"WHERE id = %s AND status = 'pending' AND expires > %s RETURNING {_ROW}",
                    (status.value, now, by, channel, note or None, entry_id, now),
                ).fetchone()
                if taken is None:  # decided (or closed) on another replica since it was read
                    later = _row(db, entry_id)
                    settled = later.settled(now) if later is not None else None
                    raise ApprovalsError(settled or f"approval {entry_id} is no longer pending: nothing to decide")
                decided = _read(taken)
                if record is not None:
                    record(decided)
            _changed(db)
        if gone is not None:
            raise ApprovalsError(f"approval {entry_id} is expired: {gone}")
        return decided

    def spend(self, entry_id: str, binding: str) -> bool:
        """Use an approval for the call it was given for: `True` once (on one replica), for an approved
        row with `binding`."""
        with self._link() as db, db.transaction():
            spent = db.execute(
                "UPDATE approvals SET status = 'used' WHERE id = %s AND status = 'approved' AND binding = %s",
                (entry_id, binding),
            ).rowcount
            if spent == 1:
                _changed(db)
            return spent == 1

    def close_out(self, entry_id: str, status: Status, note: str, *, only: Status = Status.PENDING) -> bool:
        """Move a row from `only` to `status` (expired, withdrawn, void), saying why: `True` if it moved."""
        with self._link() as db, db.transaction():
            moved = _close(db, entry_id, status, note, self._clock(), only)
            if moved:
                _changed(db)
            return moved

    def get(self, entry_id: str) -> Entry | None:
        with self._link() as db:
            return _row(db, entry_id)

    def entries(self, *, pending_only: bool = False, since: float | None = None, limit: int = 200) -> list[Entry]:
        """The newest entries first (with `pending_only`, only those still to decide: pending, unexpired,
        and held by a replica that is still there)."""
        where, params = ["true"], []  # type: list[str], list[Any]
        if pending_only:
            where.append(f"a.status = 'pending' AND a.expires > %s AND NOT {_SETTLED % 'a.holder'}")
            params.append(self._clock())
        if since is not None:
            where.append("a.created >= %s")
            params.append(since)
        with self._link() as db:
            rows = db.execute(
                f"SELECT {_ROW} FROM approvals AS a WHERE {' AND '.join(where)} ORDER BY a.created DESC LIMIT %s",
                (*params, limit),
            ).fetchall()
        found = [_read(row) for row in rows]
        if pending_only:  # a gateway killed on this host before its replica was settled: nobody can spend them
            found = [entry for entry in found if not _gone(entry.call.gateway)]
        return found

    def stats(self, since: float) -> list[RuleStats]:
        """Per rule, since `since`: how often it asked, and how many were approved, denied, left unanswered."""
        now = self._clock()
        with self._link() as db:
            rows = db.execute(f"SELECT {_ROW} FROM approvals AS a WHERE a.created >= %s", (since,)).fetchall()
        return tally((_read(row) for row in rows), since, now)

    def version(self) -> int:
        """A number that changes whenever any replica changes the queue (one row read)."""
        with self._link() as db:
            row = db.execute("SELECT version FROM approvals_version WHERE id = 1").fetchone()
        return int(row[0]) if row is not None else -1

    def close(self) -> None:
        with self._link._lock:
            self._link.close()


class SharedApprovalStates:
    """The key of approval bindings and sealed states, and the nonces of states redeemed, that every
    replica shares: a state sealed on one replica is honoured on another, and only once on any."""

    blocking = True
    """Reading the key the first time, and each redemption, wait on the store (the gateway uses a worker thread)."""

    def __init__(self, store: Database) -> None:
        self._link = _Link(store, "the approval state")
        self._key: bytes | None = None
        self._pruned = 0.0

    def key(self) -> bytes:
        """The shared key (read from the store once, then kept)."""
        if self._key is None:
            with self._link() as db:
                self._key = shared_key(db, STATE_KEY)
        return self._key

    def close(self) -> None:
        with self._link._lock:
            self._link.close()

    def first_use(self, nonce: str, until: float, now: float) -> bool:
        """Record `nonce` as redeemed, until `until`: `True` only the first time, on any replica."""
        with self._link() as db:
            if now - self._pruned >= PRUNE_EVERY:
                db.execute("DELETE FROM approval_states_used WHERE expires < %s", (now - CLOCK_SLACK,))
                self._pruned = now
            inserted = db.execute(
                "INSERT INTO approval_states_used (nonce, expires) VALUES (%s, %s) ON CONFLICT (nonce) DO NOTHING",
                (nonce, until),
            )
            return inserted.rowcount == 1


def _changed(db: psycopg.Connection[Any]) -> None:
    """Inside a write: say that the queue changed (waiting gateways and console pages look again)."""
    db.execute("UPDATE approvals_version SET version = version + 1 WHERE id = 1")


def _row(db: psycopg.Connection[Any], entry_id: str) -> Entry | None:
    row = db.execute(f"SELECT {_ROW} FROM approvals AS a WHERE a.id = %s", (entry_id,)).fetchone()
    return None if row is None else _read(row)


def _read(row: Any) -> Entry:
    try:
        return _entry(row)
    except (ValueError, TypeError) as exc:  # a row no mcp-armor wrote (an unknown status, a call not JSON)
        raise ApprovalsError(f"the approval queue holds a row it cannot read ({exc})") from None


def _close(db: psycopg.Connection[Any], entry_id: str, status: Status, note: str, now: float, only: Status) -> bool:
    """Inside a write: move a row from `only` to `status`, saying why (its decision time kept if it had one)."""
    cursor = db.execute(
        "UPDATE approvals SET status = %s, note = %s, decided_at = coalesce(decided_at, %s) "
        "WHERE id = %s AND status = %s",
        (status.value, note, now, entry_id, only.value),
    )
    return cursor.rowcount == 1


def _holder_gone(db: psycopg.Connection[Any], holder: str) -> bool:
    """Whether the replica holding a call (`host:pid`) is gone: settled as gone in `replicas`, or, on this
    host, its process has ended."""
    if _gone(holder):
        return True
    row = db.execute(f"SELECT {_SETTLED % '%s'}", (holder,)).fetchone()
    return bool(row is not None and row[0])


_SETTLED = (
    "coalesce((SELECT bool_and(r.settled IS NOT NULL) FROM replicas AS r WHERE split_part(r.name, '/', 1) = %s), false)"
)
"""Whether the holder (`host:pid`) has replicas in the audit's `replicas` table (each named `host:pid/random`),
all settled as gone: a live one of the same name is a process reusing the id (a container restarted)."""
