"""Rate-limit counts every replica shares, in the PostgreSQL store (`[gateway] store`).

Each charge is one statement, `charge_rates` (gateway/store/schema.py): the caller's keys are locked in
the database, the hits inside each window counted by the database's clock and the new hits inserted,
all in one transaction, so N calls per period are admitted across any number of replicas, exactly.
The connections are opened when a charge first needs one; one that fails is dropped and the next
charge connects anew, so the counts come back by themselves when the database does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from gateway.calls import Who
from gateway.errors import StoreError
from gateway.policy.rules import Rule
from gateway.store.postgres import Database, first_line

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 4
"""Charges of one replica in flight at once, each on its own connection (more wait for one)."""
PRUNE_EVERY = 60.0
"""Seconds between two sweeps of every expired hit (each charge counts only its own window anyway)."""

_FORGET = "DELETE FROM rate_hits WHERE counted_as = 'session' AND name = ANY (%s)"
_WAITS = "SELECT rate_waits(%s, %s, %s, %s, %s, clock_timestamp())"
_CHARGE = "SELECT rule, hit, wait FROM charge_rates(%s, %s, %s, %s, %s, %s, %s, %s)"


@dataclass(frozen=True, slots=True)
class Counted:
    """What the store made of one charge: the hits it inserted (none when an enforced rule is at its
    limit), and for each rule at its limit the seconds until it lets another call through."""

    hits: tuple[int, ...]
    waits: dict[str, float]


class SharedRates:
    """The rate-limit counts in `store`, for the policy engine of one replica."""

    def __init__(self, store: Database) -> None:
        self.store = store
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._slots = anyio.Semaphore(MAX_CONNECTIONS)
        self._forget: set[str] = set()
        self._pruned = time.monotonic()

    async def charge(self, who: Who, rules: Sequence[Rule], enforced: Sequence[bool]) -> Counted:
        """Count one call of `who` against `rules`: all or none of the enforced ones (`StoreError` when the
        store cannot be reached; nothing is counted then)."""
        forget, self._forget = sorted(self._forget), set()
        prune = time.monotonic() - self._pruned >= PRUNE_EVERY
        try:
            rows = await self._run(_CHARGE, (*_keyed(who, rules), list(enforced), forget, prune))
        except BaseException:
            self._forget.update(forget)  # not applied: with the next charge
            raise
        if prune:
            self._pruned = time.monotonic()
        hits = tuple(row[1] for row in rows if row[1] is not None)
        return Counted(hits, {row[0]: row[2] for row in rows if row[2] > 0})

    async def waits(self, who: Who, rules: Sequence[Rule]) -> Counted:
        """The rules at their limit for `who` now, counting nothing (before a person is asked about a call
        that would then be refused anyway)."""
        rows = await self._run(_WAITS, _keyed(who, rules))
        waits = rows[0][0] if rows else []
        return Counted((), {rule.id: wait for rule, wait in zip(rules, waits, strict=True) if wait > 0})

    async def refund(self, hits: Sequence[int]) -> None:
        """Take back the hits of a charge whose call was refused after all (`StoreError` when it cannot)."""
        await self._run("DELETE FROM rate_hits WHERE id = ANY (%s)", (list(hits),))

    def forget(self, session: str) -> None:
        """Drop a finished session's own counts, with the next charge (they would expire anyway)."""
        self._forget.add(session)

    async def close(self) -> None:
        """Apply what is left to forget (if the store can be reached), and close the connections."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            if self._forget:
                try:
                    await self._run(
                        "DELETE FROM rate_hits WHERE counted_as = 'session' AND name = ANY (%s)",
                        (sorted(self._forget),),
                    )
                except StoreError as exc:
                    logger.warning("finished sessions' rate-limit counts were left to expire: %s", exc)
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()

    async def _run(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """`query`'s rows, on an idle connection or a new one. A reused connection that fails is dropped
        and the query tried once more on a new one (the server may have restarted since it was used; a
        charge whose answer was lost after its commit then counts twice: never more calls than allowed)."""
        import psycopg

        async with self._slots:
            while True:
                fresh = not self._idle
                try:
                    async with self._connection() as connection:
                        cursor = await connection.execute(query, params)
                        return await cursor.fetchall() if cursor.description is not None else []
                except psycopg.OperationalError as exc:
                    if fresh:
                        raise StoreError(f"{self.store.shown}: {first_line(exc)}") from None
                except psycopg.Error as exc:
                    raise StoreError(f"{self.store.shown}: {first_line(exc)}") from None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An idle connection, or a new one; back to the idle ones when no error came out of its use
        (one left in an unknown state, by an error or a cancellation, is closed)."""
        fresh = not self._idle
        connection = self._idle.pop() if not fresh else await self.store.connect_async()
        try:
            if fresh:  # counting relies on each statement of `charge_rates` seeing what committed before it
                await connection.execute("SET default_transaction_isolation TO 'read committed'")
            yield connection
        except BaseException:
            with anyio.CancelScope(shield=True):
                await connection.close()
            raise
        if not connection.closed:
            self._idle.append(connection)


def _keyed(who: Who, rules: Sequence[Rule]) -> tuple[str, str, list[str], list[int], list[float]]:
    """The parameters naming `who`'s counts under `rules`: its key, the rules' ids, limits and periods."""
    kind, name = who.counted_as
    rates = [rule.rate for rule in rules]
    limits = [rate.limit if rate is not None else 1 for rate in rates]
    return kind, name, [rule.id for rule in rules], limits, [rate.period if rate is not None else 0.0 for rate in rates]
