"""Rate limits: sliding-window call counts per session and rule, sans-IO (the caller passes the time)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from gateway.policy.rules import Rule


class RateLimiter:
    """Sliding-window counts per (session, rule). Only calls that go ahead are counted."""

    def __init__(self) -> None:
        self._hits: dict[tuple[str, str], deque[float]] = {}

    def wait(self, session: str, rule: Rule, now: float) -> float:
        """Seconds until `rule` lets another call of `session` through; 0 when it would now."""
        rate = rule.rate
        if rate is None:
            return 0.0
        hits = self._hits.get((session, rule.id))
        if hits is None:
            return 0.0
        while hits and hits[0] <= now - rate.period:
            hits.popleft()
        if len(hits) < rate.limit:
            return 0.0
        return max(hits[len(hits) - rate.limit] + rate.period - now, 0.001)

    def charge(self, session: str, rules: Sequence[Rule], now: float) -> bool:
        """Count one call against every rule, all or none; `False` when one of them is at its limit."""
        if any(self.wait(session, rule, now) for rule in rules):
            return False
        for rule in rules:
            self._hits.setdefault((session, rule.id), deque()).append(now)
        return True

    def forget(self, session: str) -> None:
        """Drop a finished session's counts."""
        for key in [key for key in self._hits if key[0] == session]:
            del self._hits[key]

    def refund(self, session: str, rules: Sequence[Rule], now: float) -> None:
        """Take back a charge made at `now` for a call that was refused after all."""
        for rule in rules:
            hits = self._hits.get((session, rule.id))
            if hits and now in hits:
                hits.remove(now)
