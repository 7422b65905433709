"""Session records in the shared store: which replica holds each handshake-era HTTP session.

A handshake-era session lives in the replica that opened it (its upstream connections, its SDK state),
so the load balancer must send every request carrying its `mcp-session-id` there. Each replica records
the sessions it opens and closes in the `sessions` table; a replica receiving a request for a session
it does not hold asks the table, and can say which replica does (a misrouting balancer is a deployment
error worth a line in the log).

Records are written by one task with its own async connection, in order, never in a request's way: a
store that is away costs a line in the log (and another when it is back), the records wait for it
(up to `PENDING`), and sessions open as ever. The audit log, not this table, is what must not lose
anything.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from gateway.errors import StoreError
from gateway.store.postgres import Database, first_line, replica_name

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

PENDING = 10_000
"""Records waiting for the store at most; beyond that, new ones are dropped (and said so, once)."""
RETRY = 2.0
"""Seconds between attempts to reach a store that is away."""
LOOKUP_TIMEOUT = 2.0
"""Seconds a request waits to learn where a session lives before it is answered as unknown."""
_OPEN = (
    "INSERT INTO sessions (id, replica, principal, transport) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET replica = excluded.replica, principal = excluded.principal, "
    "transport = excluded.transport, opened = now(), closed = NULL"
)
_CLOSE = "UPDATE sessions SET closed = now() WHERE id = %s AND replica = %s AND closed IS NULL"
_CLOSE_ALL = "UPDATE sessions SET closed = now() WHERE replica = %s AND closed IS NULL"


class SessionRecords:
    """This replica's session records in the store `db`, and where another replica's sessions live."""

    def __init__(self, db: Database, replica: str | None = None) -> None:
        self.db = db
        self.replica = replica if replica is not None else replica_name()
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, tuple[Any, ...]]](PENDING)
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._reading = anyio.Lock()
        self._away = False
        self._dropping = False

    def opened(self, session_id: str, principal: str | None, transport: str = "http") -> None:
        self._queue(_OPEN, (session_id, self.replica, principal, transport))

    def closed(self, session_id: str) -> None:
        self._queue(_CLOSE, (session_id, self.replica))

    def _queue(self, statement: str, args: tuple[Any, ...]) -> None:
        try:
            self._send.send_nowait((statement, args))
        except anyio.WouldBlock:
            if not self._dropping:
                self._dropping = True
                logger.warning("session records: %d wait for %s already; new ones are dropped", PENDING, self.db.shown)
            return
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return  # the writer has stopped: the gateway is stopping, and its last step closes every row
        self._dropping = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Write the records as they come, in order, until cancelled; then close this replica's open rows."""
        connection: psycopg.AsyncConnection[Any] | None = None
        task_status.started()
        try:
            connection = await self._write(
                connection, _CLOSE_ALL, (self.replica,)
            )  # rows of an earlier same-named process
            async with self._receive:
                async for statement, args in self._receive:
                    connection = await self._write(connection, statement, args)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(LOOKUP_TIMEOUT):
                connection = await self._write(connection, _CLOSE_ALL, (self.replica,), retry=False)
            for held in (connection, self._reader):
                if held is not None:
                    with anyio.CancelScope(shield=True):
                        await held.close()

    async def _write(
        self,
        connection: psycopg.AsyncConnection[Any] | None,
        statement: str,
        args: tuple[Any, ...],
        *,
        retry: bool = True,
    ) -> psycopg.AsyncConnection[Any] | None:
        """Run one statement, reconnecting (every `RETRY` seconds) until it is done; the connection to use next."""
        import psycopg

        while True:
            try:
                if connection is None:
                    connection = await self.db.connect_async()
                await connection.execute(statement, args)
            except (StoreError, psycopg.Error) as exc:
                self._gone(exc)
                if connection is not None:
                    await connection.close()
                    connection = None
                if not retry:
                    return None
                await anyio.sleep(RETRY)
                continue
            self._back()
            return connection

    async def holder(self, session_id: str, principal: str | None) -> str | None:
        """The other replica holding `session_id` open for `principal`, as the store says; `None` when no
        other replica does (or the store cannot tell within `LOOKUP_TIMEOUT`)."""
        import psycopg

        row = None
        try:
            with anyio.fail_after(LOOKUP_TIMEOUT):  # waiting for the lookups ahead of this one included
                async with self._reading:
                    try:
                        if self._reader is None:
                            self._reader = await self.db.connect_async()
                        found = await self._reader.execute(
                            "SELECT replica, principal FROM sessions WHERE id = %s AND closed IS NULL", (session_id,)
                        )
                        row = await found.fetchone()
                    except (StoreError, psycopg.Error, anyio.get_cancelled_exc_class()):
                        # A connection that failed, or was cut off mid-query, is not used again.
                        reader, self._reader = self._reader, None
                        if reader is not None:
                            with anyio.CancelScope(shield=True):
                                await reader.close()
                        raise
        except (StoreError, psycopg.Error, TimeoutError) as exc:
            self._gone(exc)
            return None
        self._back()
        # Another principal's session is not this one's to hear about: answered as unknown.
        if row is None or row[0] == self.replica or row[1] != principal:
            return None
        return str(row[0])

    def _gone(self, exc: BaseException) -> None:
        if not self._away:
            self._away = True
            if isinstance(exc, StoreError):
                why = str(exc)  # names the store already
            else:
                why = f"{self.db.shown}: " + ("no answer in time" if isinstance(exc, TimeoutError) else first_line(exc))
            logger.warning("session records: %s; sessions are served as ever, their records wait", why)

    def _back(self) -> None:
        if self._away:
            self._away = False
            logger.info("session records: %s is reachable again", self.db.shown)
