"""The audit recorder: events made durable and group-committed to the audit log, in order.

With `audit_sync = "normal"` and a log on disk, a call that is alone (one at a time) makes its
events durable by writing them to this process's journal (gateway/audit/journal.py: one `write`, no
commit) and goes on at once; journaled events are moved into the hash chain a few milliseconds
later, many per commit. Otherwise (calls in flight together, `"full"`, a log in memory, or a log
that is failing) callers wait until their events are committed: a commit takes everything pending
so far (group commit), on the event loop right after the callers already running have queued theirs
(`"normal"`), or in the writer task, which takes over whenever that cannot work: with `"full"` (an
fsync per commit) or while another process holds the write lock, it commits in a worker thread.

What the events say is built in gateway/audit/events.py; the call path's audit stages are
gateway/audit/stages.py.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc

from gateway.audit.anchor import Anchoring, HeadAnchor
from gateway.audit.chain import canonical
from gateway.audit.journal import ROTATE_BYTES, Journal, journal_directory, settle_gone
from gateway.audit.keys import Keys, log_keys
from gateway.audit.leases import Lease, lease_directory
from gateway.audit.store import AuditStore, Mark, is_locked
from gateway.config.models import IN_MEMORY
from gateway.errors import AuditError
from gateway.policy.redact import Redactor

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 2000
"""Events between WAL checkpoints (run in a worker thread, never on the event loop)."""
DRAIN_DELAY = 0.02
"""How long journaled events wait to be moved into the chain, so that one commit takes many."""
DRAIN_BATCH = 256
"""Journaled events that are moved at once, without waiting for the delay."""


class AuditWriter(Protocol):
    """What the call path records through: this module's `Recorder` (SQLite), or the shared store's
    (gateway/audit/shared.py)."""

    redactor: Redactor

    @property
    def lease_name(self) -> str | None: ...

    def queue(self, *bodies: Mapping[str, Any]) -> None: ...

    async def record(self, *bodies: Mapping[str, Any], alone: bool = False) -> None: ...

    def anchor_soon(self) -> None: ...


class Ticket:
    """One caller's wait for its events to be committed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.error: str | None = None


