"""Rate limits: sliding-window call counts per principal (or session) and rule, sans-IO (the caller
passes the time)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.calls import Who
from gateway.policy.rules import Rule

_Key = tuple[str, str, str]
"""(`Who.counted_as`: "principal" or "session", its name or id; the rule's id)."""


@dataclass(frozen=True, slots=True)
class Charge:
    """One call counted against its rate-limited rules (what a refund takes back), or why it may not go
    ahead after all (`refusal`)."""

    who: Who
    rules: tuple[Rule, ...] = ()
    at: float = 0.0
    hits: tuple[int, ...] = ()
    """The rows a shared store counted (none in memory)."""
    refusal: str | None = None
    would_deny: bool = False
    """A monitored rule was at its limit (only counted by a shared store: in memory, the decision says so)."""


class RateLimiter:
    """Sliding-window counts per (principal, rule), or (session, rule) for a caller no one authenticated:
    a principal's budget is one across its sessions, and a new session does not renew it. Only calls
    that go ahead are counted."""

    def __init__(self) -> None:
        self._hits: dict[_Key, deque[float]] = {}

    def wait(self, who: Who, rule: Rule, now: float) -> float:
        """Seconds until `rule` lets another call of `who` through; 0 when it would now."""
        rate = rule.rate
        if rate is None:
            return 0.0
        hits = self._hits.get((*who.counted_as, rule.id))
        if hits is None:
            return 0.0
        while hits and hits[0] <= now - rate.period:
            hits.popleft()
        if len(hits) < rate.limit:
            return 0.0
        return max(hits[len(hits) - rate.limit] + rate.period - now, 0.001)

    def charge(self, who: Who, rules: Sequence[Rule], now: float) -> bool:
        """Count one call against every rule, all or none; `False` when one of them is at its limit."""
        if any(self.wait(who, rule, now) for rule in rules):
            return False
        for rule in rules:
            self._hits.setdefault((*who.counted_as, rule.id), deque()).append(now)
        return True

    def forget(self, session: str) -> None:
        """Drop a finished session's own counts; a principal's outlive its sessions (its budget is not
        renewed by reconnecting)."""
        for key in [key for key in self._hits if key[:2] == ("session", session)]:
            del self._hits[key]

    def refund(self, who: Who, rules: Sequence[Rule], now: float) -> None:
        """Take back a charge made at `now` for a call that was refused after all."""
        for rule in rules:
            hits = self._hits.get((*who.counted_as, rule.id))
            if hits and now in hits:
                hits.remove(now)
