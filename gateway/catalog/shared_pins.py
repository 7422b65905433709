"""Approved pins every replica shares: `upstreams.lock`'s document kept in the store (`[gateway] store`).

With a store, the lock is one row of the table `pins`: the TOML document `Lock` parses, and a revision
that goes up by one on every write. A write names the revision it started from and is refused if
another replica wrote in between; the change (pin these definitions of this upstream) is then applied
again to what is there now, so approvals made at once on different replicas all land. A store with no
lock yet takes the config directory's `upstreams.lock`, once, as its first revision; from then on the
file is not read.

Serving replicas read the revision as often as a lock file is watched and put a changed lock in force
the way a changed file is. A store that cannot be read never counts as "no pins": the pins in force
stay, and a gateway that starts while the store is unreachable holds every definition until it can
read them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from gateway.catalog.pins import Lock, load_lock
from gateway.config.files import write_atomically
from gateway.config.models import Config
from gateway.errors import ConfigError, LockError, StoreError
from gateway.store.postgres import Database, database, first_line, require_driver

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
"""How often a serving replica looks at the store's revision (as often as a lock file is watched)."""
WRITE_ATTEMPTS = 20
"""Writes that lose to another replica's are applied again this many times before giving up."""

Change = Callable[[Lock | None], Lock]
"""A write: the new lock, made from the one there now (`None`: none yet)."""


class SharedPins:
    """The lock in one store; `seed` the lock file a store without one starts from."""

    def __init__(self, store: Database, seed: Path) -> None:
        self.store = store
        self.seed = seed
        self.label = f"{store.shown} (pins)"
        """How messages name the store's lock document."""

    def read(self) -> tuple[int, Lock | None]:
        """The store's revision and lock ((0, None): none, nor a file to seed one from); blocks.
        `StoreError` when the store cannot be read, `LockError` when its lock is damaged."""
        with self.store.session() as db:
            self.store.check_schema(db)
            row = self._row(db)
        return (0, None) if row is None else (row[0], Lock.loads(row[1], self.label))

    def lock(self) -> Lock | None:
        return self.read()[1]

    def update(self, change: Change) -> int:
        """Write `change` applied to the store's lock, applying it again to what is there now when another
        replica wrote first (never overwriting theirs); the new revision. Blocks."""
        with self.store.session() as db:
            self.store.check_schema(db)
            for _ in range(WRITE_ATTEMPTS):
                row = self._row(db)
                revision = 0 if row is None else row[0]
                document = change(None if row is None else Lock.loads(row[1], self.label)).render()
                written = db.execute(_FIRST, (document,)) if row is None else db.execute(_NEXT, (document, revision))
                if written.rowcount == 1:
                    return revision + 1
        raise StoreError(f"{self.label}: other replicas kept changing the pins; nothing was written, try again")

    def replace(self, lock: Lock) -> int:
        """Write `lock` in place of whatever the store holds (`mcp-armor lock`); the new revision. Blocks."""
        with self.store.session() as db:
            self.store.check_schema(db)
            row = db.execute(_REPLACE, (lock.render(),)).fetchone()
        assert row is not None  # an upsert returns its row
        return int(row[0])

    def _row(self, db: psycopg.Connection[Any]) -> tuple[int, str] | None:
        """The store's (revision, document), seeding it from the lock file if it has none."""
        row = db.execute("SELECT revision, document FROM pins WHERE id = 1").fetchone()
        if row is None:
            seed = Lock.read(self.seed)
            if seed is None:
                return None
            if db.execute(_FIRST, (seed.render(),)).rowcount == 1:
                logger.warning(
                    "%s: the store had no pins; it holds those of %s from now on (the file is no longer read)",
                    self.label,
                    self.seed,
                )
            row = db.execute("SELECT revision, document FROM pins WHERE id = 1").fetchone()
            assert row is not None  # inserted just now, or by another replica first; never removed
        return int(row[0]), str(row[1])

    async def watch(
        self,
        current: Callable[[], Lock | None],
        install: Callable[[Lock | None], Awaitable[None]],
        failed: Callable[[str], None],
    ) -> None:
        """Until cancelled: put the store's lock in force (`install`) whenever it is not `current()`,
        looking every `POLL_SECONDS`. When it cannot be read, or is damaged, the pins in force stay:
        `failed` hears why, once, until it reads again."""
        require_driver()
        import psycopg

        connection: psycopg.AsyncConnection[Any] | None = None
        seen: int | None = None
        """The revision last read (0: none), `None` before the first read."""
        trouble = ""
        damaged = False
        """Whether `trouble` is the lock at revision `seen` (it stays until another revision reads well)."""
        try:
            while True:
                revision = seen
                try:
                    if connection is None:
                        connection = await self.store.connect_async()
                    row = await (await connection.execute("SELECT revision FROM pins WHERE id = 1")).fetchone()
                    revision = 0 if row is None else int(row[0])
                    if revision != seen:
                        await self._take(seen, current, install)
                        seen, damaged = revision, False
                    if trouble and not damaged:
                        logger.info("%s: readable again", self.label)
                        trouble = ""
                except (StoreError, LockError, psycopg.Error) as exc:
                    text = f"{self.label}: {first_line(exc)}" if isinstance(exc, psycopg.Error) else str(exc)
                    if text != trouble:
                        trouble = text
                        logger.error("%s; the pins in force stay", text)
                        failed(f"{text}; the pins in force stay")
                    if isinstance(exc, LockError):
                        seen, damaged = revision, True  # damaged (or gone) at this revision: wait for the next one
                    elif connection is not None:
                        await connection.close()
                        connection = None
                await anyio.sleep(POLL_SECONDS)
        finally:
            if connection is not None:
                with anyio.CancelScope(shield=True):
                    await connection.close()

    async def _take(
        self, seen: int | None, current: Callable[[], Lock | None], install: Callable[[Lock | None], Awaitable[None]]
    ) -> None:
        """Read the store's lock (seeding it, when it has none) and put it in force if it is not already."""
        revision, lock = await anyio.to_thread.run_sync(self.read)
        if revision == 0 and seen:
            # A lock that was there and is gone was removed by hand: nothing to trust in its place.
            raise LockError(f"{self.label}: the lock is gone from the store")
        if lock != current():
            await install(lock)


