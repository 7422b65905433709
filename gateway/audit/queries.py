"""Which events a query of the audit log returns: the filters and the SQL they make."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Filters:
    """Which events a query returns; `None` means no restriction."""

    session: str | None = None
    principal: str | None = None
    """A glob over the principal a session's start names: only the events of such sessions."""
    tool: str | None = None
    """A glob over exposed tool names (`git__*`)."""
    decision: str | None = None
    """Only the events of calls with this decision."""
    since: str | None = None
    """An ISO 8601 UTC time; events at or after it."""
    kinds: tuple[str, ...] | None = None
    """Only events of these kinds."""
    after_seq: int = 0


EVERY = Filters()
"""No restriction: the whole log."""


def where_clause(filters: Filters, *, postgres: bool = False) -> tuple[str, list[Any]]:
    """The filters as a condition on `events`: for the SQLite file, or (`postgres`) for the shared store,
    whose globs are read as SQLite's GLOB reads them and whose events keep the principal in a column."""
    mark = "%s" if postgres else "?"
    matches = "~" if postgres else "GLOB"
    pattern = glob_regex if postgres else str
    principal = "principal" if postgres else "json_extract(body, '$.principal')"
    clauses: list[str] = [f"seq > {mark}"]
    params: list[Any] = [filters.after_seq]
    if filters.session is not None:
        clauses.append(f"session_id = {mark}")
        params.append(filters.session)
    if filters.principal is not None:
        starts = f"SELECT session_id FROM events WHERE kind = 'session_start' AND {principal} {matches} {mark}"
        clauses.append(f"session_id IN ({starts})")
        params.append(pattern(filters.principal))
    if filters.tool is not None:
        clauses.append(f"tool {matches} {mark}")
        params.append(pattern(filters.tool))
    if filters.decision is not None:
        clauses.append(f"call_id IN (SELECT call_id FROM events WHERE kind = 'decision' AND decision = {mark})")
        params.append(filters.decision)
    if filters.since is not None:
        clauses.append(f"ts >= {mark}")
        params.append(filters.since)
    if filters.kinds is not None:
        clauses.append(f"kind IN ({', '.join(mark for _ in filters.kinds)})")
        params.extend(filters.kinds)
    return " AND ".join(clauses), params


SESSIONS = """
    SELECT session_id, min(ts), max(ts),
           (SELECT body FROM events s WHERE s.session_id = e.session_id AND s.kind = 'session_start'
            ORDER BY s.seq LIMIT 1),
           (SELECT ts FROM events s WHERE s.session_id = e.session_id AND s.kind = 'session_end'
            ORDER BY s.seq DESC LIMIT 1),
           count(*) FILTER (WHERE kind = 'decision'), count(*) FILTER (WHERE kind = 'outcome' AND outcome = 'refused')
    FROM events e WHERE session_id IS NOT NULL AND {where}
    GROUP BY session_id ORDER BY min(seq)
"""
"""One row per session (as `store.session_row` reads it), of the events `{where}` keeps: the same query
for the SQLite file and the shared store."""


def glob_regex(pattern: str) -> str:
    """A glob (`*`, `?`, `[...]`, as SQLite's GLOB reads them) as an anchored POSIX regular expression."""
    out, i = ["^"], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[" and (end := pattern.find("]", i + 2)) != -1:
            inner = pattern[i + 1 : end]
            negate = inner.startswith("^")
            inner = inner[1:] if negate else inner
            out.append("[" + ("^" if negate else "") + inner.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out) + "$"