class Recorder:
    """The single writer of one audit log (and of this process's journal in front of it)."""

    def __init__(self, path: Path, *, sync: str = "normal", anchoring: Anchoring | None = None) -> None:
        self.path = path
        self.sync = sync
        self.anchoring = anchoring
        """Where the chain's head is anchored (gateway.audit.anchor); `None`: nowhere."""
        self._anchor = (
            HeadAnchor(anchoring, lambda: self.store.head if self.store is not None else None)
            if anchoring is not None and anchoring.enabled
            else None
        )
        self.keys = Keys.fresh()
        """The log's masking and journal keys (gateway.audit.keys), once it is open."""
        self.redactor = Redactor(self.keys.mask)
        self.failure: str | None = None
        """Why the log cannot be written right now (`None` while it can)."""
        self.store: AuditStore | None = None
        """The log, while open (the single writer's own connection)."""
        self.lease: Lease | None = None
        """This process's lease on the sessions it records (gateway.audit.leases), while it holds one."""
        self.journal: Journal | None = None
        """Where events become durable at once (`audit_sync = "normal"`, a log on disk, and it could be made)."""
        self._queue: list[str] = []
        """Events to commit that are not in the journal (no journal, or the log is failing), after its own."""
        self._tickets: list[Ticket] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._commit_due = False
        self._drain: asyncio.TimerHandle | None = None
        """The journal's next move into the chain, when one is scheduled."""
        self._writing = False
        """The writer task is committing (maybe in a worker thread): nobody else may touch the store."""
        self._since_checkpoint = 0
        self._checkpointing = False
        """A checkpoint is due or running."""
        self._checkpoint_running = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Recorder]:
        """Open the log and run the writer; on exit, commit everything still pending and close."""
        if self._open() is None:
            logger.error("%s; every tool call will be refused until it can be written", self.failure)
        else:
            self._start_journal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop, tg)
            if self._anchor is not None:
                tg.start_soon(self._anchor.run)
            try:
                yield self
            finally:
                self._closing = True
                self._wake.set()
                if self._anchor is not None:
                    self._anchor.stop()
        settled = not self._pending()
        if self._anchor is not None:
            self._anchor.write()  # the head as the gateway leaves it
        self._close_journal()
        if self.lease is not None:
            # Kept when events are left uncommitted: whoever settles it replays the journal first.
            self.lease.close(remove=settled)
            self.lease = None
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def lease_name(self) -> str | None:
        """The lease the sessions this process records name (`None` without one: a log in memory)."""
        return self.lease.name if self.lease is not None else None

    def _open(self) -> AuditStore | None:
        if self.store is None:
            try:
                store = AuditStore.open_writer(self.path, sync=self.sync)
            except AuditError as exc:
                self.failure = str(exc)
                return None
            try:
                self.keys = Keys.fresh() if str(self.path) == IN_MEMORY else log_keys(self.path)
            except AuditError as exc:
                store.close()
                self.failure = str(exc)
                return None
            self.store = store
            self.redactor = Redactor(self.keys.mask)
            self.failure = None
        return self.store

    def _start_journal(self) -> None:
        """Take this process's lease, complete the log after gone processes (their journals, their calls
        and sessions), then start this process's journal."""
        if str(self.path) == IN_MEMORY or self.store is None:
            return
        try:
            self.lease = Lease.create(lease_directory(self.path))
        except OSError as exc:  # its sessions cannot be ended for it if it dies: said, not fatal
            logger.warning("%s: no audit lease (%s); if this gateway dies, its open calls stay open", self.path, exc)
        try:
            settle_gone(self.store, self.path, self.keys.journal)
        except (OSError, sqlite3.Error) as exc:
            logger.warning("%s: what gateways that stopped early left is not in the log yet: %s", self.path, exc)
        if self.sync != "normal":
            return
        directory = journal_directory(self.path)
        try:
            self.journal = Journal.create(directory, self.keys.journal)
        except OSError as exc:
            logger.warning("%s: no audit journal (%s); each call waits for its events' commit", directory, exc)

    def _close_journal(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        journal, self.journal = self.journal, None
        if journal is None:
            return
        if journal.pending:
            logger.error(
                "%s: %d events could not be moved into the audit log; the next gateway to open it does that",
                journal.path,
                len(journal.pending),
            )
            journal.close(remove=False)
            return
        journal.close(remove=True)
        self._forget(journal)

    def _forget(self, journal: Journal) -> None:
        if self.store is not None:
            try:
                self.store.forget_journal(journal.name)
            except sqlite3.Error as exc:  # a stale row names a file that is gone: harmless
                logger.debug("could not forget journal %s: %s", journal.name, exc)

    def queue(self, *bodies: Mapping[str, Any]) -> None:
        """Queue events without waiting for their commit (order is kept with everything else queued): the
        next commit takes them, the writer task's or a caller's."""
        texts = [canonical(body) for body in bodies]
        if self.journal is not None:
            try:
                self.journal.write(texts)
            except OSError as exc:
                logger.error("%s: cannot write the audit journal (%s); the events wait in memory", self.path, exc)
            else:
                self._drain_later()
                return
        self._queue.extend(_Kept(text) for text in texts)
        self._wake.set()

    async def record(self, *bodies: Mapping[str, Any], alone: bool = False) -> None:
        """Record events before the caller goes on; `AuditError` when they could not be.

        A caller that knows nobody else is about to record (`alone`: one call at a time) writes its
        events to the journal, where they are durable at once; the chain takes them a little later.
        Otherwise (or without a journal) the caller waits for the commit: with `audit_sync = "normal"`
        it runs on the event loop once the callers already running have had their turn, taking
        everything they queued (for a burst of calls one commit costs less than a journal write each;
        an `alone` caller without a journal commits at once); with `"full"` the writer task commits.
        While the log cannot be written, nothing goes to the journal and every caller waits for a
        commit (and is told it failed): a call is never made on the strength of a log that is failing.
        """
        if self._closing:
            raise AuditError(f"{self.path}: the audit log is closed (the gateway is shutting down)")
        texts = [canonical(body) for body in bodies]
        if alone and self.journal is not None and self.failure is None:
            try:
                self.journal.write(texts)
            except OSError as exc:
                raise AuditError(f"{self.path}: cannot write the audit journal: {exc}") from None
            self._drain_later()
            return
        ticket = Ticket()
        self._tickets.append(ticket)
        self._queue.extend(texts)
        if self.sync != "normal" or self._writing or self.store is None:
            self._wake.set()
        elif alone:
            self._commit_here()  # settles the ticket, or hands everything to the writer task
        else:
            self._commit_soon()
        await ticket.done.wait()
        if ticket.error is not None:
            raise AuditError(ticket.error)

    def _drain_later(self) -> None:
        """Move the journal into the chain a little later, with whatever else is journaled meanwhile."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().call_later(DRAIN_DELAY, self._commit_here)
        elif self.journal is not None and len(self.journal.pending) >= DRAIN_BATCH:
            self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit on the event loop once everything ready to run has run (queuing its events too)."""
        if not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._commit_here)

    def _pending(self) -> bool:
        return bool(self._queue or (self.journal is not None and self.journal.pending))

    def _take(self) -> _Batch:
        journaled, mark = self.journal.take() if self.journal is not None else ([], None)
        batch = _Batch(journaled, self._queue, mark, self._tickets)
        self._queue, self._tickets = [], []
        return batch

    def _commit_here(self) -> None:
        """Commit what is pending, on the event loop; anything but success goes to the writer task."""
        self._commit_due = False
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        if self._writing:
            self._wake.set()  # the writer task takes what is pending once its commit is done
            return
        if self.store is None or not self._pending():
            return
        batch = self._take()
        try:
            self.store.append(batch.bodies, journal=batch.mark)
        except Exception as exc:  # the write lock is taken, or worse: the writer task waits, or reports it
            logger.debug("audit commit on the event loop failed, handing over to the writer: %s", exc)
            if self.journal is not None:
                self.journal.put_back(batch.journaled)
            self._queue[:0] = batch.queued
            self._tickets[:0] = batch.tickets
            self._wake.set()
            return
        self.failure = None
        batch.settle(None)
        self._committed(len(batch.bodies))

    async def _write_loop(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            if not self._closing:
                await self._wake.wait()
                self._wake = asyncio.Event()
            if self._checkpointing and not self._checkpoint_running:
                self._checkpoint_running = True
                tg.start_soon(self._checkpoint)
            error = None
            if self._pending():
                batch = self._take()
                self._writing = True
                try:
                    with anyio.CancelScope(shield=True):
                        error = await self._commit(batch.bodies, batch.mark)
                finally:
                    self._writing = False
                if error is None:
                    self._committed(len(batch.bodies))
                else:
                    if self.journal is not None:
                        self.journal.put_back(batch.journaled)  # durable already: they wait for the log to recover
                    self._keep(batch.queued)
                batch.settle(error)
            if self._closing and (error is not None or not self._pending()):
                return

    def _keep(self, queued: list[str]) -> None:
        """Queued events of a failed commit: first in line for the next one."""
        self._queue[:0] = [text for text in queued if isinstance(text, _Kept)]
        hold_within(self._queue, self.path)

    async def _commit(self, bodies: list[str], mark: Mark | None) -> str | None:
        """Append one group; the reason when it could not be committed."""
        store = self._open()
        if store is None:
            return self.failure
        try:
            if self.sync == "normal":
                try:
                    store.append(bodies, journal=mark)  # a WAL append: tens of microseconds, cheaper than a thread hop
                    return None
                except sqlite3.OperationalError as exc:
                    if not is_locked(exc):
                        raise
            await anyio.to_thread.run_sync(lambda: store.append_waiting(bodies, journal=mark))
        except sqlite3.Error as exc:
            self.failure = f"{self.path}: cannot write the audit log: {exc}"
            logger.error("%s", self.failure)
            return self.failure
        except Exception as exc:  # not the database's: still no call may wait for ever, nor go on unrecorded
            self.failure = f"{self.path}: cannot write the audit log: {type(exc).__name__}: {exc}"
            logger.exception("%s", self.failure)
            return self.failure
        self.failure = None
        return None

    def _committed(self, count: int) -> None:
        if self._anchor is not None:
            self._anchor.committed()
        journal = self.journal
        if journal is not None and not journal.pending and journal.size >= ROTATE_BYTES:
            self._rotate(journal)
        self._since_checkpoint += count
        if self._since_checkpoint >= CHECKPOINT_EVERY and not self._checkpointing and str(self.path) != IN_MEMORY:
            self._since_checkpoint = 0
            self._checkpointing = True
            # Started by the writer task: a commit made in an event-loop callback is outside any task,
            # where a task group cannot start one (the checkpoint would never run, and the WAL would grow).
            self._wake.set()

    def anchor_soon(self) -> None:
        """Anchor the head once what is queued now is committed (a session ended, say)."""
        if self._anchor is not None:
            self._anchor.soon()

    def _rotate(self, journal: Journal) -> None:
        """Everything in the journal is in the chain: start a fresh one instead of growing it."""
        try:
            self.journal = Journal.create(journal.path.parent, self.keys.journal)
        except OSError as exc:
            logger.warning("%s: cannot start a new audit journal, this one keeps growing: %s", journal.path, exc)
            return
        journal.close(remove=True)
        self._forget(journal)

    async def _checkpoint(self) -> None:
        try:
            await anyio.to_thread.run_sync(_checkpoint, self.path)
        except sqlite3.Error as exc:
            logger.warning("audit log checkpoint failed (the WAL file keeps growing until one succeeds): %s", exc)
        finally:
            self._checkpointing = self._checkpoint_running = False


class _Kept(str):
    """The text of an event queued without a caller waiting for it: when its commit fails it waits for the
    next one (an event a caller recorded is the caller's to handle: it was told)."""

    __slots__ = ()


MAX_HELD = 200_000
"""Events held in memory while the log cannot be written (this recorder's or the shared store's); past that
the oldest go, with a log line."""


def hold_within(waiting: list[Any], log: object) -> None:
    """Trim events waiting for a log that cannot be written to `MAX_HELD`, the oldest first, saying so."""
    excess = len(waiting) - MAX_HELD
    if excess > 0:
        del waiting[:excess]
        logger.error("%s: %d audit events dropped: the log could not be written for too long", log, excess)


class _Batch:
    """What one commit takes: journaled events first, then the others, and the callers waiting on it."""

    __slots__ = ("bodies", "journaled", "mark", "queued", "tickets")

    def __init__(self, journaled: list[str], queued: list[str], mark: Mark | None, tickets: list[Ticket]) -> None:
        self.journaled = journaled
        self.queued = queued
        self.bodies = journaled + queued
        self.mark = mark
        self.tickets = tickets

    def settle(self, error: str | None) -> None:
        for ticket in self.tickets:
            ticket.error = error
            ticket.done.set()


def _checkpoint(path: Path) -> None:
    connection = sqlite3.connect(path, timeout=10)
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        connection.close()
