"""An upstream server as a child process, spoken to over its pipes through a `Channel`.

`spawn` starts one (gateway.upstream.processes: its own process group, a minimal environment, stderr
to its log), or adopts the one started ahead for it, and stops it the way MCP asks: close stdin,
wait, SIGTERM the group, SIGKILL it. Its stdout is an asyncio protocol: lines are parsed and handed to
the channel as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio

from gateway.config.environment import BY_DEFAULT, Passing
from gateway.errors import ChannelClosed, NonFiniteNumber, NotJson, RemoteError
from gateway.upstream import processes
from gateway.wire.channel import Channel, NotificationHandler, RequestHandler
from gateway.wire.framing import MAX_LINE, LineBuffer, Oversize, loads, loads_lenient
from gateway.wire.peer import INTERNAL_ERROR

logger = logging.getLogger(__name__)

EXIT_POLL = 0.01
"""How often a stopping upstream is checked for having exited."""


class _ChildOutput(asyncio.Protocol):
    """An upstream's stdout: lines parsed and handed to its channel as they arrive."""

    def __init__(self, name: str, channel: Channel, limit: int = MAX_LINE) -> None:
        self.name = name
        self.channel = channel
        self.lines = LineBuffer(limit)
        self.eof = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        for line in self.lines.feed(data):
            if isinstance(line, Oversize):
                why = (
                    f"an answer of {line.size} bytes, over the limit of {self.lines.limit} bytes "
                    "([gateway] max_upstream_message_size)"
                )
                self._unusable(line.request_id(), why, unread=True)
            elif line.strip():
                self._message(line)

    def _message(self, line: bytes) -> None:
        try:
            message = loads(line)
        except NotJson as exc:
            logger.warning("upstream '%s' wrote %s; ignored: %.200r", self.name, exc, line)
            return
        except NonFiniteNumber as exc:
            lenient = loads_lenient(line)
            if isinstance(lenient, dict) and "method" not in lenient:
                self._unusable(lenient.get("id"), f"a number JSON cannot carry ({exc})")
            else:
                logger.warning(
                    "upstream '%s' wrote a number JSON cannot carry (%s); ignored: %.200r", self.name, exc, line
                )
            return
        self.channel.receive(message)

    def _unusable(self, request_id: object, why: str, *, unread: bool = False) -> None:
        """An answer that cannot be taken as it came: the call it answers fails, saying why. `unread`:
        the answer was too large to read its id from, and every call in flight to the upstream fails
        (the one it answered is never left waiting)."""
        error = RemoteError(INTERNAL_ERROR, f"the gateway refused its answer: {why}")
        if request_id is None and unread:
            failed = self.channel.fail_all(error)
        else:
            failed = int(self.channel.fail(request_id, error))
        logger.warning("upstream '%s' sent %s; %d call(s) waiting for it fail", self.name, why, failed)

    def eof_received(self) -> bool | None:
        self._ended()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _ended(self) -> None:
        self.channel.close("closed the connection")
        self.eof.set()


@dataclass(slots=True)
class Child:
    """A running upstream process and the channel over its pipes."""

    channel: Channel
    pid: int
    ended: asyncio.Event
    """Set when its stdout closes (it exited, or closed the pipe)."""


@asynccontextmanager
async def spawn(
    name: str,
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | Path | None,
    stderr: IO[Any],
    passing: Passing = BY_DEFAULT,
    on_request: RequestHandler | None = None,
    on_notify: NotificationHandler | None = None,
    limit: int = MAX_LINE,
) -> AsyncIterator[Child]:
    """Start an upstream server (or adopt the one started ahead for it) and yield its channel; on exit
    stop it (close stdin, SIGTERM, SIGKILL). `limit`: the largest message it may send (bytes)."""
    loop = asyncio.get_running_loop()
    process = processes.start(name, argv, env=env, cwd=cwd, stderr=stderr, passing=passing)
    assert process.stdin is not None and process.stdout is not None
    try:
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, process.stdin)
    except BaseException:
        await _stop(process, None, name)
        raise

    assert isinstance(stdin, asyncio.WriteTransport)
    lines = Batched(stdin, loop)
    channel = Channel(name, lines.write, on_request=on_request, on_notify=on_notify)
    output = _ChildOutput(name, channel, limit)
    reader: asyncio.BaseTransport | None = None
    try:
        reader, _ = await loop.connect_read_pipe(lambda: output, process.stdout)
        yield Child(channel, process.pid, output.eof)
    finally:
        channel.close("the gateway closed the connection")
        lines.flush()
        with anyio.CancelScope(shield=True):
            await _stop(process, stdin, name)
        if reader is not None:
            reader.close()


class Batched:
    """An upstream's stdin: the lines written in one turn of the event loop leave in one write. Calls
    released together (one audit commit settles many) then cost the upstream one wake-up, not one each."""

    def __init__(self, stdin: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._stdin = stdin
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, line: bytes) -> None:
        if self._stdin.is_closing():
            raise ChannelClosed("its stdin is closed")
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        if not self._stdin.is_closing():
            self._stdin.write(data)


async def _stop(process: subprocess.Popen[bytes], stdin: asyncio.BaseTransport | None, name: str) -> None:
    """MCP's shutdown: close stdin and wait, then SIGTERM the process group and wait, then SIGKILL it."""
    if stdin is not None:
        stdin.close()
    elif process.stdin is not None:
        process.stdin.close()
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)
        with anyio.move_on_after(processes.STOP_GRACE):
            # Polled: nothing signals a child's exit to the loop without a child watcher of its own.
            while process.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(EXIT_POLL)
        if process.returncode is not None:
            return
    logger.warning("upstream '%s' (pid %d) is still running after SIGKILL; abandoned", name, process.pid)
