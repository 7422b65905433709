"""The audit log's SQLite file: schema and migrations, appending to the chain, queries and verification.

Synchronous (stdlib `sqlite3`) and free of the event loop: the recorder decides where a commit
runs. The file is in WAL mode, so readers (the CLI) never block the writer, and several gateway
processes can append to one file: each batch is appended inside `BEGIN IMMEDIATE`, continuing the
chain from whatever head the file has at that moment.

The chain (see `audit/chain.py`): the `head` row, updated in the same transaction as the events,
records the last sequence number and hash, so removing events from the end is detected too.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit.chain import GENESIS, Verification, chain_hash, walk
from gateway.audit.keys import adopt_mask_key, log_keys
from gateway.audit.queries import EVERY, SESSIONS, Filters, where_clause
from gateway.config.models import IN_MEMORY
from gateway.errors import AuditError, EmptyLog, NoLogYet

SCHEMA_VERSION = 3
READABLE_VERSIONS = range(1, SCHEMA_VERSION + 1)
"""Schemas a reader can query: they differ only in indexes and bookkeeping beside the chain."""
FIELDS = (
    "ts",
    "kind",
    "session_id",
    "call_id",
    "upstream",
    "tool",
    "arguments",
    "decision",
    "rules",
    "reason",
    "outcome",
    "duration_ms",
    "principal",
    "attributes",
)
"""Every event body has these keys (null where they do not apply); an export adds seq, prev_hash, hash.
`principal` names the authenticated principal of the event's session; `attributes` (a session's start,
a decision) its attributes."""
KINDS = (
    "session_start",
    "session_end",
    "decision",
    "outcome",
    "catalog",
    "policy_reload",
    "pin",
    "upstream",
    "upstream_request",
    "principal",
    "approval",
)
"""Every kind of event the gateway records (`approval`: a person's decision on a queued call, recorded by
`mcp-armor approvals` before the queue changes)."""

_COLUMNS = ("kind", "session_id", "call_id", "tool", "decision", "outcome", "ts")
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, "
        "body TEXT NOT NULL, "
        + ", ".join(f"{name} TEXT GENERATED ALWAYS AS (json_extract(body, '$.{name}')) VIRTUAL" for name in _COLUMNS)
        + ")",
        "CREATE TABLE head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL)",
        "CREATE INDEX events_session ON events (session_id, seq)",
        "CREATE INDEX events_call ON events (call_id)",
    ),
    2: (
        # Every append paid for an index that no query uses (the decision filter reads a subquery).
        "DROP INDEX IF EXISTS events_call",
        # How far each journal (see gateway.audit.journal) has been moved into the chain.
        "CREATE TABLE IF NOT EXISTS journals (name TEXT PRIMARY KEY, drained INTEGER NOT NULL)",
    ),
    # The masking key moves out of the log into its key file (gateway.audit.keys, done in `_migrate`),
    # and journals are authenticated: an older mcp-armor, which would write neither so, must not write here.
    3: (),
}


Mark = tuple[str, int]
"""A journal's name and a byte offset in it."""


