"""Which events a query of the audit log returns: the filters and the SQL they make."""

from __future__ import annotations

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


def where_clause(filters: Filters) -> tuple[str, list[Any]]:
    clauses: list[str] = ["seq > ?"]
    params: list[Any] = [filters.after_seq]
    if filters.session is not None:
        clauses.append("session_id = ?")
        params.append(filters.session)
    if filters.principal is not None:
        clauses.append(
            "session_id IN (SELECT session_id FROM events WHERE kind = 'session_start' "
            "AND json_extract(body, '$.principal') GLOB ?)"
        )
        params.append(filters.principal)
    if filters.tool is not None:
        clauses.append("tool GLOB ?")
        params.append(filters.tool)
    if filters.decision is not None:
        clauses.append("call_id IN (SELECT call_id FROM events WHERE kind = 'decision' AND decision = ?)")
        params.append(filters.decision)
    if filters.since is not None:
        clauses.append("ts >= ?")
        params.append(filters.since)
    if filters.kinds is not None:
        clauses.append(f"kind IN ({', '.join('?' for _ in filters.kinds)})")
        params.extend(filters.kinds)
    return " AND ".join(clauses), params
