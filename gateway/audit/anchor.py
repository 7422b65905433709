"""Anchors: the chain's head noted outside the log, so that a log cut short and re-headed is caught.

The chain alone cannot tell a log whose last events were removed (and its head row rewritten) from
one that never had them. So the gateway appends the head it committed (`seq`, `hash`) to an anchor
file outside the log's state directory (by default `$XDG_STATE_HOME/mcp-armor/anchors/`, one file
per log, named after the log's absolute path), and may hand each line to a command that ships it off
the host; `audit verify` checks every anchor of its log. It anchors every `audit_anchor_interval`
while the head moves, soon after a session ends, and when it stops; in a worker thread, never on a
call's path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from gateway.audit.store import now_iso
from gateway.config.models import IN_MEMORY, Config
from gateway.store.postgres import shown

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0
"""How long an anchor command may take before it is given up on (and killed)."""


def log_identity(log: Path | str) -> str:
    """How anchor lines name a log: a file by its absolute path, the shared store by its URL (no password)."""
    return log if isinstance(log, str) else str(log.resolve())


def default_anchor_file(log: Path | str) -> Path | None:
    """The anchor file of the log at `log` when none is configured: under the user's XDG state directory,
    keyed by the log's absolute path (so it is outside the log's own directory, and needs no root);
    `None` for a user without a home directory."""
    base = os.environ.get("XDG_STATE_HOME", "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    except (RuntimeError, KeyError):
        logger.warning("no home directory to anchor the audit log in: set [gateway] audit_anchor")
        return None
    key = hashlib.sha256(log_identity(log).encode()).hexdigest()[:32]
    return root / "mcp-armor" / "anchors" / f"{key}.jsonl"


@dataclass(frozen=True, slots=True)
class Anchoring:
    """Where the gateway anchors a log's head, and how often."""

    log: Path | str
    """The log: its file, or the shared store's URL without its password."""
    file: Path | None
    command: tuple[str, ...] = ()
    interval: float = 60.0

    @classmethod
    def of(cls, config: Config) -> Anchoring:
        log: Path | str = shown(config.gateway.store) if config.gateway.store else config.audit_path
        setting = config.gateway.audit_anchor
        if str(log) == IN_MEMORY or setting == "off":
            file = None
        elif setting is None:
            file = default_anchor_file(log)
        else:
            file = config.directory / Path(setting).expanduser()
        return cls(log, file, tuple(config.gateway.audit_anchor_command), config.gateway.audit_anchor_interval)

    @property
    def enabled(self) -> bool:
        return self.file is not None or bool(self.command)

    def write(self, seq: int, digest: str) -> None:
        """Append the head `seq`:`digest` to the anchor file and hand it to the command (blocks: run it in a
        thread). Failing is said, never raised: the log itself is intact either way."""
        line = json.dumps({"log": log_identity(self.log), "seq": seq, "hash": digest, "ts": now_iso()}) + "\n"
        if self.file is not None:
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
            except OSError as exc:
                logger.warning("%s: cannot anchor the audit log's head: %s", self.file, exc)
        if self.command:
            try:
                subprocess.run(
                    self.command, input=line.encode(), timeout=COMMAND_TIMEOUT, check=True, capture_output=True
                )
            except (OSError, subprocess.SubprocessError) as exc:
                logger.warning("audit_anchor_command %s failed: %s", self.command[0], exc)


class HeadAnchor:
    """A recorder's anchoring: the head it committed, anchored every `interval` while it moves, soon after
    `soon()` once the next commit lands (`committed`), and when it stops (`write`)."""

    def __init__(self, anchoring: Anchoring, head: Callable[[], tuple[int, str] | None]) -> None:
        self.anchoring = anchoring
        self._head = head
        self._anchored: tuple[int, str] | None = None
        self._wake = asyncio.Event()
        self._due = False
        self._stopped = False

    def soon(self) -> None:
        """Anchor once what is queued now is committed (a session ended, say)."""
        self._due = True

    def committed(self) -> None:
        if self._due:
            self._due = False
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        while not self._stopped:
            with anyio.move_on_after(self.anchoring.interval):
                await self._wake.wait()
            self._wake = asyncio.Event()
            if not self._stopped:
                await anyio.to_thread.run_sync(self.write)

    def write(self) -> None:
        """Anchor the head now, if it moved since the last anchor (blocks: in a thread, or at the end)."""
        head = self._head()
        if head is not None and head != self._anchored:
            self._anchored = head
            self.anchoring.write(*head)


def read_anchors(file: Path, log: Path | str) -> tuple[list[tuple[int, str]], int]:
    """The anchors of the log at `log` in `file` (none when it does not exist), and how many lines were
    unreadable (a write torn by a crash, or not an anchor)."""
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    anchors: list[tuple[int, str]] = []
    unreadable = 0
    where = log_identity(log)
    for line in text.splitlines():
        try:
            record = json.loads(line)
            seq, digest, named = record["seq"], record["hash"], record["log"]
        except (ValueError, TypeError, KeyError):
            unreadable += 1
            continue
        if not (isinstance(seq, int) and isinstance(digest, str) and len(digest) == 64):
            unreadable += 1
        elif named == where:
            anchors.append((seq, digest))
    return anchors, unreadable


def last_anchor(anchors: Sequence[tuple[int, str]]) -> int:
    return max((seq for seq, _ in anchors), default=0)
