"""The audit log in the shared store (`[gateway] store`): one hash chain for every replica, in PostgreSQL.

Every replica appends to the one chain through the database function `append_events`
(gateway/store/schema.py), which locks the chain's head row, chains each event's hash to the one
before and inserts them, in one statement: replicas take turns on the head, and each turn takes a
whole group of events (group commit), so the chain stays one total order however many replicas write.
There is no local journal: a call's decision is committed in the database before the call is
forwarded, so a replica lost with its disk loses no decision.

A replica is alive while it holds a session-level advisory lock on its own key (the `replicas` table);
the server drops the lock when the replica's connection ends, however the process ended. A replica
whose lock is free and that has not been seen for `GONE_AFTER` seconds is gone: a survivor (or the
next replica to start) records an `interrupted` outcome for each call it decided and never ended, and
ends its sessions, as the SQLite log's leases do. A call's decision and outcome and a session's start
and end are each stored once (a second one, such as a late outcome of a call settled as interrupted,
or a group retried after the answer to its commit was lost, is left out by `append_events`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from gateway.audit.anchor import Anchoring, HeadAnchor
from gateway.audit.chain import Row, Verification, canonical, walk_rows
from gateway.audit.leases import endings
from gateway.audit.queries import EVERY, SESSIONS, Filters, where_clause
from gateway.audit.recorder import Ticket, hold_within
from gateway.audit.store import session_row
from gateway.errors import AuditError, StoreError
from gateway.policy.redact import Redactor
from gateway.store.postgres import Database, first_line, require_driver, shared_key_async

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

MASK_KEY = "audit-mask"
"""The shared key the masking markers are made with, so that every replica's markers agree."""
HEARTBEAT = 2.0
"""How often a replica says it is alive, and looks for replicas that are gone."""
GONE_AFTER = 10.0
"""How long a replica whose lock is free must also have been silent (and the database server up) before
it is taken for gone: a database restart drops every lock at once, and live replicas take theirs again."""
COMMIT_TIMEOUT = 5.0
"""How long a group's commit may take before the database is taken for unreachable (the callers are refused)."""
RETRY_AFTER = (0.05, 0.1, 0.2, 0.5)
"""Waits between attempts to reach the database again while it is away and nobody is recording (a caller
recording makes the next attempt at once: the callers waiting meanwhile share it)."""
_COLUMNS = ("kind", "session_id", "call_id", "tool", "decision", "outcome", "ts", "principal", "lease")
APPEND = "SELECT head_seq, head_hash, appended FROM append_events(%s, %s)"
_EVENTS, _FIELDS, _NULL = "\x1e", "\x1f", "\x1d"
"""How `append_events` reads a group (gateway/store/schema.py): events apart, fields apart, a NULL field."""
_CONTROL = re.compile("[\x00-\x1f]")


