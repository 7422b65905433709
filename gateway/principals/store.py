"""Named principals and the tokens the gateway issued them (`mcp-armor principal add | list | revoke`).

The store is one SQLite file (`<state>/principals.db`, mode 0600 in a 0700 directory when the gateway
makes them). It holds each principal's name, roles and creation time, and for each token its short id,
its principal, the SHA-256 of its text, when it was made, when it expires and when it was revoked: never
the token's text, which is printed once when it is made. A token reads `mcpa_<id>_<secret>`: the prefix
says it is one of these (so other credentials go to their own authenticators), the id finds its row.

`LocalTokens` authenticates a request's token against the file as it is at that moment: a revocation or
an expiry takes effect in a running gateway on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.audit.store import iso_utc
from gateway.config.models import PRINCIPAL_NAME
from gateway.errors import PrincipalsError
from gateway.principals import SHARED_TOKEN_PRINCIPAL, Principal, Unauthenticated

logger = logging.getLogger(__name__)

TOKEN_ID = re.compile(r"^[0-9a-f]{8}$")
TOKEN_PREFIX = "mcpa_"
_TOKEN = re.compile(r"^mcpa_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE principals (name TEXT PRIMARY KEY, roles TEXT NOT NULL, created TEXT NOT NULL)",
    "CREATE TABLE tokens (id TEXT PRIMARY KEY, principal TEXT NOT NULL REFERENCES principals (name), "
    "hash TEXT NOT NULL, created TEXT NOT NULL, expires TEXT, revoked TEXT)",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
)

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


def token_digest(token: str) -> str:
    """The SHA-256 of a token's text, as stored. A fast hash is right here: a token holds 256 random bits,
    so no guess of one can be checked against the hash faster than the bits can be searched (a slow,
    salted hash protects what people choose, passwords; it would only slow every request down)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Issued:
    """A token just made: its text is shown once and kept nowhere."""

    principal: str
    token_id: str
    token: str
    expires: str | None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    created: str
    expires: str | None
    revoked: str | None

    def state(self, now: str) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class PrincipalRecord:
    name: str
    roles: tuple[str, ...]
    created: str
    tokens: tuple[TokenRecord, ...]


