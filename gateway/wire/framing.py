"""Newline-delimited JSON-RPC framing: one message per line, written compact, read split into lines.

Reading is strict where Python's `json` is lenient: `NaN`, `Infinity` and numbers too large for a
float (`1e999`) are not JSON, and a value that cannot be written back as it was read is never taken
as a number (`NonFiniteNumber`); a line nested past the parser's reach is a parse error, not a crash.
A line longer than the limit is skipped to its newline without being kept (`Oversize`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from gateway.errors import NonFiniteNumber, NotJson
from gateway.schema import replace_non_finite

MAX_LINE = 64 * 1024 * 1024
"""The longest message accepted on a pipe by default (bytes): `[gateway] max_message_size`."""
KEPT = 4096
"""Bytes kept of each end of an oversize line: enough to read the id of a typical message."""

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
"""Built once (`json.dumps` with options builds an encoder per call); the second for lone surrogates."""


def _non_finite_constant(name: str) -> Any:
    raise NonFiniteNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NonFiniteNumber(f"{text[:40]} is past the range of a number")
    return value


_strict = json.JSONDecoder(parse_constant=_non_finite_constant, parse_float=_finite_float)
_lenient = json.JSONDecoder(parse_constant=lambda _: None, parse_float=lambda text: _finite_or_none(float(text)))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def loads(line: bytes) -> Any:
    """One line's JSON value. Raises `NotJson`, or `NonFiniteNumber` for a value JSON cannot carry."""
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise NotJson("a line that is not UTF-8") from None
    try:
        return _strict.decode(text)
    except NonFiniteNumber:
        raise
    except ValueError:
        raise NotJson("a line that is not JSON") from None
    except RecursionError:
        raise NotJson("a line nested too deep to parse") from None


def loads_lenient(line: bytes) -> Any:
    """A line `loads` refused for a number JSON cannot carry, with each such number read as null: only to
    find out who sent it and to whom to answer, never to act on."""
    try:
        return _lenient.decode(line.decode())
    except (ValueError, RecursionError):
        return None


def dumps(message: Any) -> bytes:
    """One message as a line of compact UTF-8 JSON; NaN and infinities (not JSON) become null.

    A lone surrogate (JSON can carry one, escaped, and UTF-8 cannot) stays escaped, as it arrived.
    """
    try:
        text = _encode(message)
    except ValueError:
        message = replace_non_finite(message, lambda _: None)
        text = _encode(message)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return _encode_ascii(message).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Oversize:
    """A line longer than the limit, skipped to its newline: its length, and its two ends (to find its id)."""

    size: int
    head: bytes
    tail: bytes

    def request_id(self) -> str | int | None:
        """The message's id where one of its ends shows it at the top level (the usual places), else `None`."""
        found = _HEAD_ID.match(self.head) or _TAIL_ID.search(self.tail)
        if found is None:
            return None
        try:
            value = json.loads(found[1])
        except ValueError:
            return None
        return value if type(value) in (str, int) else None


_ID = rb'(-?\d{1,19}|"(?:[^"\\]|\\.){0,200}")'
_HEAD_ID = re.compile(rb'\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*' + _ID + rb"\s*[,}]")
_TAIL_ID = re.compile(rb'[,{]\s*"id"\s*:\s*' + _ID + rb'\s*(?:,\s*"jsonrpc"\s*:\s*"2\.0"\s*)?\}\s*\Z')


class LineBuffer:
    """Splits a byte stream into lines; `feed` returns the complete ones, in order, each line longer
    than `limit` bytes as an `Oversize` in its place. Each byte is looked at once (no re-joining of what
    is still partial), and no more than `limit` bytes of a line are ever kept."""

    __slots__ = ("_head", "_parts", "_size", "_skipped", "_tail", "limit")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._skipped = 0
        """Bytes of the current line skipped for being over the limit (0: not skipping)."""
        self._head = b""
        self._tail = b""

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        pieces = data.split(b"\n")
        rest = pieces.pop()  # what follows the last newline: the start of a line still partial
        lines: list[bytes | Oversize] = []
        if pieces:
            self._take(pieces[0])
            lines.append(self._line())
            if len(data) <= self.limit:  # no line in it can be over the limit
                lines.extend(pieces[1:])
            else:
                lines.extend(piece if len(piece) <= self.limit else _oversize(piece) for piece in pieces[1:])
        self._take(rest)
        return lines

    def _take(self, piece: bytes) -> None:
        """Add `piece` to the line being read (or to the count of what is skipped of it)."""
        if not piece:
            return
        if self._skipped:
            self._skipped += len(piece)
            self._tail = (self._tail + piece[-KEPT:])[-KEPT:]
            return
        if self._size + len(piece) > self.limit:
            partial = b"".join(self._parts)
            self._head = (partial[:KEPT] + piece[:KEPT])[:KEPT]
            self._tail = (partial[-KEPT:] + piece[-KEPT:])[-KEPT:]
            self._skipped = self._size + len(piece)
            self._parts, self._size = [], 0
            return
        self._parts.append(piece)
        self._size += len(piece)

    def _line(self) -> bytes | Oversize:
        """The line just ended."""
        if self._skipped:
            line: bytes | Oversize = Oversize(self._skipped, self._head, self._tail)
            self._skipped, self._head, self._tail = 0, b"", b""
            return line
        whole = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._size = [], 0
        return whole


def _oversize(line: bytes) -> Oversize:
    return Oversize(len(line), line[:KEPT], line[-KEPT:])
