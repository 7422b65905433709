"""How deep a JSON value nests, measured and written out without recursion: sans-IO, from data alone.

An agent's arguments or an upstream's result may nest hundreds of levels deep (valid JSON that
`json.loads` takes). Anything that walks such a value recursively can hit Python's recursion limit,
so the call path refuses arguments deeper than `MAX_NESTING` before anything walks them, masking
stores no deeper than that, and a value that must be written out whatever its depth (the digest of
a result) is encoded here, with a stack of our own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Any

from gateway.schema import past_limits

MAX_NESTING = 64
"""Levels of objects and arrays a call's arguments may nest (the arguments object is level 1)."""
MAX_VALUES = 100_000
"""Values (objects, arrays, and every member of them) a call's arguments may hold. Each is checked,
decided and masked in Python on the one event loop, tens of microseconds apiece at worst: the bound
keeps any one call's cost to about a second, whatever `max_message_size` lets in."""


def nests_deeper(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether `value` holds objects or arrays nested more than `limit` levels deep (without recursion)."""
    return past_limits(value, depth=limit) == "depth"


def cut_below(value: Any, levels: int) -> Any:
    """`value` with its objects and arrays kept `levels` deep, and each one below emptied (`{}`, `[]`):
    still deeper than `levels`, so refused the same, but small enough for any reader to take."""
    if not isinstance(value, Mapping | list):
        return value
    if levels <= 0:
        return {} if isinstance(value, Mapping) else []
    if isinstance(value, Mapping):
        return {key: cut_below(item, levels - 1) for key, item in value.items()}
    return [cut_below(item, levels - 1) for item in value]


def canonical_flat(value: Any) -> str:
    """The text `gateway.audit.chain.canonical` writes for `value` (sorted keys, no insignificant
    whitespace, non-ASCII as is, a NaN or infinity as the string "NaN", "Infinity" or "-Infinity"),
    written with a stack of our own: for values too deep for the recursive encoder."""
    pieces: list[str] = []
    # Each entry is a value to write, or a piece of text (a closing bracket, a comma) already decided.
    stack: list[tuple[bool, Any]] = [(False, value)]
    while stack:
        is_text, item = stack.pop()
        if is_text:
            pieces.append(item)
        elif isinstance(item, str):
            pieces.append(encode_basestring(item))
        elif item is None:
            pieces.append("null")
        elif item is True or item is False:
            pieces.append("true" if item else "false")
        elif isinstance(item, int):
            pieces.append(int.__repr__(item))
        elif isinstance(item, float):
            pieces.append(float.__repr__(item) if math.isfinite(item) else encode_basestring(_spelled(item)))
        elif isinstance(item, Mapping):
            pieces.append("{")
            pending: list[tuple[bool, Any]] = [(True, "}")]
            for index, (key, child) in enumerate(reversed(sorted(item.items()))):
                pending += [(False, child), (True, encode_basestring(_key(key)) + ":")]
                if index < len(item) - 1:
                    pending.append((True, ","))
            stack += pending
        elif isinstance(item, list | tuple):
            pieces.append("[")
            pending = [(True, "]")]
            for index, child in enumerate(reversed(item)):
                pending.append((False, child))
                if index < len(item) - 1:
                    pending.append((True, ","))
            stack += pending
        else:
            raise TypeError(f"Object of type {type(item).__name__} is not JSON serializable")
    return "".join(pieces)


def _key(key: Any) -> str:
    """An object key as `json` writes it (arguments and results have string keys; the others as `json` does)."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return "true" if key is True else "false" if key is False else "null"
    if isinstance(key, float):
        return float.__repr__(key) if math.isfinite(key) else _spelled(key)
    return str(key)


def _spelled(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