def _column(value: Any) -> str | None:
    """A body field as its query column holds it: text PostgreSQL can store and `append_events` can read (a
    control character is written U+FFFD, a lone surrogate `?`)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if _CONTROL.search(text):
        text = _CONTROL.sub("\ufffd", text)
    return text


def columns(body: Mapping[str, Any]) -> tuple[str | None, ...]:
    """The query columns of an event body, in `_COLUMNS` order."""
    return tuple(_column(body.get(name)) for name in _COLUMNS)


class _Event:
    """An event ready to append: its canonical text and its query columns, as `append_events` reads them."""

    __slots__ = ("kept", "kind", "line")

    def __init__(self, text: str, fields: tuple[str | None, ...]) -> None:
        self.kind = fields[0]
        self.line = _FIELDS.join((text, *(_NULL if field is None else field for field in fields)))
        self.kept = False
        """Queued without a caller waiting: kept and committed later when a commit fails (a recorded
        event whose commit fails is its caller's to handle: it was told)."""

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> _Event:
        return cls(canonical(body), columns(body))

    @classmethod
    def of_text(cls, text: str) -> _Event:
        return cls(text, columns(json.loads(text)))


def _group(events: Sequence[_Event], *, durable: bool = True) -> tuple[str, bool]:
    """The arguments of `append_events`: the events as one text, and whether the commit waits for the disk."""
    return _EVENTS.join(event.line for event in events), durable


def _columns_problem(row: Row, stored: tuple[Any, ...]) -> str | None:
    """Why the columns stored beside a body do not say what the body says (`None` when they do)."""
    expected = columns(json.loads(row[3]))
    for name, want, have in zip(_COLUMNS, expected, stored, strict=True):
        if want != have:
            return f"column {name} does not match the event's body (edited)"
    return None


class SharedAuditStore:
    """One connection to the audit log in the shared store: for reading, and for appending outside a
    running gateway (a command recording what it changes, settling, `audit migrate`)."""

    def __init__(self, database: Database, connection: psycopg.Connection[Any]) -> None:
        self.database = database
        self._db = connection
        self.path = database.shown
        """What messages name the log by (the store's URL without its password)."""

    @classmethod
    def open_writer(cls, database: Database) -> SharedAuditStore:
        """Open for appending, creating or migrating the schema as needed."""
        try:
            database.migrate()
            return cls(database, database.connect())
        except StoreError as exc:
            raise AuditError(f"cannot write the audit log: {exc}") from None

    @classmethod
    def open_reader(cls, database: Database) -> SharedAuditStore:
        try:
            connection = database.connect()
        except StoreError as exc:
            raise AuditError(f"cannot read the audit log: {exc}") from None
        try:
            database.check_schema(connection)
        except StoreError as exc:
            connection.close()
            raise AuditError(f"cannot read the audit log: {exc}") from None
        return cls(database, connection)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _using(self, doing: str) -> Iterator[None]:
        require_driver()
        import psycopg

        try:
            yield
        except psycopg.Error as exc:
            raise AuditError(f"{self.path}: cannot {doing} the audit log: {first_line(exc)}") from None

    def append(self, bodies: Sequence[str], *, journal: object = None) -> int:
        """Append canonical event bodies to the chain in one transaction; the last sequence number."""
        del journal  # the shared log has no journals
        events = [_Event.of_text(text) for text in bodies]
        with self._using("write"):
            row = self._db.execute(APPEND, _group(events)).fetchone()
        assert row is not None
        return int(row[0])

    append_waiting = append
    """The database waits for the head's lock itself."""

    # -- reading -------------------------------------------------------------------------------

    def events(self, filters: Filters = EVERY, *, newest: int | None = None) -> Iterator[dict[str, Any]]:
        where, params = where_clause(filters, postgres=True)
        sql = f"SELECT seq, prev_hash, hash, body FROM events WHERE {where} ORDER BY seq"
        if newest is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(newest)}) AS latest ORDER BY seq"
        with self._using("read"):
            rows = self._db.execute(sql, params).fetchall()
        for seq, prev_hash, digest, body in rows:
            yield {"seq": seq, **json.loads(body), "prev_hash": prev_hash, "hash": digest}

    def last_seq(self) -> int:
        with self._using("read"):
            row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0) if row is not None else 0

    def sessions(self, filters: Filters = EVERY) -> list[dict[str, Any]]:
        where, params = where_clause(filters, postgres=True)
        with self._using("read"):
            return [session_row(*row) for row in self._db.execute(SESSIONS.format(where=where), params).fetchall()]

    def unended(self, lease: str) -> list[tuple[str, list[dict[str, Any]], bool]]:
        """The sessions whose start names `lease` (a replica): each with its decisions that have no outcome,
        and whether it has ended."""
        with self._using("read"):
            return _Unended(self._db.execute(UNENDED, {"lease": lease}).fetchall()).unended(lease)

    def verify(self, anchors: Sequence[tuple[int, str]] = ()) -> Verification:
        """Walk the whole chain in one snapshot; the first sequence number where it breaks, if any."""
        require_driver()
        import psycopg

        with self._using("read"):
            self._db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            try:
                with self._db.transaction():
                    head = self._db.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
                    assert head is not None
                    with self._db.cursor(name="walk") as cursor:
                        cursor.itersize = 5000
                        cursor.execute(
                            f"SELECT seq, prev_hash, hash, body, {', '.join(_COLUMNS)} FROM events ORDER BY seq"
                        )
                        extra: dict[int, tuple[Any, ...]] = {}

                        def rows() -> Iterator[Row]:
                            for record in cursor:
                                extra[record[0]] = tuple(record[4:])
                                yield (record[0], record[1], record[2], record[3])

                        def check(row: Row) -> str | None:
                            return _columns_problem(row, extra.pop(row[0]))

                        return walk_rows(rows(), int(head[0]), str(head[1]), anchors, check)
            finally:
                self._db.isolation_level = None