class PrincipalStore:
    """The principals file, for the commands that change and list it."""

    def __init__(self, path: Path, clock: Clock = _now) -> None:
        self.path = path
        self._clock = clock

    def now(self) -> str:
        return iso_utc(self._clock())

    def add(
        self, name: str, roles: Sequence[str] = (), expires: datetime | None = None, *, record: Callable[[Issued], None]
    ) -> Issued:
        """A new token for `name` (made a principal on first use; `roles` are added to those it has).
        `record` is called before the change is committed: if it raises, nothing changes."""
        _check_name(name, "principal name")
        for role in roles:
            _check_name(role, "role")
        if TOKEN_ID.match(name):
            raise PrincipalsError(f"principal name {name!r} would read as a token id; choose another")
        if name == SHARED_TOKEN_PRINCIPAL:
            raise PrincipalsError(f"principal name {name!r} is the one `[gateway.http] token` stands for")
        now = self._clock()
        if expires is not None and expires <= now:
            raise PrincipalsError(f"--expires: {iso_utc(expires)} is not in the future")
        with self._writing() as db:
            row = db.execute("SELECT roles FROM principals WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO principals (name, roles, created) VALUES (?, ?, ?)",
                    (name, json.dumps(sorted(set(roles))), iso_utc(now)),
                )
            elif roles:
                merged = sorted({*json.loads(row[0]), *roles})
                db.execute("UPDATE principals SET roles = ? WHERE name = ?", (json.dumps(merged), name))
            while True:  # 32 bits of id: a clash is rare, and retried
                token_id = secrets.token_hex(4)
                if db.execute("SELECT 1 FROM tokens WHERE id = ?", (token_id,)).fetchone() is None:
                    break
            token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
            until = iso_utc(expires) if expires is not None else None
            db.execute(
                "INSERT INTO tokens (id, principal, hash, created, expires) VALUES (?, ?, ?, ?, ?)",
                (token_id, name, token_digest(token), iso_utc(now), until),
            )
            issued = Issued(name, token_id, token, until)
            record(issued)
        return issued

    def revoke(self, selector: str, *, record: Callable[[str, list[str]], None]) -> tuple[str, list[str]]:
        """Revoke a token (by its id) or every token of a principal (by its name): the principal and the ids
        revoked now (none when all were already). `record` is called before the change is committed."""
        if not self.path.exists():
            raise PrincipalsError(f"no principal or token {selector!r} (there are no principals yet)")
        with self._writing() as db:
            row = db.execute("SELECT principal FROM tokens WHERE id = ?", (selector,)).fetchone()
            if row is not None:
                principal, where, key = row[0], "id = ?", selector
            elif db.execute("SELECT 1 FROM principals WHERE name = ?", (selector,)).fetchone() is not None:
                principal, where, key = selector, "principal = ?", selector
            else:
                raise PrincipalsError(f"no principal or token {selector!r} (see `mcp-armor principal list`)")
            ids = [
                token_id
                for (token_id,) in db.execute(f"SELECT id FROM tokens WHERE {where} AND revoked IS NULL", (key,))
            ]
            db.execute(f"UPDATE tokens SET revoked = ? WHERE {where} AND revoked IS NULL", (self.now(), key))
            record(principal, ids)
        return principal, ids

    def principals(self) -> list[PrincipalRecord]:
        """Every principal with its tokens (never their hashes), by name; none when the file does not exist."""
        with self._reading() as db:
            if db is None:
                return []
            tokens: dict[str, list[TokenRecord]] = {}
            for principal, *fields in db.execute(
                "SELECT principal, id, created, expires, revoked FROM tokens ORDER BY created, id"
            ):
                tokens.setdefault(principal, []).append(TokenRecord(*fields))
            return [
                PrincipalRecord(name, tuple(json.loads(roles)), created, tuple(tokens.get(name, ())))
                for name, roles, created in db.execute("SELECT name, roles, created FROM principals ORDER BY name")
            ]

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, on a file made (0600, in a 0700 directory) and given its tables if new."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            with closing(sqlite3.connect(self.path, timeout=5, isolation_level=None)) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                        for statement in _SCHEMA:
                            db.execute(statement)
                    elif version != _SCHEMA_VERSION:
                        raise PrincipalsError(f"{self.path}: not a principals store this mcp-armor can use")
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise PrincipalsError(f"{self.path}: cannot write the principals store: {exc}") from None
        except OSError as exc:
            raise PrincipalsError(f"{self.path}: cannot write the principals store: {exc.strerror or exc}") from None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        try:
            db = _open_reader(self.path)
        except FileNotFoundError:
            yield None
            return
        try:
            with closing(db):
                yield db
        except sqlite3.Error as exc:
            raise PrincipalsError(f"{self.path}: cannot read the principals store: {exc}") from None


def _check_name(name: str, what: str) -> None:
    if not PRINCIPAL_NAME.match(name):
        raise PrincipalsError(f"{what} {name!r} must match {PRINCIPAL_NAME.pattern}")


def _open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to the store, checked to be one; `FileNotFoundError` when there is none,
    `PrincipalsError` for a file that cannot be used.

    Whoever can write the store can name themselves any principal: a symbolic link (followed, it would
    put the store wherever the link's writer chose; `principal add` refuses one too), a file others can
    write, or one owned by another user (but root) is refused, as one that cannot be read is."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise PrincipalsError(f"{path}: cannot read the principals store: {exc.strerror or exc}") from None
    if stat.S_ISLNK(found.st_mode):
        raise PrincipalsError(f"{path}: the principals store is a symbolic link; put the file itself there")
    if not stat.S_ISREG(found.st_mode):
        raise PrincipalsError(f"{path}: the principals store is not a regular file")
    if found.st_mode & 0o022:
        raise PrincipalsError(
            f"{path}: the principals store can be written by others (mode {stat.S_IMODE(found.st_mode):o}); "
            "make it its owner's only (chmod 600)"
        )
    if found.st_uid not in (os.geteuid(), 0):
        raise PrincipalsError(
            f"{path}: the principals store belongs to another user (uid {found.st_uid}), who can write it; "
            "run the gateway as its owner"
        )
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1, check_same_thread=False)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                raise PrincipalsError(f"{path}: not a principals store this mcp-armor can use")
        except BaseException:
            db.close()
            raise
    except sqlite3.Error as exc:
        raise PrincipalsError(f"{path}: cannot read the principals store: {exc}") from None
    return db


