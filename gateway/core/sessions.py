"""The downstream sessions open now: each noted in the audit log the first time it is seen, and ended once."""

from __future__ import annotations

from collections.abc import Callable

from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from gateway.audit.events import GatewayEvents
from gateway.calls import SessionInfo
from gateway.policy.engine import PolicyEngine


class Sessions:
    """Which sessions are open; a session's end also forgets its own rate-limit windows (a principal's
    stay: reconnecting does not renew its budget). A principal's stateless 2026-07-28 session keeps them:
    its id is the same on every replica and in every run, so one replica stopping must not renew the
    budget the others count against (they expire with their windows)."""

    def __init__(self, events: GatewayEvents, engine: PolicyEngine) -> None:
        self._events = events
        self._engine = engine
        self._open: dict[str, SessionInfo] = {}
        self.on_end: list[Callable[[str], None]] = []
        """Told of each session's end (by id), to forget what they kept for it."""

    def note(self, session: SessionInfo) -> None:
        """Note a session the first time it is seen (its start is committed before any of its calls)."""
        if session.id in self._open:
            return
        self._open[session.id] = session
        self._events.session_started(session)

    def end(self, session_id: str, reason: str) -> None:
        """The session is over (a session not open, or ended already, is left alone)."""
        session = self._open.pop(session_id, None)
        if session is not None:
            if not (session.transport == "http" and session.protocol_version in MODERN_PROTOCOL_VERSIONS):
                self._engine.forget(session_id)
            for forget in self.on_end:
                forget(session_id)
            self._events.session_ended(session, reason)

    def end_all(self, reason: str) -> None:
        """At shutdown: every session still open ends."""
        for session_id in list(self._open):
            self.end(session_id, reason)
