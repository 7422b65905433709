"""The audit journal: events made durable in one write, ahead of the hash-chained log.

The gateway promises that a call's decision is recorded before the call is forwarded, and its
outcome before the agent sees the result. That needs each event to be durable at that moment, not
yet chained: a SQLite commit (tens of microseconds of page writes and locks) can follow a little
later, off the call's critical path. So with `audit_sync = "normal"` every event is first appended
to this process's journal with one `write` (no fsync: the durability of a WAL commit with
`synchronous=NORMAL`, which survives the process but not the machine), and the recorder moves
journaled events into the chain in groups as soon as the event loop waits on the network.

Each commit records how many bytes of the journal it holds (`journals` table, same transaction),
so a journal is replayed exactly once: a journal left behind by a process that died is moved into
the chain by the next gateway that opens the log, then removed. Journals are files
`<pid>-<random>.jsonl` in the directory `<log stem>.journal` beside the log, one line per event,
each held with an exclusive `flock` while its process lives (a lock that can be taken marks a
journal whose process is gone).

Each line is `MAC BODY`: the canonical event body after an HMAC-SHA256 (hex) under the log's journal
key (gateway.audit.keys) of the previous line's MAC and the body; the first line's chain starts from
an HMAC of the journal's name. So only a journal this gateway wrote, whole and in order, under its
own name, is replayed: any other file, or one with a line added, changed, removed or moved, is
refused with a warning and kept aside as `<name>.refused`, its events not added to the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from gateway.audit.chain import body_problem
from gateway.audit.keys import log_keys
from gateway.audit.leases import SUFFIX as LEASE
from gateway.audit.leases import any_orphan, create_locked, lease_directory, orphans, settle
from gateway.audit.store import AuditStore, Mark
from gateway.errors import AuditError

logger = logging.getLogger(__name__)

SUFFIX = ".jsonl"
REFUSED = ".refused"
"""Added to the name of a journal that is kept aside, not replayed (it is not one this gateway wrote)."""
ROTATE_BYTES = 8 * 1024 * 1024
"""A journal this large, once fully moved into the chain, is replaced by a fresh one."""


def journal_directory(log: Path) -> Path:
    """Where the journals of the log at `log` live (`.mcp-armor/audit.journal` for `.mcp-armor/audit.db`)."""
    directory = log.with_name(f"{log.stem}.journal")
    return directory if directory != log else log.with_name(f"{log.name}.d")


class Journal:
    """This process's journal: appended to, and remembering what is not in the chain yet."""

    def __init__(self, path: Path, fd: int, key: bytes) -> None:
        self.path = path
        self._fd = fd
        self._key = key
        self._mac = _first_mac(key, path.name)
        """The MAC of the last line written whole (the next line's is chained to it)."""
        self.size = 0
        """Bytes written so far (the file's length)."""
        self.pending: list[str] = []
        """Bodies written here and not yet committed to the chain, oldest first."""
        self._torn = False
        """A write failed part-way: the next one starts on a new line, so the torn one stays apart."""

    @classmethod
    def create(cls, directory: Path, key: bytes) -> Journal:
        """A new, empty journal in `directory`, locked as this process's, its lines authenticated with `key`."""
        path = directory / f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        fd = create_locked(path, os.O_WRONLY | os.O_APPEND)
        return cls(path, fd, key)

    @property
    def name(self) -> str:
        return self.path.name

    def write(self, bodies: Sequence[str]) -> None:
        """Append `bodies` (canonical event bodies) in one write; `OSError` when they are not all written."""
        lines, mac = [], self._mac
        for body in bodies:
            mac = _next_mac(self._key, mac, body)
            lines.append(f"{mac} {body}\n")
        text = "".join(lines)
        data = ("\n" + text if self._torn else text).encode("utf-8", "surrogatepass")
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            self.size += written
            self._torn = self._torn or written > 0
            raise
        self.size += written
        self._torn = False
        self._mac = mac
        self.pending.extend(bodies)

    def take(self) -> tuple[list[str], Mark | None]:
        """Everything pending, and the mark that says the journal is in the chain up to here."""
        bodies, self.pending = self.pending, []
        return bodies, ((self.name, self.size) if bodies else None)

    def put_back(self, bodies: list[str]) -> None:
        """Bodies `take` returned that could not be committed: first in line for the next commit."""
        self.pending[:0] = bodies

    def close(self, *, remove: bool) -> None:
        """Release the journal; `remove` deletes it (only when everything in it is in the chain)."""
        if remove:
            self.path.unlink(missing_ok=True)  # before the lock goes, so no other process replays it
        os.close(self._fd)