class LocalTokens:
    """The authenticator of the tokens `mcp-armor principal add` issued (`mcpa_<id>_<secret>`).

    One read-only connection is kept. The rows read through it are kept until any other connection
    commits a change to the file (SQLite's `PRAGMA data_version`, asked on every request, says so), then
    read afresh: a revocation holds from the next request on, and an expiry is compared with the clock
    on every request. A file replaced or removed is noticed (its inode is compared on every request) and
    reopened; a missing file holds no principals. A store that cannot be read refuses every token of
    this kind.
    """

    def __init__(self, path: Path, clock: Clock = _now) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._version: int | None = None
        self._rows: dict[str, tuple[str, str, str | None, str | None, str]] = {}
        """Token rows read since the file last changed, by id (only tokens it holds: at most its size)."""
        self._connect()

    @classmethod
    def open(cls, path: Path) -> LocalTokens:
        """The authenticator over `path`; `PrincipalsError` (one line naming the file) when it exists but
        cannot be read, so that the gateway does not start without the principals it was given."""
        tokens = cls(path)
        tokens.holds_principals()
        return tokens

    def holds_principals(self) -> bool:
        """Whether the store names any principal (a revoked one too: its tokens are refused, not ignored)."""
        db = self._current()
        if db is None:
            return False
        try:
            return db.execute("SELECT 1 FROM principals LIMIT 1").fetchone() is not None
        except sqlite3.Error as exc:
            raise PrincipalsError(f"{self.path}: cannot read the principals store: {exc}") from None

    async def authenticate(self, token: str) -> Principal | None:
        match = _TOKEN.match(token)
        if match is None:
            return None
        token_id = match[1]
        try:
            db = self._current()
            row = None
            if db is not None:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                if version != self._version:  # another connection committed: what was read may have changed
                    self._version, self._rows = version, {}
                row = self._rows.get(token_id)
            if db is not None and row is None:
                row = db.execute(
                    "SELECT t.principal, t.hash, t.expires, t.revoked, p.roles FROM tokens t "
                    "JOIN principals p ON p.name = t.principal WHERE t.id = ?",
                    (token_id,),
                ).fetchone()
                if row is not None:
                    self._rows[token_id] = row
        except (PrincipalsError, sqlite3.Error) as exc:
            # The reason reaches the client too: the file and the fault are for the gateway's log alone.
            detail = exc if isinstance(exc, PrincipalsError) else f"{self.path}: {exc}"
            logger.error("token %s refused: the principals store cannot be read (%s)", token_id, detail)
            raise Unauthenticated("the gateway cannot check this token now") from None
        if row is None or not hmac.compare_digest(row[1], token_digest(token)):
            raise Unauthenticated(f"token {token_id} is not one the gateway issued")
        principal, _, expires, revoked, roles = row
        if revoked is not None:
            raise Unauthenticated(f"token {token_id} of principal '{principal}' was revoked at {revoked}")
        if expires is not None and expires <= iso_utc(self._clock()):
            raise Unauthenticated(f"token {token_id} of principal '{principal}' expired at {expires}")
        attributes = frozenset(f"role:{role}" for role in json.loads(roles))
        return Principal(principal, attributes, via="token", credential=token_id)

    def _current(self) -> sqlite3.Connection | None:
        """The connection to the file now at `path` (reopened when it was replaced); `None` when there is none."""
        try:
            found = os.lstat(self.path)  # a link put in the file's place is noticed (and refused)
        except FileNotFoundError:
            self._close()
            return None
        except OSError as exc:
            raise PrincipalsError(f"{self.path}: cannot read the principals store: {exc.strerror or exc}") from None
        if self._db is None or self._identity != (found.st_dev, found.st_ino):
            self._connect()
        return self._db

    def _connect(self) -> None:
        self._close()
        try:
            found = os.lstat(self.path)
            self._db = _open_reader(self.path)
        except FileNotFoundError:
            return
        self._identity = (found.st_dev, found.st_ino)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self._identity = None, None
        self._version, self._rows = None, {}