UNENDED = """
    SELECT session_id, ended, body FROM (
        SELECT s.seq AS started, d.seq, s.session_id,
               EXISTS (SELECT 1 FROM events x WHERE x.session_id = s.session_id AND x.kind = 'session_end') AS ended,
               d.body
        FROM events s
        LEFT JOIN events d ON d.session_id = s.session_id AND d.kind = 'decision'
            AND (d.lease = %(lease)s OR d.lease IS NULL)
            AND NOT EXISTS (SELECT 1 FROM events o WHERE o.call_id = d.call_id AND o.kind = 'outcome')
        WHERE s.kind = 'session_start' AND s.lease = %(lease)s
        UNION ALL
        SELECT d.seq, d.seq, d.session_id, true, d.body
        FROM events d
        WHERE d.kind = 'decision' AND d.lease = %(lease)s
          AND NOT EXISTS (SELECT 1 FROM events o WHERE o.call_id = d.call_id AND o.kind = 'outcome')
          AND NOT EXISTS (SELECT 1 FROM events s
                          WHERE s.session_id = d.session_id AND s.kind = 'session_start' AND s.lease = %(lease)s)
    ) AS open ORDER BY started, seq
"""
"""Each session a replica started: whether it ended, and each of its decisions without an outcome that this
replica made (a decision names its replica's lease; one recorded before decisions did is the session's);
then each decision without an outcome it made in a session another replica started (ended: not its to end).
A stateless session has one id on every replica, and its start is stored once, naming one of them."""


class _Unended:
    """The sessions a replica started that have something open, from the rows of `UNENDED`."""

    def __init__(self, rows: Sequence[tuple[str, bool, str | None]]) -> None:
        found: dict[str, tuple[list[dict[str, Any]], bool]] = {}
        for session, ended, decision in rows:
            decisions, _ = found.setdefault(session, ([], bool(ended)))
            if decision is not None:
                decisions.append(json.loads(decision))
        self.found = [(session, decisions, ended) for session, (decisions, ended) in found.items()]

    def unended(self, lease: str) -> list[tuple[str, list[dict[str, Any]], bool]]:
        del lease  # read for that lease already
        return self.found


COPY_BATCH = 2000


