"""The agent's pipes: taken off fds 0 and 1 while serving, and the output side the answers are written to.

While serving, fd 0 reads from the null device and fd 1 writes to stderr, so nothing else in the
process (or a child that inherits them) can read the agent's input or corrupt its output. Input or
output that is not a pipe or socket (a terminal, a file) is relayed through a pipe by a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def agent_pipes() -> Iterator[tuple[int, int]]:
    """The agent's input and output, to serve on (pipes or sockets), while fds 0 and 1 are kept from
    everything else; on leaving, output relayed to a file or terminal is written out in full and the
    streams are put back."""
    saved = (fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3))
    wire_in, wire_out, relays = claim_standard_streams()
    try:
        yield wire_in, wire_out
    finally:
        for relay in relays:
            relay.join(timeout=5.0)
        restore_standard_streams(saved)


def claim_standard_streams() -> tuple[int, int, list[threading.Thread]]:
    """Move the agent's streams off fds 0 and 1 (which then read /dev/null and write to stderr).

    Returns the read and write ends to serve on (pipes or sockets; anything else is relayed
    through a pipe by a daemon thread) and the output relay to wait for at the end.
    """
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    relays: list[threading.Thread] = []
    if not _is_stream(wire_in):
        read_end, write_end = os.pipe()
        _relay(wire_in, write_end, "stdin relay").start()
        wire_in = read_end
    if not _is_stream(wire_out):
        read_end, write_end = os.pipe()
        relay = _relay(read_end, wire_out, "stdout relay")
        relay.start()
        relays.append(relay)
        wire_out = write_end
    return wire_in, wire_out, relays


def _is_stream(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _relay(source: int, target: int, name: str) -> threading.Thread:
    """A thread copying `source` to `target` until `source` ends; it closes both."""

    def copy() -> None:
        try:
            while chunk := os.read(source, 65536):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view) :]
        except OSError as exc:
            logger.debug("%s stopped: %s", name, exc)
        finally:
            os.close(source)
            os.close(target)

    return threading.Thread(target=copy, name=name, daemon=True)


def restore_standard_streams(saved: tuple[int, int]) -> None:
    """Put the agent's streams (copies taken before serving) back on fds 0 and 1."""
    for fd, copy in zip((0, 1), saved, strict=True):
        try:
            os.dup2(copy, fd)
        except OSError:
            logger.debug("could not restore fd %d", fd)
        os.close(copy)


class Writer(asyncio.Protocol):
    """The agent's output pipe; a line written after it closed is dropped."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.closed = asyncio.Event()
        """Set once the pipe is closed: everything written went out, or the reader is gone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def write(self, line: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line)
