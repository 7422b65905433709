"""The PostgreSQL database a store URL names: connecting to it, and keeping its schema current.

psycopg 3 is imported only here and only when a store is configured (the `postgres` extra), so a
gateway on SQLite never loads it. Every connection is in autocommit mode (each statement its own
transaction unless a caller opens one) with `search_path` set to the gateway's own schema,
`mcp_armor`, so its tables stay apart from anything else in the database.

Messages name the store by its URL without the password (`Database.shown`): a password given as
`${VAR}` in the config is never printed, logged or recorded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gateway.config.models import Config
from gateway.errors import StoreError
from gateway.store.schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION

if TYPE_CHECKING:
    import psycopg

SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT = 5
"""Seconds to wait for the server to accept a connection before the store is reported unreachable."""
_MIGRATION_LOCK = 0x6D63_7061_726D_6F72
"""The advisory lock that serialises schema changes among replicas starting together ("mcparmor")."""
EXTRA = "pip install 'mcp-armor[postgres]'"


def is_store_url(value: str) -> bool:
    return value.partition("://")[0] in SCHEMES and "://" in value


def shown(url: str) -> str:
    """`url` as it may be printed: the password (and any query, which may carry one) left out.

    Read as libpq reads a password with `#`, `?` or `/` in it (everything up to the last `@` is the user
    and password): a URL parser would take part of such a password for the host, path or query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "the store URL"
    credentials, at, place = rest.rpartition("@")
    user = credentials.partition(":")[0] if at else ""
    if re.search(r"[/?#]", user):  # the `@` is in the path or the query: no user name before it
        user, place = "", re.split(r"[?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    place = re.split(r"[?#]", place, maxsplit=1)[0]
    return f"{scheme}://{user}@{place}" if user else f"{scheme}://{place}"


def _unreadable_password(url: str) -> bool:
    """Whether libpq would read part of the URL's password as its host or database (a `@` or `/` in it), or
    refuse the URL in a message quoting the password (a `%` not followed by two hex digits)."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", url):
        return True
    rest = url.partition("://")[2]
    end = re.search(r"[@/]", rest)
    return end is not None and "@" in re.split(r"[?#]", rest[end.end() :], maxsplit=1)[0]


def replica_name() -> str:
    """This process as the store names it: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def database(config: Config) -> Database | None:
    """The shared store `config` names (`[gateway] store`), or `None`: state stays in SQLite files."""
    url = config.gateway.store
    return Database(url) if url is not None else None


class Database:
    """One PostgreSQL database, named by a store URL (`postgresql://user:password@host:port/name`)."""

    def __init__(self, url: str) -> None:
        if not is_store_url(url):
            raise StoreError(f"{shown(url)}: not a PostgreSQL URL (postgresql://user:password@host:port/database)")
        if _unreadable_password(url):
            raise StoreError(
                f"{shown(url)}: the password in the store URL must be percent-encoded "
                "(it holds '@', '/', or a '%' not followed by two hex digits)"
            )
        self.url = url
        self.shown = shown(url)

    def __repr__(self) -> str:
        return f"Database({self.shown!r})"

    def _options(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "mcp-armor",
            "options": f"-c search_path={SCHEMA}",
            # A server that vanished without closing the connection is noticed within seconds.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        }

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection (blocks): `StoreError` naming the store when it cannot be made."""
        require_driver()
        import psycopg

        try:
            return psycopg.connect(self.url, **self._options())
        except psycopg.Error as exc:
            raise StoreError(f"{self.shown}: cannot connect to the store: {first_line(exc)}") from None

    async def connect_async(self) -> psycopg.AsyncConnection[Any]:
        """A new connection for the event loop: `StoreError` naming the store when it cannot be made."""
        require_driver()
        import psycopg

        try:
            return await psycopg.AsyncConnection.connect(self.url, **self._options())
        except psycopg.Error as exc:
            raise StoreError(f"{self.shown}: cannot connect to the store: {first_line(exc)}") from None

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for the length of a `with`, its errors reported as `StoreError` naming the store."""
        require_driver()
        import psycopg

        connection = self.connect()
        try:
            yield connection
        except psycopg.Error as exc:
            raise StoreError(f"{self.shown}: {first_line(exc)}") from None
        finally:
            connection.close()

    def migrate(self) -> tuple[int, int]:
        """Create or bring the schema up to this version (blocks); (the version found, the version now).

        Replicas starting together take turns (an advisory lock); a schema written by a newer mcp-armor
        is refused, never changed."""
        with self.session() as db, db.transaction():
            encoding = db.execute("SHOW server_encoding").fetchone()
            if encoding is None or encoding[0] != "UTF8":
                raise StoreError(
                    f"{self.shown}: the database's encoding is {encoding[0] if encoding else '?'}, not UTF8; "
                    "create it with ENCODING 'UTF8'"
                )
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            # A schema another role made first (one allowed to create schemas in this database) is that
            # role's: as its owner it could drop and replace the chain's tables and functions at will.
            owner = db.execute(
                "SELECT r.rolname, r.rolsuper OR pg_has_role(current_user, r.oid, 'MEMBER') "
                "FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner WHERE n.nspname = %s",
                (SCHEMA,),
            ).fetchone()
            if owner is None or not owner[1]:
                raise StoreError(
                    f"{self.shown}: schema {SCHEMA} belongs to role {owner[0] if owner else '?'}, which could change "
                    f"the audit log's tables; drop it, or have this store's user own it "
                    f"(ALTER SCHEMA {SCHEMA} OWNER TO ...)"
                )
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)"
            )
            row = db.execute("SELECT version FROM schema_version").fetchone()
            found = int(row[0]) if row is not None else 0
            if found > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.shown}: store schema {found} was written by a newer mcp-armor "
                    f"(this one writes schema {SCHEMA_VERSION})"
                )
            for step in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_version VALUES (1, %s) ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (SCHEMA_VERSION,),
            )
        return found, SCHEMA_VERSION

    def check_schema(self, db: psycopg.Connection[Any]) -> None:
        """Refuse a store whose schema is missing or not this version's (for readers, which never migrate)."""
        require_driver()
        import psycopg

        try:
            row = db.execute("SELECT version FROM schema_version").fetchone()
        except psycopg.errors.UndefinedTable:
            raise StoreError(
                f"{self.shown}: the store has no mcp-armor schema yet (run `mcp-armor store migrate`, "
                "or start the gateway once)"
            ) from None
        version = int(row[0]) if row is not None else 0
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.shown}: store schema {version}, this mcp-armor uses schema {SCHEMA_VERSION} "
                "(run `mcp-armor store migrate` with the newer of the two)"
            )


KEY_BYTES = 32


def shared_key(db: psycopg.Connection[Any], name: str) -> bytes:
    """The key every replica shares under `name` (made by whichever replica asks first; blocks)."""
    db.execute("INSERT INTO keys VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (name, secrets.token_bytes(KEY_BYTES)))
    row = db.execute("SELECT value FROM keys WHERE name = %s", (name,)).fetchone()
    assert row is not None  # inserted just now, or by another replica first; keys are never removed
    return bytes(row[0])


async def shared_key_async(db: psycopg.AsyncConnection[Any], name: str) -> bytes:
    """`shared_key` on the event loop."""
    await db.execute(
        "INSERT INTO keys VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (name, secrets.token_bytes(KEY_BYTES))
    )
    row = await (await db.execute("SELECT value FROM keys WHERE name = %s", (name,))).fetchone()
    assert row is not None
    return bytes(row[0])


def require_driver() -> None:
    """`StoreError` saying how to install psycopg, when it is not installed (import it after this)."""
    if importlib.util.find_spec("psycopg") is None:
        raise StoreError(f"a PostgreSQL store needs the psycopg driver: {EXTRA}")


def first_line(exc: BaseException) -> str:
    """The first line of a driver error (the server's message, without its hints and context)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
