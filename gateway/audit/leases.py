"""Leases: which gateway process records which sessions, so that the calls of one that died still end.

Each recording process holds an exclusive `flock` on its lease file, `<pid>-<random>.lease` in the
directory `<log stem>.leases` beside the log, for as long as it lives (the kernel drops the lock
when the process ends, however it ends), and names the lease in each `session_start` it records. A
lease whose lock can be taken belongs to a process that is gone: its sessions that never ended, and
their decisions that never got an outcome, are settled by the next gateway or `audit` command on the
log, with an `interrupted` outcome per call and a `session_end` per session. A live process's lease
is never taken, however slow it is; a lease file that is gone settles nothing.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from gateway.audit.chain import canonical
from gateway.audit.store import AuditStore, event

SUFFIX = ".lease"


class Unended(Protocol):
    def unended(self, lease: str) -> list[tuple[str, list[dict[str, Any]], bool]]: ...


INTERRUPTED = "interrupted"
"""The outcome of a call whose gateway process ended before recording one."""


def lease_directory(log: Path) -> Path:
    """Where the leases of the log at `log` live (`.mcp-armor/audit.leases` for `.mcp-armor/audit.db`)."""
    directory = log.with_name(f"{log.stem}.leases")
    return directory if directory != log else log.with_name(f"{log.name}.leases.d")


class Lease:
    """This process's lease on the sessions it records."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def create(cls, directory: Path) -> Lease:
        path = directory / f"{os.getpid()}-{secrets.token_hex(8)}{SUFFIX}"
        return cls(path, create_locked(path, os.O_WRONLY))

    @property
    def name(self) -> str:
        return self.path.stem

    def close(self, *, remove: bool) -> None:
        """Release the lease; `remove` when everything its sessions recorded is in the chain (else the next
        gateway or audit command settles them, after replaying this process's journal)."""
        if remove:
            self.path.unlink(missing_ok=True)  # before the lock goes, so nobody settles a live process's calls
        os.close(self._fd)


def create_locked(path: Path, flags: int) -> int:
    """A new file at `path` (its directory made as needed), held with this process's exclusive lock; its fd.

    Not inherited by the processes the gateway starts (an upstream outliving it must not keep it held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def orphan(path: Path) -> int | None:
    """The file at `path` opened and locked, if no live process holds it and it is still there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # settled or removed by another process meanwhile; or a symlink, never followed
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), path.stat()):
            return fd
    except (BlockingIOError, FileNotFoundError):  # its process is alive, or it was removed meanwhile
        pass
    os.close(fd)
    return None


def orphans(directory: Path, suffix: str) -> Iterator[tuple[Path, int]]:
    """Each file in `directory` ending in `suffix` that no live process holds, with its fd, opened and
    locked while the caller works on it."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob(f"*{suffix}")):
        fd = orphan(path)
        if fd is None:
            continue
        try:
            yield path, fd
        finally:
            os.close(fd)


def any_orphan(directory: Path, suffix: str) -> bool:
    """Whether `directory` holds a file ending in `suffix` that no live process holds."""
    return any(True for _ in orphans(directory, suffix))


def settle(store: AuditStore, directory: Path) -> int:
    """End the sessions and calls of gone processes' leases (their journals replayed already), and remove
    the leases; how many calls were interrupted. Blocks: run it before serving."""
    interrupted = 0
    for path, _ in orphans(directory, SUFFIX):
        bodies = endings(store, path.stem, f"the gateway process {path.stem.partition('-')[0]}")
        if bodies:
            store.append_waiting([canonical(body) for body in bodies])
            interrupted += sum(body["kind"] == "outcome" for body in bodies)
        path.unlink()
    return interrupted


def endings(store: Unended, lease: str, who: str) -> list[dict[str, Any]]:
    """An `interrupted` outcome for each call the lease's process (`who`, as the reason names it) decided and
    never ended, and a `session_end` for each of its sessions still open."""
    bodies: list[dict[str, Any]] = []
    for session, decisions, ended in store.unended(lease):
        for decision in decisions:
            fields = {name: decision.get(name) for name in ("session_id", "call_id", "upstream", "tool", "principal")}
            if decision.get("method") is not None:
                fields["method"] = decision["method"]
            reason = f"{who} ended without recording an outcome"
            bodies.append(event("outcome", **fields, outcome=INTERRUPTED, rules=[], reason=reason))
        if not ended:
            reason = f"{who} ended without ending the session"
            bodies.append(event("session_end", session_id=session, reason=reason))
    return bodies
