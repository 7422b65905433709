"""The audit recorder: events built, secrets masked, and group-committed to the audit log.

Callers queue events and, where the guarantee needs it, wait until theirs are committed; a commit
takes everything queued so far (group commit), so durability does not serialise concurrent calls.
With `audit_sync = "normal"` a commit is a WAL append that costs microseconds: it runs on the event
loop right after the callers already running have queued theirs (a callback, not a task hand-over).
A writer task commits what is only queued, and takes over whenever that cannot work: with `"full"`
(an fsync per commit) or while another process holds the write lock, it commits in a worker thread,
and whatever queues meanwhile goes into its next group.

`CallAudit` plugs the recorder into the call path as two pipeline stages: `decisions` commits the
decision just before the call is forwarded (failing that, the call is refused), and `outcomes`
(outermost) records how every call ended, refusals, timeouts, cancellations and shutdown included,
so each call has exactly one decision and one outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from gateway.audit_store import FIELDS, AuditError, AuditStore, canonical, is_locked, now_iso
from gateway.calls import Decision, Effect, Outcome, OutcomeKind, SessionInfo, ToolCall
from gateway.config import IN_MEMORY
from gateway.pins import Assessment
from gateway.pipeline import Handler
from gateway.policy import PolicyEngine
from gateway.redact import Redaction, Redactor

logger = logging.getLogger(__name__)
monitor = logging.getLogger("gateway.monitor")
"""One line per decided call (`mcp-armor serve` prints it to stderr unless `--quiet`)."""

CHECKPOINT_EVERY = 2000
"""Events between WAL checkpoints (run in a worker thread, never on the event loop)."""
SHUTDOWN_GRACE = 5.0
"""How long a cancelled call waits to get its outcome recorded."""
ToolEntry = tuple[str, str, Any]
"""An exposed tool as the catalogue events see it: upstream, definition digest, definition."""


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event body: every stable field present (null where it does not apply), then the kind's own."""
    body: dict[str, Any] = dict.fromkeys(FIELDS)
    body["ts"] = now_iso()
    body["kind"] = kind
    body.update(fields)
    return body