def open_settled(log: Path) -> AuditStore:
    """Open the log for reading, first moving in what journals of gateways that stopped still hold.

    A gateway killed before its journal reached the chain leaves events only there; a reader (the
    audit commands) completes the log first, so it sees every event recorded. If the log cannot be
    written by this user, it is read as it is, with a warning.
    """
    directory = journal_directory(log)
    # Read first: an emptied log is reported as such, never filled anew from journals by a reader.
    reader = AuditStore.open_reader(log)
    leases = lease_directory(log)
    if not any_orphan(directory, SUFFIX) and not any_orphan(leases, LEASE):
        return reader
    reader.close()
    try:
        store = AuditStore.open_writer(log)
        try:
            settle_gone(store, log, log_keys(log).journal)
        finally:
            store.close()
    except (AuditError, OSError, sqlite3.Error) as exc:
        logger.warning("%s: what gateways that stopped early left is not in the log yet: %s", log, exc)
    return AuditStore.open_reader(log)


def settle_gone(store: AuditStore, log: Path, key: bytes) -> None:
    """Complete the log after gateway processes that are gone: replay their journals, then end their
    calls and sessions (gateway.audit.leases). Blocks: run it before serving."""
    moved = recover(store, journal_directory(log), key)
    if moved:
        logger.warning("%s: %d events journaled by a gateway that stopped early are now in it", log, moved)
    interrupted = settle(store, lease_directory(log))
    if interrupted:
        logger.warning("%s: %d calls of a gateway that stopped early are recorded as interrupted", log, interrupted)


def recover(store: AuditStore, directory: Path, key: bytes) -> int:
    """Move into the chain what journals of gone processes still hold, and remove them; how many events.

    A journal whose lines do not all authenticate under `key` is kept aside, not replayed.
    Blocks (it may wait for another process's write lock): run it before serving.
    """
    moved = 0
    for path, fd in orphans(directory, SUFFIX):
        replay = _authentic_lines(path, _read_all(fd), key)
        if isinstance(replay, str):
            _refuse(path, replay)
        else:
            bodies, end = replay.after(store.drained(path.name))
            if bodies:
                store.append_waiting(bodies, journal=(path.name, end))
                moved += len(bodies)
            path.unlink()
        store.forget_journal(path.name)
    return moved


def _refuse(path: Path, why: str) -> None:
    """Keep a journal this gateway did not write (or not as it is) aside, and say so."""
    aside = path.with_name(path.name + REFUSED)
    path.rename(aside)
    logger.warning(
        "%s: not a journal this gateway wrote (%s): its events are not added to the audit log; kept as %s",
        path,
        why,
        aside,
    )


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _first_mac(key: bytes, name: str) -> str:
    return hmac.new(key, b"mcp-armor journal " + name.encode(), hashlib.sha256).hexdigest()


def _next_mac(key: bytes, previous: str, body: str) -> str:
    return hmac.new(key, previous.encode() + body.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


class _Replay:
    """A journal's authenticated events, each with the byte offset just after its line."""

    def __init__(self, bodies: list[tuple[str, int]]) -> None:
        self._bodies = bodies

    def after(self, start: int) -> tuple[list[str], int]:
        """The events after byte `start` (what the chain holds already), and the offset after the last."""
        bodies = [body for body, end in self._bodies if end > start]
        return bodies, max([start, *(end for _, end in self._bodies)])


def _authentic_lines(path: Path, data: bytes, key: bytes) -> _Replay | str:
    """The events of the journal at `path`, every line authenticated in order; why not, when one is not.

    An incomplete last line (a write torn by a crash or a full disk) is not an event: skipped, with a warning.
    """
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: an incomplete last line (%d bytes) is not an event; skipped", path, len(data) - end)
    bodies: list[tuple[str, int]] = []
    mac, offset = _first_mac(key, path.name), 0
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        offset += len(line) + 1
        try:
            text = line.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return f"line {number} is not text"
        given, _, body = text.partition(" ")
        expected = _next_mac(key, mac, body)
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode()):
            return f"line {number} does not authenticate"
        problem = body_problem(body)
        if problem is not None:
            return f"line {number}: {problem}"
        bodies.append((body, offset))
        mac = expected
    return _Replay(bodies)
