"""An upstream's stdin: the lines written in one turn of the event loop reach the child in one write."""

from __future__ import annotations

import asyncio

import pytest
from anyio.lowlevel import checkpoint

from gateway.errors import ChannelClosed
from gateway.upstream.spawn import Batched

pytestmark = pytest.mark.anyio


class Pipe(asyncio.WriteTransport):
    """A write transport that notes each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing


async def test_lines_written_in_one_turn_leave_in_one_write() -> None:
    pipe = Pipe()
    lines = Batched(pipe, asyncio.get_running_loop())
    lines.write(b'{"id":1}\n')
    lines.write(b'{"id":2}\n')
    assert pipe.writes == []
    await checkpoint()
    assert pipe.writes == [b'{"id":1}\n{"id":2}\n']
    lines.write(b'{"id":3}\n')
    await checkpoint()
    assert pipe.writes == [b'{"id":1}\n{"id":2}\n', b'{"id":3}\n']


async def test_a_flush_sends_what_is_pending_at_once_in_order() -> None:
    pipe = Pipe()
    lines = Batched(pipe, asyncio.get_running_loop())
    lines.write(b"a\n")
    lines.write(b"b\n")
    lines.flush()
    assert pipe.writes == [b"a\nb\n"]
    await checkpoint()  # the turn's own flush finds nothing left
    assert pipe.writes == [b"a\nb\n"]


async def test_a_line_for_a_closed_stdin_is_refused() -> None:
    pipe = Pipe()
    pipe.closing = True
    lines = Batched(pipe, asyncio.get_running_loop())
    with pytest.raises(ChannelClosed, match="stdin is closed"):
        lines.write(b"a\n")
    await checkpoint()
    assert pipe.writes == []