_FIRST = "INSERT INTO pins (id, revision, document) VALUES (1, 1, %s) ON CONFLICT (id) DO NOTHING"
_REPLACE = (
    "INSERT INTO pins (id, revision, document) VALUES (1, 1, %s) ON CONFLICT (id) "
    "DO UPDATE SET revision = pins.revision + 1, document = excluded.document, written = now() RETURNING revision"
)
_NEXT = "UPDATE pins SET revision = revision + 1, document = %s, written = now() WHERE id = 1 AND revision = %s"


def shared_pins(config: Config) -> SharedPins | None:
    """The store's lock, when `config` names a store (`None`: the lock is the file `upstreams.lock`)."""
    store = database(config)
    return SharedPins(store, config.lock_path) if store is not None else None


def read_pins(config: Config) -> Lock | None:
    """The lock as it is now: the store's, when one is set, else `upstreams.lock` (blocks)."""
    shared = shared_pins(config)
    return Lock.read(config.lock_path) if shared is None else shared.lock()


def load_pins(config: Config) -> Lock | None:
    """`load_lock`, from the store when one is set (blocks; `StoreError` when it cannot be read)."""
    shared = shared_pins(config)
    return load_lock(config) if shared is None else load_lock(config, shared.lock)


def serving_pins(config: Config) -> Lock | None:
    """The pins a starting gateway enforces (blocks). With a store (its schema brought up to date) that
    cannot be read, every definition is held (a lock pinning nothing) until the store's pins can be read."""
    store = database(config)
    if store is None:
        return load_lock(config)
    try:
        store.migrate()
        return load_pins(config)
    except StoreError as exc:
        logger.error("%s; every definition is held until the store's pins can be read", exc)
        return Lock()


def write_pins(config: Config, change: Change) -> str:
    """Write `change` applied to the lock there is now; where it went, for messages (blocks)."""
    shared = shared_pins(config)
    if shared is None:
        write_atomically(config.lock_path, change(Lock.read(config.lock_path)).render())
        return str(config.lock_path)
    return f"{shared.label}: revision {shared.update(change)}"


def pins_needed(config: Config) -> None:
    """Approving needs a lock to approve into (`ConfigError` saying how to make one; blocks)."""
    shared = shared_pins(config)
    if shared is None and config.lock_path.exists():
        return
    if shared is not None and shared.read()[0] > 0:
        return
    where = config.lock_path.name if shared is None else f"lock in {shared.store.shown} (nor {config.lock_path})"
    raise ConfigError(
        f"there is no {where} yet: run `mcp-armor lock` first (it pins everything on offer but "
        "poisoned definitions), then approve those one by one"
    )
