"""Newline-delimited JSON-RPC framing: one message per line, written compact, read split into lines."""

from __future__ import annotations

import json
from typing import Any

from gateway.schema import replace_non_finite

MAX_LINE = 64 * 1024 * 1024
"""The longest message accepted on a pipe (bytes); a longer one is a protocol fault."""

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
"""Built once (`json.dumps` with options builds an encoder per call); the second for lone surrogates."""


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


class LineBuffer:
    """Splits a byte stream into lines; `feed` returns the complete ones."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
            raise ValueError(f"a message longer than {MAX_LINE} bytes")
        return lines