def copy_chain(rows: Iterable[Row], head: tuple[int, str], database: Database, mask: bytes | None) -> int:
    """Copy a whole chain (a SQLite log's rows, verified already) into the store's empty chain, each event
    with its own sequence number and hashes, in one transaction; how many events. `mask`: the log's
    masking key, kept as the store's when the store has none yet, so markers stay comparable."""
    database.migrate()
    with database.session() as db, db.transaction():
        found = db.execute("SELECT seq FROM head WHERE id = 1 FOR UPDATE").fetchone()
        if found is None or found[0] != 0:
            raise StoreError(
                f"{database.shown}: the store's audit chain holds {found[0] if found else '?'} events already; "
                "a log can only be copied into an empty one"
            )
        names = ["seq", "prev_hash", "hash", "body", *_COLUMNS]
        insert = f"INSERT INTO events ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
        count, batch = 0, []
        with db.cursor() as cursor:
            for row in rows:
                batch.append((*row, *columns(json.loads(row[3]))))
                if len(batch) >= COPY_BATCH:
                    cursor.executemany(insert, batch)
                    count, batch = count + len(batch), []
            cursor.executemany(insert, batch)
            count += len(batch)
        db.execute("UPDATE head SET seq = %s, hash = %s WHERE id = 1", head)
        if mask is not None:
            db.execute("INSERT INTO keys VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (MASK_KEY, mask))
    return count


class SharedRecorder:
    """This replica's writer of the shared audit log: every event committed in the database, in groups."""

    def __init__(self, database: Database, *, sync: str = "normal", anchoring: Anchoring | None = None) -> None:
        self.database = database
        self.path = database.shown
        self.sync = sync
        """`normal`: a group holding a decision is on the database's disk before its callers go on, other
        groups once the server has them (its WAL writer puts them on disk a moment later); `full`: every group
        is on disk first."""
        self.anchoring = anchoring
        self.name = f"{socket.gethostname()}:{os.getpid()}/{secrets.token_hex(4)}"
        """This replica's name in the store (`host:pid/random`): its sessions' starts name it as their lease."""
        self._lock_key = secrets.randbits(63)
        self.redactor = Redactor(secrets.token_bytes(32))
        """Masks with the store's shared key once it has been read (a key of its own until then)."""
        self.failure: str | None = None
        """Why the log cannot be written right now (`None` while it can)."""
        self.head: tuple[int, str] | None = None
        self._waiting: list[_Event] = []
        self._tickets: list[Ticket] = []
        self._wake = asyncio.Event()
        self._writer: psycopg.AsyncConnection[Any] | None = None
        self._keeper: psycopg.AsyncConnection[Any] | None = None
        """The connection that holds this replica's lock, says it is alive, and settles gone replicas."""
        self._keyed = False
        self._attempts = 0
        self._anchor = HeadAnchor(anchoring, lambda: self.head) if anchoring is not None and anchoring.enabled else None
        self._stopping = asyncio.Event()
        """Set when the gateway stops: no new recording, the writer's last round, the loops end."""
        self._seen_at = -math.inf
        """When this replica last said it is alive (`replicas.seen`)."""
        self._committing = False
        """A group is being committed, by the writer task or by a caller committing its own."""

    @property
    def lease_name(self) -> str:
        return self.name

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SharedRecorder]:
        """Set up the schema, join the replicas (settling any that are gone) and run the writer; on exit,
        commit everything still waiting and leave."""
        try:
            await anyio.to_thread.run_sync(self.database.migrate)
        except StoreError as exc:
            self.failure = f"cannot write the audit log: {exc}"
            logger.error("%s; every tool call will be refused until it can be written", self.failure)
        else:
            await self._keep()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop)
            tg.start_soon(self._keep_loop)
            if self._anchor is not None:
                tg.start_soon(self._anchor.run)
            try:
                yield self
            finally:
                self._stopping.set()
                self._wake.set()
                if self._anchor is not None:
                    self._anchor.stop()
        if self._anchor is not None:
            self._anchor.write()  # the head as the gateway leaves it
        await self._leave()

    async def _leave(self) -> None:
        """Close the connections; a replica that leaves with nothing open is marked settled by itself."""
        if self._waiting:
            logger.error(
                "%s: %d audit events could not be committed before the gateway stopped", self.path, len(self._waiting)
            )
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(COMMIT_TIMEOUT):
                try:
                    if not self._waiting:
                        await keeper.execute("UPDATE replicas SET settled = now() WHERE name = %s", (self.name,))
                except Exception as exc:  # leaving anyway: the survivors settle it
                    logger.debug("could not mark replica %s as left: %s", self.name, exc)
            await keeper.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    # -- recording -----------------------------------------------------------------------------

    def queue(self, *bodies: Mapping[str, Any]) -> None:
        """Queue events without waiting for their commit (order is kept with everything else queued); while
        the database is away they wait, and are committed once it is back."""
        events = [_Event.of(body) for body in bodies]
        for event in events:
            event.kept = True
        self._add(events)
        self._wake.set()

    async def record(self, *bodies: Mapping[str, Any], alone: bool = False) -> None:
        """Record events before the caller goes on: committed in the database (with whatever else waits
        at that moment); `AuditError` when they could not be (the caller decides what to record instead:
        gateway/audit/stages.py queues what the agent was told)."""
        del alone  # every event waits for its commit: there is no local journal to make it durable first
        if self._stopping.is_set():
            raise AuditError(f"{self.path}: the audit log is closed (the gateway is shutting down)")
        events = [_Event.of(body) for body in bodies]
        ticket = Ticket()
        self._tickets.append(ticket)
        self._add(events)
        if self._committing:
            self._wake.set()  # a commit is under way: the writer takes these with whatever else comes meanwhile
        else:
            # Nobody is committing: commit here, saving the hops to the writer task and back. Shielded: a
            # caller cancelled mid-commit must not leave the connection in the middle of a statement.
            with anyio.CancelScope(shield=True):
                error = await self._flush()
            if error is not None or self._waiting:
                self._wake.set()  # what came meanwhile, or a retry later
        await ticket.done.wait()
        if ticket.error is not None:
            raise AuditError(ticket.error)

    def _add(self, events: list[_Event]) -> None:
        """Wait in line for the next commit (trimmed, with a log line, past what memory may hold)."""
        self._waiting.extend(events)
        hold_within(self._waiting, self.path)

    def _retry_wait(self) -> float:
        return RETRY_AFTER[min(self._attempts, len(RETRY_AFTER)) - 1] if self._attempts else 0.0

    def anchor_soon(self) -> None:
        """Anchor the head once what is queued now is committed (a session ended, say)."""
        if self._anchor is not None:
            self._anchor.soon()

    async def _write_loop(self) -> None:
        """Commit what waits, in groups, until the gateway stops (then once more, unless the database is away)."""
        while True:
            if not self._stopping.is_set():
                await self._wake.wait()
                self._wake = asyncio.Event()
            while self._waiting or self._tickets:
                if self._committing:
                    break  # a caller is committing its own: it wakes this task if more waits when it is done
                error = await self._flush()
                if error is not None:
                    if self._stopping.is_set():
                        break
                    if not self._tickets:  # nobody waits: try again in a while, or as soon as someone records
                        self._wake = asyncio.Event()
                        with anyio.move_on_after(self._retry_wait()):
                            await self._wake.wait()
            if self._stopping.is_set():
                return

    async def _flush(self) -> str | None:
        """Commit everything waiting as one group and tell its callers how it went. One commit at a time
        (`_committing`), so the groups reach the chain in the order they were recorded."""
        events, tickets = self._waiting, self._tickets
        self._waiting, self._tickets = [], []
        self._committing = True
        try:
            error = await self._commit(events) if events else None
        finally:
            self._committing = False
        for ticket in tickets:
            ticket.error = error
            ticket.done.set()
        if error is not None:
            self._waiting[:0] = [event for event in events if event.kept]  # committed once the database is back
            self._add([])
        return error

    async def _commit(self, events: list[_Event]) -> str | None:
        """Append one group; why not, when it could not be committed."""
        require_driver()
        import psycopg

        try:
            with anyio.fail_after(COMMIT_TIMEOUT):
                writer = await self._connection()
                durable = self.sync == "full" or any(event.kind == "decision" for event in events)
                cursor = await writer.execute(APPEND, _group(events, durable=durable))
                row = await cursor.fetchone()
                if self._keeper is None and anyio.current_time() - self._seen_at >= HEARTBEAT:
                    await self._seen(writer)  # the keeper cannot reach the store, but this replica writes
        except (psycopg.Error, StoreError, TimeoutError, OSError) as exc:
            return await self._failed(exc)
        assert row is not None
        self.head = (int(row[0]), str(row[1]))
        if self.failure is not None:
            logger.warning("%s: the audit log can be written again", self.path)
        self.failure = None
        self._attempts = 0
        if self._anchor is not None:
            self._anchor.committed()
        return None

    async def _failed(self, exc: BaseException) -> str:
        writer, self._writer = self._writer, None
        if writer is not None:
            with anyio.CancelScope(shield=True):
                await writer.close()
        what = first_line(exc) if not isinstance(exc, TimeoutError) else f"no answer within {COMMIT_TIMEOUT:g}s"
        if isinstance(exc, StoreError):
            failure = f"cannot write the audit log: {exc}"
        else:
            failure = f"{self.path}: cannot write the audit log: {what}"
        if self.failure is None:
            logger.error("%s; tool calls are refused until it can be written", failure)
        self.failure = failure
        self._attempts += 1
        return failure

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._writer is None or self._writer.closed:
            self._writer = await self.database.connect_async()
            if not self._keyed:
                await self._read_key(self._writer)
            # The row its sessions name exists before the first of them is recorded, keeper or not.
            await self._seen(self._writer)
        return self._writer

    async def _read_key(self, db: psycopg.AsyncConnection[Any]) -> None:
        """Mask with the key every replica shares (before the first event this replica records)."""
        self.redactor = Redactor(await shared_key_async(db, MASK_KEY))
        self._keyed = True

    # -- replicas ------------------------------------------------------------------------------

    async def _keep(self) -> None:
        """Hold this replica's lock, say it is alive, and settle replicas that are gone (connecting first
        if need be). Failing is logged, never raised: the writer reports the database being away."""
        require_driver()
        import psycopg

        try:
            with anyio.fail_after(COMMIT_TIMEOUT):
                keeper = self._keeper
                if keeper is None or keeper.closed:
                    self._keeper = keeper = await self.database.connect_async()
                    if not self._keyed:
                        await self._read_key(keeper)
                    await self._join(keeper)
                await keeper.execute("UPDATE replicas SET seen = now() WHERE name = %s", (self.name,))
                await self._settle_gone(keeper)
        except (psycopg.Error, StoreError, TimeoutError, OSError) as exc:
            lost, self._keeper = self._keeper, None
            if lost is not None:
                with anyio.CancelScope(shield=True):
                    await lost.close()
            logger.debug("replica %s cannot reach the store: %s", self.name, exc)

    async def _seen(self, db: psycopg.AsyncConnection[Any]) -> None:
        """This replica is alive: its row made if need be, its `seen` now."""
        host, _, pid = self.name.partition("/")[0].rpartition(":")
        await db.execute(
            "INSERT INTO replicas (name, lock_key, host, pid) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET seen = now()",
            (self.name, self._lock_key, host, int(pid)),
        )
        self._seen_at = anyio.current_time()

    async def _join(self, keeper: psycopg.AsyncConnection[Any]) -> None:
        await self._seen(keeper)
        cursor = await keeper.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,))
        row = await cursor.fetchone()
        if row is None or not row[0]:
            raise StoreError(f"{self.path}: replica {self.name}'s lock is held by another connection")
        cursor = await keeper.execute("SELECT settled FROM replicas WHERE name = %s", (self.name,))
        row = await cursor.fetchone()
        if row is not None and row[0] is not None:
            logger.warning(
                "%s: this replica (%s) was away from the store long enough to be taken for gone: the calls it "
                "had open were recorded as interrupted",
                self.path,
                self.name,
            )
            await keeper.execute("UPDATE replicas SET settled = NULL WHERE name = %s", (self.name,))

    async def _settle_gone(self, keeper: psycopg.AsyncConnection[Any]) -> None:
        # A replica last seen before the database server (re)started is given `GONE_AFTER` from the start to
        # take its lock again: the restart dropped every lock, and a live replica's `seen` stopped with it.
        cursor = await keeper.execute(
            "SELECT name, lock_key FROM replicas WHERE settled IS NULL AND name <> %s "
            "AND greatest(seen, pg_postmaster_start_time()) < now() - make_interval(secs => %s)",
            (self.name, GONE_AFTER),
        )
        for name, lock_key in await cursor.fetchall():
            async with keeper.transaction():
                cursor = await keeper.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key,))
                free = await cursor.fetchone()
                if free is None or not free[0]:
                    continue  # alive (reconnected meanwhile), or being settled by another replica
                # Looked at again under the row's lock: a replica rejoining since the list above was read has
                # said it is alive (its `seen` is written before it takes its lock again).
                cursor = await keeper.execute(
                    "SELECT settled IS NULL AND greatest(seen, pg_postmaster_start_time()) "
                    "< clock_timestamp() - make_interval(secs => %s) FROM replicas WHERE name = %s FOR UPDATE",
                    (GONE_AFTER, name),
                )
                state = await cursor.fetchone()
                if state is None or not state[0]:
                    continue
                bodies = await _endings_async(keeper, name)
                if bodies:
                    await keeper.execute(APPEND, _group([_Event.of(body) for body in bodies]))
                await keeper.execute("UPDATE replicas SET settled = now() WHERE name = %s", (name,))
            interrupted = sum(body["kind"] == "outcome" for body in bodies)
            logger.warning(
                "%s: replica %s is gone; %d of its calls are recorded as interrupted", self.path, name, interrupted
            )

    async def _keep_loop(self) -> None:
        while not self._stopping.is_set():
            with anyio.move_on_after(HEARTBEAT):
                await self._stopping.wait()
            if not self._stopping.is_set():
                await self._keep()


async def _endings_async(db: psycopg.AsyncConnection[Any], lease: str) -> list[dict[str, Any]]:
    """`leases.endings` for a gone replica, read through an async connection."""
    cursor = await db.execute(UNENDED, {"lease": lease})
    return endings(_Unended(await cursor.fetchall()), lease, f"replica {lease}")
