"""The audit in the call path: two pipeline stages, so each call has exactly one decision and one outcome.

`decisions` records the decision just before the call is forwarded (failing that, the call is
refused); `outcomes` (outermost) records how every call ended, refusals, timeouts, cancellations
and shutdown included, with its decision when it never got as far as `decisions`. What was decided
comes up with the outcome (`Outcome.call`), or noted on an exception (`calls.mark_decided`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import anyio

from gateway.audit.events import decided_for, decision_event, outcome_event
from gateway.audit.recorder import AuditWriter
from gateway.audit.store import event
from gateway.calls import Decision, Effect, Handler, Outcome, OutcomeKind, SessionInfo, ToolCall, decided_call
from gateway.errors import AuditError
from gateway.policy.engine import PolicyEngine
from gateway.policy.redact import Redaction

logger = logging.getLogger(__name__)
monitor = logging.getLogger("gateway.monitor")
"""One line per decided call (`mcp-armor serve` prints it to stderr unless `--quiet`)."""

SHUTDOWN_GRACE = 5.0
"""How long a cancelled call waits to get its outcome recorded."""


class CallAudit:
    """The recorder in the call path: the pipeline's two audit stages, and calls refused before it."""

    def __init__(self, recorder: AuditWriter, engine: PolicyEngine) -> None:
        self.recorder = recorder
        self.engine = engine
        self._recorded: dict[str, tuple[ToolCall, Redaction]] = {}
        """Calls whose decision is committed and whose outcome is not yet, with their masked arguments
        (at shutdown, any still here gets its outcome)."""
        self._in_flight = 0
        """Calls between entering the pipeline and getting their outcome: when one is alone, its events
        are committed at once instead of waiting for company."""

    def end_calls(self, reason: str) -> None:
        """At shutdown: any call whose decision is recorded and its outcome not yet gets one."""
        for call, redaction in self._recorded.values():
            outcome = Outcome.failed(call, OutcomeKind.CANCELLED, reason)
            self.recorder.queue(outcome_event(call, outcome, 0.0, redaction, self.recorder))
        self._recorded.clear()

    async def outcomes(self, call: ToolCall, call_next: Handler) -> Outcome:
        """Outermost stage: record how the call ended (and its decision, if it never got that far)."""
        started = time.perf_counter()
        self._in_flight += 1
        try:
            outcome = await call_next(call)
        except BaseException as exc:  # recorded as the policy had decided it, if it got that far
            await self._failed(decided_call(exc, call.id) or call, exc, started)
            raise
        finally:
            self._in_flight -= 1
        return await self._finish(outcome.call or call, outcome, started)

    async def _failed(self, call: ToolCall, error: BaseException, started: float) -> None:
        """Record a call that ended in an exception: cancelled, or a fault inside the gateway."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE):
            if isinstance(error, anyio.get_cancelled_exc_class()):
                reason = "cancelled before it completed (by the client, or the gateway shutting down)"
                await self._finish(call, Outcome.failed(call, OutcomeKind.CANCELLED, reason), started)
            else:
                await self._finish(call, Outcome.failed(call, OutcomeKind.ERROR, "internal gateway error"), started)

    async def decisions(self, call: ToolCall, call_next: Handler) -> Outcome:
        """Just before forwarding: commit the decision, or refuse the call."""
        body, redaction = decision_event(call, call.decision, self.recorder, self.engine)
        self._recorded[call.id] = (call, redaction)  # before the wait: a cancelled wait still leaves it committed
        try:
            await self.recorder.record(body, alone=self._in_flight == 1)
        except AuditError as exc:
            del self._recorded[call.id]
            return Outcome.refused(call, f"the audit log cannot record this call, so it is not made ({exc})")
        return await call_next(call)

    async def unknown_tool(
        self, session: SessionInfo, name: str, arguments: Mapping[str, Any], *, quarantine: str | None = None
    ) -> None:
        """A call to a tool that does not exist, is hidden from this client, or is quarantined (`quarantine`
        says why): refused, and recorded."""
        reason = quarantine or f"unknown tool '{name}'"
        stage = "quarantine" if quarantine else "unknown-tool"
        await self.unresolved(session, name, arguments, stage=stage, reason=reason, outcome=OutcomeKind.REFUSED)

    async def unrouted(self, session: SessionInfo, method: str, params: Mapping[str, Any]) -> None:
        """A request for a method the gateway does not serve: refused (default deny), and recorded."""
        reason = f"no handler for method '{method}': the gateway refuses what it does not serve"
        await self.unresolved(
            session, method, params, stage="unknown-method", reason=reason, outcome=OutcomeKind.REFUSED, method=method
        )

    async def unresolved(
        self,
        session: SessionInfo,
        name: str,
        arguments: Mapping[str, Any],
        *,
        stage: str,
        reason: str,
        outcome: OutcomeKind,
        method: str | None = None,
    ) -> None:
        """A call that ended before it was resolved to a tool the pipeline could take (`stage` says where):
        no policy decided it, and it was not forwarded; recorded as denied there, with its outcome.

        With `method`, a request for a method the gateway does not serve (`name` is the method too):
        recorded with its method and parameters, and no tool.
        """
        redaction = self.recorder.redactor.redact(arguments)
        reason = redaction.scrub(reason, self.recorder.redactor)
        call_id = os.urandom(16).hex()
        common = {"session_id": session.id, "call_id": call_id}
        # The name is the agent's choice (an unknown tool, a resource's URI): masked like its arguments.
        shown = redaction.scrub(name, self.recorder.redactor)
        common.update({"tool": shown} if method is None else {"method": shown})
        decision = event(
            "decision",
            **common,
            arguments=redaction.value,
            decision=Effect.DENY.value,
            rules=[],
            reason=reason,
            policy_revision=self.engine.policies.revision,
            masked=[item.to_record() for item in redaction.masked] or None,
            stage=stage,
            **decided_for(session),
        )
        ended = event(
            "outcome",
            **common,
            principal=session.principal or None,
            outcome=outcome.value,
            reason=reason,
            duration_ms=0.0,
        )
        try:
            await self.recorder.record(decision, ended)
        except AuditError as exc:
            logger.error("a call to '%s' (%s) could not be recorded yet: %s", name, stage, exc)
            self.recorder.queue(decision, ended)  # recorded once the log can be written again
        _print_line(session.id, common.get("tool") or common.get("method", ""), "deny", "", outcome.value, 0.0)

    async def _finish(self, call: ToolCall, outcome: Outcome, started: float) -> Outcome:
        """Record the outcome of `call` (as decided, when the policy got to it), and its decision if that
        is not committed yet."""
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        events = []
        decision = call.decision
        recorded = self._recorded.pop(call.id, None)
        if recorded is not None:
            redaction = recorded[1]
        else:
            # No policy decision: the tool's own input schema (checked first) refused the arguments, or
            # another stage before the policy did (it says which).
            stage = "policy" if decision is not None else (outcome.stage or "input-schema")
            decision = decision or Decision(Effect.DENY, outcome.reason, self.engine.policies.revision)
            body, redaction = decision_event(call, decision, self.recorder, self.engine, refusal=outcome, stage=stage)
            events.append(body)
        events.append(outcome_event(call, outcome, duration_ms, redaction, self.recorder))
        try:
            await self.recorder.record(*events, alone=self._in_flight == 0)
        except AuditError as exc:
            logger.error("the outcome of call %s to %s could not be recorded yet: %s", call.id, call.tool.name, exc)
            if outcome.kind in (OutcomeKind.OK, OutcomeKind.ERROR):
                reason = f"the call ran, but its outcome cannot be recorded in the audit log, so it is withheld ({exc})"
                outcome = Outcome.refused(call, reason)
                events[-1] = outcome_event(call, outcome, duration_ms, redaction, self.recorder)
            self.recorder.queue(*events)  # what the agent was told, recorded once the log can be written again
        effect = decision.effect.value if decision is not None else "?"
        rules = ",".join(decision.rules) if decision is not None else ""
        if decision is not None and decision.would is not None:
            effect += f" (would {decision.would.value})"
        _print_line(call.session.id, events[-1]["tool"], effect, rules, outcome.kind.value, duration_ms)
        return outcome


def _print_line(session: str, tool: str, decision: str, rules: str, outcome: str, duration_ms: float) -> None:
    """The call's line on the monitor, written once the loop has sent the agent its answer (not before)."""
    if monitor.isEnabledFor(logging.INFO):
        stamp = datetime.now().strftime("%H:%M:%S")
        rule = f" [{rules}]" if rules else ""
        took = f"{duration_ms / 1000:.2f}s" if duration_ms >= 1000 else f"{duration_ms:.1f}ms"
        line = f"{stamp} {session[:8]} {tool} {decision}{rule} -> {outcome} {took}"
        asyncio.get_running_loop().call_soon(monitor.info, "%s", line)
