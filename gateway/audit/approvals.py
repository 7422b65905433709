"""The approval queue: calls waiting for a person, in one SQLite file every gateway process on a config
shares (`<state>/approvals.db`, mode 0600, WAL).

A call a rule sends to `ask` is entered here (`ApprovalQueue.ask`) with everything a person needs to
judge it, masked as the audit log masks it: the session, client and principal, the tool, every argument
the upstream would receive, the rule and its reason, the policy revision, the binding digest and when
it expires. Whoever decides first wins: `decide` changes a pending row only while it is still pending and
unexpired (one `UPDATE … WHERE status = 'pending'`), so the command line, the console and the agent's
own client (whose elicitation answer is entered the same way) cannot both decide one call. The gateway
holding the call watches its row (`wait`), and spends an approval once (`spend`: approved → used).

Synchronous (stdlib `sqlite3`); the gateway runs its writes in a worker thread. A row is never deleted:
the queue is also the record of who was asked what, and how often (`stats`).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from gateway.audit.store import event, use_wal
from gateway.errors import ApprovalsError

_SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE approvals ("
    " id TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL, status TEXT NOT NULL,"
    " binding TEXT NOT NULL, call TEXT NOT NULL,"
    " decided_at REAL, decided_by TEXT, channel TEXT, note TEXT)",
    "CREATE INDEX approvals_status ON approvals (status, created)",
    "CREATE INDEX approvals_created ON approvals (created)",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
)
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
"""An approval's id: 8 of these (no 0/o, 1/l/i), easy to read aloud and type; about 40 bits."""
ID_LENGTH = 8
POLL = 0.1
"""How often a waiting gateway looks at the file for a decision (a look is one `PRAGMA data_version`)."""


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    """Approved by a person; the call has not gone ahead yet."""
    USED = "used"
    """Approved, and the call went ahead (an approval covers one call)."""
    DENIED = "denied"
    EXPIRED = "expired"
    """Nobody decided within `ask_timeout`, or the gateway holding the call went away."""
    VOID = "void"
    """Approved, but the policy was reloaded (or the call changed) before it went ahead."""
    WITHDRAWN = "withdrawn"
    """The call ended before anyone decided (its client cancelled it, or the gateway shut down)."""


DECIDED = frozenset({Status.APPROVED, Status.USED, Status.DENIED, Status.VOID})


@dataclass(frozen=True, slots=True)
class AskedCall:
    """What a person is shown about one call (arguments masked as the audit log masks them)."""

    call_id: str
    session: str
    client: str
    principal: str
    tool: str
    upstream: str
    upstream_tool: str
    arguments: Mapping[str, Any]
    """The arguments the upstream would receive (after any rewrite)."""
    rules: tuple[str, ...]
    reason: str
    revision: str
    sent_arguments: Mapping[str, Any] | None = None
    """The arguments as the agent sent them, when a rule rewrote them (`None`: forwarded as sent)."""
    paths: tuple[str, ...] = ()
    """The arguments the policy's `[[paths]]` declare paths: shown first."""
    gateway: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")
    """Which gateway process holds the call."""

    def to_record(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AskedCall:
        known: dict[str, Any] = {name: record.get(name) for name in cls.__dataclass_fields__ if name in record}
        for name in ("rules", "paths"):
            known[name] = tuple(known.get(name) or ())
        return cls(**known)


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the queue."""

    id: str
    created: float
    expires: float
    status: Status
    binding: str
    call: AskedCall
    decided_at: float | None = None
    decided_by: str | None = None
    channel: str | None = None
    note: str | None = None
    """The reason a person gave (for a denial, say), or why the approval was voided or withdrawn."""

    def shown_status(self, now: float) -> Status:
        """The status as of `now`: a pending row past its expiry is expired (its gateway may be gone)."""
        if self.status is Status.PENDING and self.expires <= now:
            return Status.EXPIRED
        return self.status

    def settled(self, now: float) -> str | None:
        """Why this row can no longer be decided as of `now` (one line naming who decided it, and how), or
        `None` while it is pending."""
        status = self.shown_status(now)
        if status is Status.PENDING:
            return None
        by_whom = f" by {self.decided_by} ({self.channel})" if self.decided_by else ""
        return f"approval {self.id} is {status.value}{by_whom}: nothing to decide"

    def to_record(self, now: float | None = None) -> dict[str, Any]:
        status = self.shown_status(time.time() if now is None else now)
        return {
            "id": self.id,
            "status": status.value,
            "created": self.created,
            "expires": self.expires,
            "binding": self.binding,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "channel": self.channel,
            "note": self.note,
            **self.call.to_record(),
        }


@dataclass(frozen=True, slots=True)
class RuleStats:
    """How often one rule asked, and what came of it."""

    rule: str
    asked: int
    approved: int
    """Approved as asked (the call then went ahead or was still to)."""
    denied: int
    unanswered: int
    """Expired or withdrawn: nobody decided."""
    per_hour: float


Record = Callable[[Entry], None]
"""Called inside the transaction that decides a row, before it commits: if it raises, nothing changes
(so a decision the audit log cannot record is not taken)."""


class Queue(Protocol):
    """What the gateway, the console and the command line use of an approval queue: the SQLite file
    (`ApprovalQueue`) or the shared store's (`gateway.audit.shared_approvals.SharedApprovalQueue`)."""

    remote: bool
    """Its calls wait on a server: the gateway makes every one of them in a worker thread."""
    where: str
    """The queue as messages name it: its file, or the store (never with a password)."""

    def now(self) -> float: ...
    def ask(self, call: AskedCall, binding: str, ttl: float, *, most: int | None = None) -> Entry: ...
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
    ) -> Entry: ...
    def spend(self, entry_id: str, binding: str) -> bool: ...
    def close_out(self, entry_id: str, status: Status, note: str, *, only: Status = Status.PENDING) -> bool: ...
    def get(self, entry_id: str) -> Entry | None: ...
    def entries(self, *, pending_only: bool = False, since: float | None = None, limit: int = 200) -> list[Entry]: ...
    def stats(self, since: float) -> list[RuleStats]: ...
    def version(self) -> int: ...
    def close(self) -> None: ...


