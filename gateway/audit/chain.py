"""The audit log's hash chain: the canonical form of an event body, its hash, and checking a stored chain.

Every event is stored as its canonical JSON `body` (sorted keys, no insignificant whitespace, UTF-8)
with `hash = SHA-256(bytes(prev_hash) + body)`, where `prev_hash` is the hash of the event before it
(64 zeros for the first); the `head` row records the last sequence number and hash.

Verification holds each stored body to exactly its canonical text: a body that parses to the same
event but is spelled differently (a duplicate key, which SQLite's `json_extract` reads first and
Python's parser last; other key order, whitespace or escapes) is reported, never re-encoded into a
match, so what the hash covers is what every query reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.schema import canonical_text, replace_non_finite

GENESIS = "0" * 64
_SURROGATE = re.compile("[\ud800-\udfff]")
"""In canonical text (written with `ensure_ascii=False`) a surrogate can only be a lone one, in a string."""


def canonical(event: Mapping[str, Any]) -> str:
    """The canonical JSON form of an event body: what is stored and what is hashed.

    Strict JSON: a NaN or infinity (which a tool's arguments or result may carry) is written as the
    string "NaN", "Infinity" or "-Infinity", and a lone surrogate (JSON carries one, UTF-8 cannot) as
    its escape `\\udXXX`, so such a call is recorded like any other.
    """
    try:
        text = canonical_text(event, allow_nan=False)
    except ValueError:
        text = canonical_text(replace_non_finite(event, _spelled), allow_nan=False)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match[0]):04x}", text) if _SURROGATE.search(text) else text


def _spelled(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refusing a key given twice (which readers would disagree about)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(f"key {key!r} appears twice")
            seen.add(key)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def body_problem(body: object) -> str | None:
    """Why a stored body is not exactly the canonical text of an event (`None` when it is)."""
    if not isinstance(body, str):
        return f"body is stored as {type(body).__name__}, not text (edited)"
    try:
        event = _STRICT.decode(body)
    except _Duplicate as exc:
        return f"body has a duplicate key: {exc} (edited)"
    except (ValueError, RecursionError):
        return "body is not valid JSON (edited)"
    if not isinstance(event, dict):
        return "body is not a JSON object (edited)"
    try:
        canonical_body = canonical(event)
    except (ValueError, RecursionError):
        return "body cannot be written canonically (edited)"
    if canonical_body != body:
        return "body is not in its canonical form: key order, spacing, escapes or numbers differ (edited)"
    return None


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + body.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Problem:
    """The first place where the chain does not hold."""

    seq: int
    what: str


@dataclass(frozen=True, slots=True)
class Verification:
    events: int
    head_seq: int
    head_hash: str
    problem: Problem | None = None


def _check_row(seq: int, prev_hash: str, digest: str, body: str, expected: int, prev: str) -> Problem | None:
    if seq != expected:
        span = f"{expected}" if seq == expected + 1 else f"{expected}-{seq - 1}"
        return Problem(expected, f"event{'s' if seq > expected + 1 else ''} {span} missing (deleted)")
    if prev_hash != prev:
        return Problem(seq, "prev_hash does not match the event before it (events deleted, reordered or replaced)")
    what = body_problem(body)
    if what is not None:
        return Problem(seq, what)
    if chain_hash(prev, body) != digest:
        return Problem(seq, "hash does not match the event's content (edited)")
    return None


def _check_head(last_seq: int, last_hash: str, head_seq: int, head_hash: str) -> Problem | None:
    if head_seq > last_seq:
        return Problem(last_seq + 1, f"events {last_seq + 1}-{head_seq} missing (the log was truncated)")
    if head_seq < last_seq:
        return Problem(head_seq + 1, f"events after {head_seq} were not appended through the chain head")
    if head_hash != last_hash:
        return Problem(last_seq, "the chain head's hash does not match the last event")
    return None


def _check_anchors(anchors: Sequence[tuple[int, str]], hashes: Mapping[int, str]) -> Problem | None:
    for seq, digest in anchors:
        if hashes.get(seq) != digest:
            found = hashes.get(seq)
            what = "missing" if found is None else f"has hash {found[:16]}..., not the anchored {digest[:16]}..."
            return Problem(
                seq, f"anchored event {what} (the log was cut short or rewritten after the anchor was taken)"
            )
    return None


def walk(db: sqlite3.Connection, anchors: Sequence[tuple[int, str]] = ()) -> Verification:
    """Walk the whole chain in `db`; the first sequence number where it breaks, if any."""
    db.execute("BEGIN")  # one snapshot for the walk and the head
    try:
        head_seq, head_hash = db.execute("SELECT seq, hash FROM head WHERE id = 1").fetchone()
        rows = db.execute("SELECT seq, prev_hash, hash, body FROM events ORDER BY seq")
        return walk_rows(rows, head_seq, head_hash, anchors)
    finally:
        db.execute("COMMIT")


Row = tuple[int, str, str, str]
"""An event as stored: seq, prev_hash, hash, body."""


def walk_rows(
    rows: Iterable[Row],
    head_seq: int,
    head_hash: str,
    anchors: Sequence[tuple[int, str]] = (),
    check: Callable[[Row], str | None] | None = None,
) -> Verification:
    """Walk a chain's rows in order against its head and anchors; the first place where it breaks, if any.

    `check` looks at each row that holds together otherwise (what the store keeps beside the body)."""
    expected, prev, count = 1, GENESIS, 0
    problem: Problem | None = None
    hashes: dict[int, str] = {}
    wanted = {seq for seq, _ in anchors}
    for row in rows:
        seq, prev_hash, digest, body = row
        problem = _check_row(seq, prev_hash, digest, body, expected, prev)
        if problem is None and check is not None:
            what = check(row)
            problem = Problem(seq, what) if what is not None else None
        if problem is not None:
            break
        if seq in wanted:
            hashes[seq] = digest
        expected, prev, count = seq + 1, digest, count + 1
    if problem is None:
        problem = _check_head(expected - 1, prev, head_seq, head_hash)
    if problem is None:
        problem = _check_anchors(anchors, hashes)
    return Verification(count, head_seq, head_hash, problem)