class _Ticket:
    """One caller's wait for its events to be committed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.error: str | None = None


class Recorder:
    """The single writer of one audit log."""

    def __init__(self, path: Path, *, sync: str = "normal") -> None:
        self.path = path
        self.sync = sync
        self.redactor = Redactor(os.urandom(32))
        self.failure: str | None = None
        """Why the log cannot be written right now (`None` while it can)."""
        self._store: AuditStore | None = None
        self._queue: list[str] = []
        self._tickets: list[_Ticket] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._commit_due = False
        self._writing = False
        """The writer task is committing (maybe in a worker thread): nobody else may touch the store."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._since_checkpoint = 0
        self._checkpointing = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Recorder]:
        """Open the log and run the writer; on exit, commit everything still queued and close."""
        self._open()
        if self.failure is not None:
            logger.error("%s; every tool call will be refused until it can be written", self.failure)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop, tg)
            try:
                yield self
            finally:
                self._closing = True
                self._wake.set()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _open(self) -> AuditStore | None:
        if self._store is None:
            try:
                self._store = AuditStore.open_writer(self.path, sync=self.sync)
            except AuditError as exc:
                self.failure = str(exc)
                return None
            self.redactor = Redactor(self._store.mask_key())
            self.failure = None
        return self._store

    def queue(self, *bodies: Mapping[str, Any]) -> None:
        """Queue events without waiting for their commit (order is kept with everything else queued): the
        next commit takes them, the writer task's or a caller's."""
        self._queue.extend(canonical(body) for body in bodies)
        self._wake.set()

    async def record(self, *bodies: Mapping[str, Any], alone: bool = False) -> None:
        """Queue events and wait until they are committed; `AuditError` when they could not be.

        With `audit_sync = "normal"` the commit runs on the event loop as soon as the callers already
        running have had their turn, taking everything they queued (one commit for a burst of calls);
        a caller that knows nobody else is about to record (`alone`) commits at once. Otherwise the
        writer task commits.
        """
        if self._closing:
            raise AuditError(f"{self.path}: the audit log is closed (the gateway is shutting down)")
        ticket = _Ticket()
        self._tickets.append(ticket)
        self._queue.extend(canonical(body) for body in bodies)
        if self.sync != "normal" or self._writing or self._store is None:
            self._wake.set()
        elif alone:
            self._commit_here()  # settles the ticket, or hands everything to the writer task
        elif not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._commit_here)
        await ticket.done.wait()
        if ticket.error is not None:
            raise AuditError(ticket.error)

    def _commit_here(self) -> None:
        """Commit what is queued, on the event loop; anything but success goes to the writer task."""
        self._commit_due = False
        if self._writing or self._store is None or not self._queue:
            return
        bodies, self._queue = self._queue, []
        tickets, self._tickets = self._tickets, []
        try:
            self._store.append(bodies)
        except sqlite3.Error as exc:  # the write lock is taken, or worse: the writer task waits, or reports it
            logger.debug("audit commit on the event loop failed, handing over to the writer: %s", exc)
            self._queue[:0] = bodies
            self._tickets[:0] = tickets
            self._wake.set()
            return
        for ticket in tickets:
            ticket.done.set()
        self._committed(len(bodies))

    async def _write_loop(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        while True:
            await self._wake.wait()
            self._wake = asyncio.Event()
            if self._queue:
                bodies, self._queue = self._queue, []
                tickets, self._tickets = self._tickets, []
                self._writing = True
                try:
                    with anyio.CancelScope(shield=True):
                        error = await self._commit(bodies)
                finally:
                    self._writing = False
                for ticket in tickets:
                    ticket.error = error
                    ticket.done.set()
                if error is None:
                    self._committed(len(bodies))
            if self._closing and not self._queue:
                return

    async def _commit(self, bodies: list[str]) -> str | None:
        """Append one group; the reason when it could not be committed."""
        store = self._open()
        if store is None:
            return self.failure
        try:
            if self.sync == "normal":
                try:
                    store.append(bodies)  # a WAL append: tens of microseconds, cheaper than a thread hop
                    return None
                except sqlite3.OperationalError as exc:
                    if not is_locked(exc):
                        raise
            await anyio.to_thread.run_sync(store.append_waiting, bodies)
        except sqlite3.Error as exc:
            self.failure = f"{self.path}: cannot write the audit log: {exc}"
            logger.error("%s", self.failure)
            return self.failure
        return None

    def _committed(self, count: int) -> None:
        self._since_checkpoint += count
        if self._since_checkpoint >= CHECKPOINT_EVERY and not self._checkpointing and str(self.path) != IN_MEMORY:
            self._since_checkpoint = 0
            if self._tg is not None:
                self._checkpointing = True
                self._tg.start_soon(self._checkpoint)

    async def _checkpoint(self) -> None:
        try:
            await anyio.to_thread.run_sync(_checkpoint, self.path)
        except sqlite3.Error as exc:
            logger.warning("audit log checkpoint failed (the WAL file keeps growing until one succeeds): %s", exc)
        finally:
            self._checkpointing = False


def _checkpoint(path: Path) -> None:
    connection = sqlite3.connect(path, timeout=10)
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        connection.close()


class CallAudit:
    """The recorder in the call path, and the gateway's other events (sessions, catalogue, policy, upstreams)."""

    def __init__(self, recorder: Recorder, engine: PolicyEngine) -> None:
        self.recorder = recorder
        self.engine = engine
        self._sessions: dict[str, SessionInfo] = {}
        self._decisions: dict[str, Decision] = {}
        """Decisions made but not yet recorded, by call id."""
        self._recorded: dict[str, tuple[ToolCall, Redaction]] = {}
        """Calls whose decision is committed and whose outcome is not yet, with their masked arguments."""
        self._in_flight = 0
        """Calls between entering the pipeline and getting their outcome: when one is alone, its events
        are committed at once instead of waiting for company."""
        self._pins: dict[tuple[str, str, str], tuple[str, str]] = {}
        """(upstream, kind, name) -> (digest, state) last recorded for each definition on offer."""

    # -- sessions ------------------------------------------------------------------------------

    def session(self, session: SessionInfo) -> None:
        """Note a session the first time it is seen (its start is committed before any of its calls)."""
        if session.id in self._sessions:
            return
        self._sessions[session.id] = session
        self.recorder.queue(
            event(
                "session_start",
                session_id=session.id,
                transport=session.transport,
                protocol_version=session.protocol_version,
                client_name=session.client_name,
                client_version=session.client_version,
                principal=session.principal or None,
                pid=os.getpid(),
            )
        )

    def end_session(self, session_id: str, reason: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self.engine.limiter.forget(session_id)
            self.recorder.queue(event("session_end", session_id=session_id, reason=reason))

    def end_all(self, reason: str) -> None:
        """At shutdown: every open session ends, and any call still without an outcome gets one."""
        for call, redaction in self._recorded.values():
            outcome = Outcome.failed(call, OutcomeKind.CANCELLED, reason)
            self.recorder.queue(self._outcome_event(call, outcome, 0.0, redaction))
        self._recorded.clear()
        for session_id in list(self._sessions):
            self.end_session(session_id, reason)

    # -- the call path -------------------------------------------------------------------------

    def observe(self, call: ToolCall, decision: Decision) -> None:
        """The policy stage's decision on a call, kept until it is recorded."""
        self._decisions[call.id] = decision

    async def outcomes(self, call: ToolCall, call_next: Handler) -> Outcome:
        """Outermost stage: record how the call ended (and its decision, if it never got that far)."""
        started = time.perf_counter()
        self._in_flight += 1
        try:
            outcome = await call_next(call)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE):
                reason = "cancelled before it completed (by the client, or the gateway shutting down)"
                await self._finish(call, Outcome.failed(call, OutcomeKind.CANCELLED, reason), started)
            raise
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE):
                failed = Outcome.failed(call, OutcomeKind.ERROR, "internal gateway error")
                await self._finish(call, failed, started)
            raise
        finally:
            self._in_flight -= 1
        return await self._finish(call, outcome, started)

    async def decisions(self, call: ToolCall, call_next: Handler) -> Outcome:
        """Just before forwarding: commit the decision, or refuse the call."""
        body, redaction = self._decision_event(call, call.decision or self._decisions.get(call.id))
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
        self.session(session)
        redaction = self.recorder.redactor.redact(arguments)
        reason = redaction.scrub(quarantine or f"unknown tool '{name}'", self.recorder.redactor)
        call_id = os.urandom(16).hex()
        common = {"session_id": session.id, "call_id": call_id, "tool": name}
        decision = event(
            "decision",
            **common,
            arguments=redaction.value,
            decision=Effect.DENY.value,
            rules=[],
            reason=reason,
            policy_revision=self.engine.policies.revision,
            masked=[item.to_record() for item in redaction.masked] or None,
            stage="quarantine" if quarantine else "unknown-tool",
        )
        outcome = event("outcome", **common, outcome=OutcomeKind.REFUSED.value, reason=reason, duration_ms=0.0)
        try:
            await self.recorder.record(decision, outcome)
        except AuditError as exc:
            logger.error("a call to unknown tool '%s' could not be recorded: %s", name, exc)
        _print_line(session.id, name, "deny", "", "refused", 0.0)

    async def _finish(self, call: ToolCall, outcome: Outcome, started: float) -> Outcome:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        events = []
        decision = self._decisions.pop(call.id, None)
        recorded = self._recorded.pop(call.id, None)
        if recorded is not None:
            redaction = recorded[1]
        else:
            # No policy decision: the tool's own input schema (checked first) refused the arguments.
            stage = "policy" if decision is not None else "input-schema"
            decision = decision or Decision(Effect.DENY, outcome.reason, self.engine.policies.revision)
            body, redaction = self._decision_event(call, decision, refusal=outcome, stage=stage)
            events.append(body)
        events.append(self._outcome_event(call, outcome, duration_ms, redaction))
        try:
            await self.recorder.record(*events, alone=self._in_flight == 0)
        except AuditError as exc:
            logger.error("the outcome of call %s to %s could not be recorded: %s", call.id, call.tool.name, exc)
            if outcome.kind in (OutcomeKind.OK, OutcomeKind.ERROR):
                reason = f"the call ran, but its outcome cannot be recorded in the audit log, so it is withheld ({exc})"
                outcome = Outcome.refused(call, reason)
        effect = decision.effect.value if decision is not None else "?"
        rules = ",".join(decision.rules) if decision is not None else ""
        if decision is not None and decision.would is not None:
            effect += f" (would {decision.would.value})"
        _print_line(call.session.id, call.tool.name, effect, rules, outcome.kind.value, duration_ms)
        return outcome

    # -- events --------------------------------------------------------------------------------

    def _call_fields(self, call: ToolCall) -> dict[str, Any]:
        return {
            "session_id": call.session.id,
            "call_id": call.id,
            "upstream": call.tool.upstream,
            "tool": call.tool.name,
        }

    def _decision_event(
        self, call: ToolCall, decision: Decision | None, *, refusal: Outcome | None = None, stage: str = "policy"
    ) -> tuple[dict[str, Any], Redaction]:
        if decision is None:  # cannot happen: the policy stage always decides before this stage runs
            decision = Decision(Effect.DENY, "no policy decision was made", self.engine.policies.revision)
        redactor = self.recorder.redactor
        paths = self.engine.rules_for(call.tool.name).mask
        redaction = redactor.redact(call.arguments, paths)
        fields: dict[str, Any] = {}
        masked = list(redaction.masked)
        if decision.arguments is not None:
            rewritten = redactor.redact(decision.arguments, paths)
            fields["rewritten_arguments"] = rewritten.value
            masked += rewritten.masked
        reason = refusal.reason if refusal is not None and refusal.reason else decision.reason
        fields["stage"] = stage
        if decision.effect is Effect.ASK:
            fields["approval"] = "granted" if refusal is None else "not granted"
        if decision.would is not None:
            fields["would"] = decision.would.value
        if decision.monitored:
            fields["monitored"] = list(decision.monitored)
        body = event(
            "decision",
            **self._call_fields(call),
            arguments=redaction.value,
            decision=decision.effect.value,
            rules=list(decision.rules),
            reason=redaction.scrub(reason, redactor),
            policy_revision=decision.revision,
            upstream_tool=call.tool.upstream_name,
            tool_digest=call.tool.source.digest,
            masked=[item.to_record() for item in masked] or None,
            **fields,
        )
        return body, redaction

    def _outcome_event(
        self, call: ToolCall, outcome: Outcome, duration_ms: float, redaction: Redaction
    ) -> dict[str, Any]:
        data = canonical(outcome.result).encode()  # what the agent received
        return event(
            "outcome",
            **self._call_fields(call),
            outcome=outcome.kind.value,
            rules=list(outcome.rules),
            reason=redaction.scrub(outcome.reason, self.recorder.redactor) or None,
            duration_ms=duration_ms,
            result_size=len(data),
            result_sha256=hashlib.sha256(data).hexdigest(),
        )

    # -- the gateway's own events --------------------------------------------------------------

    def catalog_changed(self, before: Mapping[str, ToolEntry], after: Mapping[str, ToolEntry]) -> None:
        """Tools added, removed or changed: name -> (upstream, definition digest, definition)."""
        for name in sorted(before.keys() | after.keys()):
            old, new = before.get(name), after.get(name)
            if old is not None and new is not None and old[1] == new[1]:
                continue
            change = "added" if old is None else "removed" if new is None else "changed"
            upstream, digest, definition = new if new is not None else old  # type: ignore[misc]
            self.recorder.queue(
                event(
                    "catalog",
                    upstream=upstream,
                    tool=name,
                    change=change,
                    tool_digest=digest,
                    previous_digest=old[1] if old is not None and new is not None else None,
                    definition=definition if new is not None else None,
                )
            )

    def policy_reloaded(self, revision: str, rules: int, files: list[str], trigger: str) -> None:
        self.recorder.queue(
            event(
                "policy_reload", outcome="ok", policy_revision=revision, rule_count=rules, files=files, reason=trigger
            )
        )

    def policy_reload_failed(self, trigger: str, error: str) -> None:
        self.recorder.queue(
            event(
                "policy_reload",
                outcome="error",
                policy_revision=self.engine.policies.revision,
                reason=f"{trigger}: {error}; the revision in force stays",
            )
        )

    def assessed(self, assessments: Sequence[Assessment]) -> None:
        """Definitions held back, released, or reported (warn mode, scan findings): one `pin` event per change."""
        seen: set[tuple[str, str, str]] = set()
        for assessment in assessments:
            item = assessment.item
            key = (item.upstream, str(item.kind), item.name)
            seen.add(key)
            state = "quarantined" if assessment.quarantined else "warned" if assessment.suspect else "clear"
            previous = self._pins.get(key)
            self._pins[key] = (item.digest, state)
            if previous == (item.digest, state):
                continue
            if state != "clear":
                change = state
            elif previous is not None and previous[1] != "clear":
                change = "released"
            elif assessment.findings:
                change = "findings"  # first seen, allowed, but the scan has something to say
            else:
                continue
            self.recorder.queue(
                event(
                    "pin",
                    upstream=item.upstream,
                    tool=item.label if item.kind == "tool" else None,
                    definition_kind=str(item.kind),
                    name=item.name,
                    change=change,
                    reason=str(assessment.verdict),
                    tool_digest=item.digest,
                    findings=[finding.to_record() for finding in assessment.findings] or None,
                )
            )
        for key in set(self._pins) - seen:
            del self._pins[key]

    def lock_reloaded(self, outcome: str, detail: str) -> None:
        self.recorder.queue(event("pin", change="lock_reload", outcome=outcome, reason=detail))

    def upstream_changed(self, name: str, up: bool, detail: str) -> None:
        self.recorder.queue(event("upstream", upstream=name, outcome="up" if up else "down", reason=detail))


def _print_line(session: str, tool: str, decision: str, rules: str, outcome: str, duration_ms: float) -> None:
    if monitor.isEnabledFor(logging.INFO):
        stamp = datetime.now().strftime("%H:%M:%S")
        rule = f" [{rules}]" if rules else ""
        took = f"{duration_ms / 1000:.2f}s" if duration_ms >= 1000 else f"{duration_ms:.1f}ms"
        monitor.info("%s %s %s %s%s -> %s %s", stamp, session[:8], tool, decision, rule, outcome, took)