def iso_utc(moment: datetime) -> str:
    """The log's time format: ISO 8601 in UTC to the millisecond (`2026-11-23T10:42:07.123Z`), so
    times compare as strings."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_second: list[Any] = [-1, ""]
"""The last whole second `now_iso` formatted, and its text."""


def now_iso() -> str:
    """The current time in the log's format (as `iso_utc`), formatting each second only once."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event body: every stable field present (null where it does not apply), then the kind's own."""
    body: dict[str, Any] = dict.fromkeys(FIELDS)
    body["ts"] = now_iso()
    body["kind"] = kind
    body.update(fields)
    return body


def use_wal(connection: sqlite3.Connection, within: float) -> str:
    """Put the file in WAL mode (it stays so) and say which mode it is in. The switch, made by whichever
    process opens a new file first, needs the file to itself, and SQLite answers "locked" at once instead
    of waiting: another process opening the same new file is then waited for, up to `within` seconds."""
    deadline = time.monotonic() + within
    pause = 0.001
    while True:
        try:
            return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # blocking, as SQLite's own busy timeout is
        pause = min(pause * 2, 0.05)


class AuditStore:
    """One connection to the audit file: the writer's (`open_writer`) or a reader's (`open_reader`)."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        self.head: tuple[int, str] | None = None
        """The chain head this connection last committed (seq, hash), for anchoring it."""

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open_writer(cls, path: Path, *, sync: str = "normal") -> AuditStore:
        """Open (creating and migrating as needed) for appending."""
        in_memory = str(path) == IN_MEMORY
        try:
            if not in_memory:
                path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(f"{path}: cannot open the audit log: {exc}") from None
        store = cls(connection, path)
        try:
            connection.execute("PRAGMA busy_timeout = 10000")
            mode = use_wal(connection, 10)
            if mode != "wal" and not in_memory:
                raise AuditError(f"{path}: cannot switch the audit log to WAL mode (it stays {mode})")
            connection.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
            connection.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints run off the event loop
            store._migrate()
            # From here on a locked file fails at once; `append_waiting` (off the event loop) retries.
            connection.execute("PRAGMA busy_timeout = 0")
        except sqlite3.Error as exc:
            connection.close()
            raise AuditError(f"{path}: cannot write the audit log: {exc}") from None
        except AuditError:
            connection.close()
            raise
        return store

    @classmethod
    def open_reader(cls, path: Path) -> AuditStore:
        """Open read-only, for queries and verification.

        Only a missing file is "no log yet": an existing file without the schema is an error, since a
        log emptied (`: > audit.db`) must not pass for one never created.
        """
        if not path.exists():
            raise NoLogYet(f"{path}: no audit log here (it is created when the gateway first serves)")
        try:
            connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            connection.execute("PRAGMA busy_timeout = 10000")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise AuditError(f"{path}: cannot read the audit log: {exc}") from None
        if version == 0:  # emptied, or created by a gateway that has not committed the schema yet
            connection.close()
            raise EmptyLog(f"{path} is empty: it holds no audit log (was it emptied?)")
        if version not in READABLE_VERSIONS:
            connection.close()
            raise AuditError(f"{path}: audit log schema {version}, this mcp-armor reads schema {SCHEMA_VERSION}")
        return cls(connection, path)

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise AuditError(
                    f"{self.path}: audit log schema {version} was written by a newer mcp-armor "
                    f"(this one writes schema {SCHEMA_VERSION})"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("INSERT OR IGNORE INTO head VALUES (1, 0, ?)", (GENESIS,))
            self._move_mask_key(version)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _move_mask_key(self, version: int) -> None:
        """A masking key kept in the log (schema 2 and before) moves to the key file, then leaves the log.

        `meta` is not part of the chain, so the chain verifies as before. Inside the migration's
        transaction: of gateways starting together, one moves it.
        """
        row = self._db.execute("SELECT value FROM meta WHERE key = 'mask_key'").fetchone()
        if row is None:
            if version == 0 and str(self.path) != IN_MEMORY:
                log_keys(self.path)  # a new log: its keys from the start
            return
        if str(self.path) != IN_MEMORY:
            try:
                key = bytes.fromhex(row[0])
            except ValueError:
                key = None  # not a key: nothing to keep
            if key is not None:
                adopt_mask_key(self.path, key)
        self._db.execute("DELETE FROM meta WHERE key = 'mask_key'")

    def close(self) -> None:
        self._db.close()

    # -- writing -------------------------------------------------------------------------------

    def append_waiting(self, bodies: Sequence[str], *, journal: Mark | None = None, seconds: float = 10.0) -> int:
        """`append`, waiting up to `seconds` for another process's write lock (blocks: run it in a thread)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return self.append(bodies, journal=journal)
            except sqlite3.OperationalError as exc:
                if not is_locked(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.002)

    def append(self, bodies: Sequence[str], *, journal: Mark | None = None) -> int:
        """Append canonical event bodies to the chain in one transaction; the last sequence number.

        `journal` (name, offset) says the bodies came from that journal, up to that byte: recorded in
        the same transaction, so whatever replays the journal later starts exactly after them.
        Raises `sqlite3.OperationalError` at once when another process holds the write lock.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq, prev = db.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
            rows = []
            for body in bodies:
                seq += 1
                digest = chain_hash(prev, body)
                rows.append((seq, prev, digest, body))
                prev = digest
            db.executemany("INSERT INTO events (seq, prev_hash, hash, body) VALUES (?, ?, ?, ?)", rows)
            db.execute("UPDATE head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
            if journal is not None:
                db.execute(
                    "INSERT INTO journals VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET drained = excluded.drained",
                    journal,
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.head = (int(seq), prev)
        return int(seq)

    def drained(self, journal: str) -> int:
        """How many bytes of `journal` are in the chain already (0 for one never seen)."""
        row = self._db.execute("SELECT drained FROM journals WHERE name = ?", (journal,)).fetchone()
        return int(row[0]) if row is not None else 0

    def forget_journal(self, journal: str) -> None:
        """The journal file is gone: its offset is no longer needed."""
        self._db.execute("DELETE FROM journals WHERE name = ?", (journal,))

    # -- reading -------------------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise AuditError(f"{self.path}: cannot read the audit log: {exc}") from None

    def events(self, filters: Filters = EVERY, *, newest: int | None = None) -> Iterator[dict[str, Any]]:
        """Events in chain order (with `newest`, only that many of the latest), as exported: the body's
        fields plus seq, prev_hash and hash."""
        where, params = where_clause(filters)
        sql = f"SELECT seq, prev_hash, hash, body FROM events WHERE {where} ORDER BY seq"
        if newest is not None:
            sql = f"SELECT * FROM ({sql} DESC LIMIT {int(newest)}) ORDER BY seq"
        with self._reading():
            for seq, prev_hash, digest, body in self._db.execute(sql, params):
                yield {"seq": seq, **json.loads(body), "prev_hash": prev_hash, "hash": digest}

    def rows(self) -> Iterator[tuple[int, str, str, str]]:
        """Every event as stored (seq, prev_hash, hash, body), in chain order."""
        with self._reading():
            yield from self._db.execute("SELECT seq, prev_hash, hash, body FROM events ORDER BY seq")

    def last_seq(self) -> int:
        with self._reading():
            row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def sessions(self, filters: Filters = EVERY) -> list[dict[str, Any]]:
        """One row per session: who, when, how many calls and refusals."""
        where, params = where_clause(filters)
        sql = SESSIONS.format(where=where)
        rows = []
        with self._reading():
            for row in self._db.execute(sql, params):
                rows.append(session_row(*row))
        return rows

    def unended(self, lease: str) -> list[tuple[str, list[dict[str, Any]], bool]]:
        """The sessions whose `session_start` names `lease` (gateway.audit.leases): each with its
        decisions that have no outcome, and whether it has ended."""
        found = []
        with self._reading():
            sql = "SELECT session_id FROM events WHERE kind = 'session_start' AND json_extract(body, '$.lease') = ?"
            for (session,) in self._db.execute(sql, (lease,)).fetchall():
                decisions: dict[str, dict[str, Any]] = {}
                ended, answered = False, set()
                for kind, call_id, body in self._db.execute(
                    "SELECT kind, call_id, body FROM events WHERE session_id = ? "
                    "AND kind IN ('decision', 'outcome', 'session_end') ORDER BY seq",
                    (session,),
                ):
                    if kind == "decision":
                        decided = json.loads(body)
                        # Another process's call in a session both serve (a principal's stateless
                        # session is one id in every process): not this lease's to settle.
                        if decided.get("lease") in (None, lease):
                            decisions.setdefault(call_id, decided)
                    elif kind == "outcome":
                        answered.add(call_id)
                    else:
                        ended = True
                found.append((session, [body for call, body in decisions.items() if call not in answered], ended))
        return found

    def verify(self, anchors: Sequence[tuple[int, str]] = ()) -> Verification:
        """Walk the whole chain; the first sequence number where it breaks, if any."""
        with self._reading():
            return walk(self._db, anchors)


def session_row(
    session: str, first: str, last: str, start: str | None, ended: str | None, calls: int | None, refusals: int | None
) -> dict[str, Any]:
    """A session as `sessions` lists it, from its first and last event times, the body of its start, the
    time of its end, and its counts of calls and refusals."""
    info = json.loads(start) if start is not None else {}
    client = " ".join(part for part in (info.get("client_name"), info.get("client_version")) if part)
    return {
        "session_id": session,
        "client": client,
        "client_name": info.get("client_name") or "",
        "transport": info.get("transport"),
        "principal": info.get("principal") or None,
        "attributes": info.get("attributes") or [],
        "start": info.get("ts", first),
        "end": ended,
        "last_event": last,
        "calls": calls or 0,
        "refusals": refusals or 0,
    }


def is_locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def os_user() -> str:
    """The OS user a command acts as (as the audit log and the approval queue name them): the name of the
    process's user id, not `getpass.getuser()`, which believes `$USER` and `$LOGNAME` (anyone can set those)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # no name for this uid (a container's): the uid says who it was
        return f"uid {os.geteuid()}"