class ApprovalQueue:
    """The queue file: entering, deciding, spending and listing approvals."""

    remote = False

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.where = str(path)
        self._clock = clock
        self._reader: sqlite3.Connection | None = None

    def now(self) -> float:
        return self._clock()

    def ask(self, call: AskedCall, binding: str, ttl: float, *, most: int | None = None) -> Entry:
        """Enter a pending approval for `call`, expiring `ttl` seconds from now; refused (`ApprovalsError`)
        when its session already has `most` waiting."""
        now = self._clock()
        with self._writing() as db:
            if most is not None:
                waiting = db.execute(
                    "SELECT count(*) FROM approvals "
                    "WHERE status = 'pending' AND expires > ? AND json_extract(call, '$.session') = ?",
                    (now, call.session),
                ).fetchone()[0]
                refuse_crowding(call, waiting, most)
            while True:  # ~40 bits of id: a clash is rare, and retried
                entry_id = new_id()
                if db.execute("SELECT 1 FROM approvals WHERE id = ?", (entry_id,)).fetchone() is None:
                    break
            entry = Entry(entry_id, now, now + ttl, Status.PENDING, binding, call)
            db.execute(
                "INSERT INTO approvals (id, created, expires, status, binding, call) VALUES (?, ?, ?, ?, ?, ?)",
                (entry_id, now, now + ttl, Status.PENDING.value, binding, json.dumps(call.to_record())),
            )
        return entry

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
        """Approve or deny a pending, unexpired approval: the decided entry. `binding`, when given, must be
        the one the person was shown. Raises `ApprovalsError` (one line) when it is not there to decide."""
        now = self._clock()
        gone: str | None = None
        with self._writing() as db:
            entry = self._row(db, entry_id)
            if entry is None:
                raise ApprovalsError(f"no approval {entry_id!r} (see `mcp-armor approvals list`)")
            status = entry.shown_status(now)
            if status is Status.PENDING and _gone(entry.call.gateway):
                # Killed before it could close the row: nobody is left to spend an approval. Closed (and
                # committed) before refusing, so the queue stops showing it as waiting.
                gone = f"the gateway holding it ({entry.call.gateway}) is gone"
                _close(db, entry_id, Status.EXPIRED, gone, now, Status.PENDING)
            else:
                refuse_undecidable(entry, now, binding)
                status = Status.APPROVED if approve else Status.DENIED
                decided = replace(
                    entry, status=status, decided_at=now, decided_by=by, channel=channel, note=note or None
                )
                if record is not None:
                    record(decided)
                db.execute(
                    "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, channel = ?, note = ? "
                    "WHERE id = ? AND status = 'pending'",
                    (status.value, now, by, channel, note or None, entry_id),
                )
        if gone is not None:
            raise ApprovalsError(f"approval {entry_id} is expired: {gone}")
        return decided

    def spend(self, entry_id: str, binding: str) -> bool:
        """Use an approval for the call it was given for: `True` once, for an approved row with `binding`."""
        with self._writing() as db:
            cursor = db.execute(
                "UPDATE approvals SET status = 'used' WHERE id = ? AND status = 'approved' AND binding = ?",
                (entry_id, binding),
            )
            return cursor.rowcount == 1

    def close_out(self, entry_id: str, status: Status, note: str, *, only: Status = Status.PENDING) -> bool:
        """Move a row from `only` to `status` (expired, withdrawn, void), saying why: `True` if it moved."""
        with self._writing() as db:
            return _close(db, entry_id, status, note, self._clock(), only)

    def get(self, entry_id: str) -> Entry | None:
        with self._reading() as db:
            return None if db is None else self._row(db, entry_id)

    def entries(self, *, pending_only: bool = False, since: float | None = None, limit: int = 200) -> list[Entry]:
        """The newest entries first (with `pending_only`, only those still to decide: pending, unexpired,
        and held by a gateway process that is still there)."""
        where, params = ["1"], []  # type: list[str], list[Any]
        if pending_only:
            where.append("status = 'pending' AND expires > ?")
            params.append(self._clock())
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        with self._reading() as db:
            if db is None:
                return []
            rows = db.execute(
                f"SELECT * FROM approvals WHERE {' AND '.join(where)} ORDER BY created DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            found = [_entry(row) for row in rows]
        if pending_only:  # a killed gateway left its rows pending: nobody is left to spend them
            found = [entry for entry in found if not _gone(entry.call.gateway)]
        return found

    def stats(self, since: float) -> list[RuleStats]:
        """Per rule, since `since`: how often it asked, and how many were approved, denied, left unanswered."""
        now = self._clock()
        with self._reading() as db:
            if db is None:
                return []
            found = [_entry(row) for row in db.execute("SELECT * FROM approvals WHERE created >= ?", (since,))]
        return tally(found, since, now)

    def version(self) -> int:
        """A number that changes whenever any connection commits to the file (one `PRAGMA data_version`,
        no table read): a waiter looks at its row again only when it changed. -1 before the file exists."""
        try:
            db = self._reader_connection()
            if db is None:
                return -1
            return int(db.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise ApprovalsError(f"{self.path}: the approval queue cannot be read: {exc}") from None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _reader_connection(self) -> sqlite3.Connection | None:
        if self._reader is None:
            if not self.path.exists():
                return None
            _check_file(self.path)
            self._reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
        return self._reader

    @staticmethod
    def _row(db: sqlite3.Connection, entry_id: str) -> Entry | None:
        row = db.execute("SELECT * FROM approvals WHERE id = ?", (entry_id,)).fetchone()
        return None if row is None else _entry(row)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        if not self.path.exists():
            yield None
            return
        _check_file(self.path)
        try:
            with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)) as db:
                if _unmade(db):  # a file a gateway has just created, its tables not yet committed: empty
                    yield None
                    return
                _check_version(db, self.path)
                yield db
        except sqlite3.Error as exc:
            raise ApprovalsError(f"{self.path}: the approval queue cannot be read: {exc}") from None
        except (ValueError, TypeError) as exc:  # a row no mcp-armor wrote (an unknown status, a call not JSON)
            raise ApprovalsError(f"{self.path}: the approval queue holds a row it cannot read ({exc})") from None

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, on a file made (0600, in a 0700 directory) and given its tables if new."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                # Made 0600 if new. An existing file is never opened here: closing a descriptor of it would
                # drop every POSIX lock this process holds on it, a reader's included, and another
                # process would then take itself for the last one and remove the journal under that reader.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                # Checked before anything is changed: a file others could write is refused, never quietly
                # made private (whatever they wrote, or still hold open, would be taken as ours).
                _check_file(self.path)
                if os.lstat(self.path).st_mode & 0o077:  # readable by others: the calls it shows are theirs
                    os.chmod(self.path, 0o600)
            _check_file(self.path)
            with closing(sqlite3.connect(self.path, timeout=5, isolation_level=None)) as db:
                use_wal(db, 5)
                db.execute("BEGIN IMMEDIATE")
                try:
                    if _unmade(db):
                        for statement in _SCHEMA:
                            db.execute(statement)
                    else:
                        _check_version(db, self.path)
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except OSError as exc:
            raise ApprovalsError(f"{self.path}: the approval queue cannot be written: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise ApprovalsError(f"{self.path}: the approval queue cannot be written: {exc}") from None


def decision_event(decided: Entry) -> dict[str, Any]:
    """The audit event of a decision taken here: what was decided, by whom, on which call."""
    call = decided.call
    answer = "approved" if decided.status is Status.APPROVED else "denied"
    said = f": {decided.note}" if decided.note else ""
    return event(
        "approval",
        session_id=call.session or None,
        call_id=call.call_id or None,
        upstream=call.upstream or None,
        tool=call.tool or None,
        rules=list(call.rules),
        principal=call.principal or None,
        reason=f"approval {decided.id} {answer} by {decided.decided_by} ({decided.channel}){said}",
        entry=decided.id,
        approval=answer,
        by=decided.decided_by,
        channel=decided.channel,
        binding=decided.binding,
        note=decided.note,
    )


def tally(entries: Iterable[Entry], since: float, now: float) -> list[RuleStats]:
    """Per rule, of `entries` (those asked since `since`): how often it asked, and what came of it."""
    counts: dict[str, list[int]] = {}
    for entry in entries:
        status = entry.shown_status(now)
        for rule in entry.call.rules or ("(no rule)",):
            tally = counts.setdefault(rule, [0, 0, 0, 0])
            tally[0] += 1
            if status in (Status.APPROVED, Status.USED, Status.VOID):
                tally[1] += 1
            elif status is Status.DENIED:
                tally[2] += 1
            elif status is not Status.PENDING:
                tally[3] += 1
    hours = max((now - since) / 3600, 1 / 60)
    return [
        RuleStats(rule, asked, approved, denied, unanswered, round(asked / hours, 2))
        for rule, (asked, approved, denied, unanswered) in sorted(counts.items(), key=lambda item: -item[1][0])
    ]


def new_id() -> str:
    """A new approval id (a clash with one in the queue is rare, and the caller draws again)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(ID_LENGTH))


def refuse_crowding(call: AskedCall, waiting: int, most: int) -> None:
    """Refuse to enter `call` when its session already has `most` approvals waiting."""
    if waiting >= most:
        raise ApprovalsError(f"session {call.session} already has {waiting} approvals waiting; {call.tool} not entered")


def refuse_undecidable(entry: Entry, now: float, binding: str | None) -> None:
    """Refuse to decide `entry` when it is settled, or (given `binding`) is not the call that was shown."""
    settled = entry.settled(now)
    if settled is not None:
        raise ApprovalsError(settled)
    if binding is not None and binding != entry.binding:
        raise ApprovalsError(f"approval {entry.id} is not the call that was shown (its binding differs)")


def queue_path(state_dir: Path) -> Path:
    return state_dir / "approvals.db"


def _close(db: sqlite3.Connection, entry_id: str, status: Status, note: str, now: float, only: Status) -> bool:
    """Inside a write: move a row from `only` to `status`, saying why (its decision time kept if it had one)."""
    cursor = db.execute(
        "UPDATE approvals SET status = ?, note = ?, decided_at = coalesce(decided_at, ?) WHERE id = ? AND status = ?",
        (status.value, note, now, entry_id, only.value),
    )
    return cursor.rowcount == 1


def _gone(holder: str) -> bool:
    """Whether the gateway process holding a call (`host:pid`) has ended: only known on its own host, when
    no process has its id (a process of another host, or one reusing the id, counts as there)."""
    host, _, pid = holder.rpartition(":")
    if host != os.uname().nodename or not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # there, but another user's
        return False
    return False


def _unmade(db: sqlite3.Connection) -> bool:
    """Whether the file holds nothing yet (no version, no table): a queue still to be made."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    return bool(version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0)


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
        raise ApprovalsError(f"{path}: not an approval queue this mcp-armor can use")


def _check_file(path: Path) -> None:
    """Refuse a queue anyone but its owner could have written (or a link to one somewhere else), and the
    same of its journal (`-wal`, `-shm`) when there: one planted beside the file would be read as ours."""
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            info = os.lstat(each)
        except FileNotFoundError:
            if each != path:
                continue
            raise ApprovalsError(f"{path}: No such file or directory") from None
        except OSError as exc:
            raise ApprovalsError(f"{each}: {exc.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            raise ApprovalsError(f"{each} is a symbolic link; the approval queue must be a file of its own")
        if info.st_mode & 0o022:
            raise ApprovalsError(f"{each} can be written by others; only its owner may decide approvals (chmod 600)")
        if info.st_uid != os.geteuid():
            raise ApprovalsError(f"{each} belongs to another user (uid {info.st_uid})")


def _entry(row: Sequence[Any]) -> Entry:
    entry_id, created, expires, status, binding, call, decided_at, decided_by, channel, note = row
    return Entry(
        entry_id,
        created,
        expires,
        Status(status),
        binding,
        AskedCall.from_record(json.loads(call)),
        decided_at,
        decided_by,
        channel,
        note,
    )
