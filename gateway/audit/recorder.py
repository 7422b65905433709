"""The audit recorder: events built, secrets masked, made durable, and group-committed to the audit log.

With `audit_sync = "normal"` and a log on disk, a call that is alone (one at a time) makes its
events durable by writing them to this process's journal (gateway/audit/journal.py: one `write`, no
commit) and goes on at once; journaled events are moved into the hash chain a few milliseconds
later, many per commit. Otherwise (calls in flight together, `"full"`, a log in memory, or a log
that is failing) callers wait until their events are committed: a commit takes everything pending
so far (group commit), on the event loop right after the callers already running have queued theirs
(`"normal"`), or in the writer task, which takes over whenever that cannot work: with `"full"` (an
fsync per commit) or while another process holds the write lock, it commits in a worker thread.

`CallAudit` plugs the recorder into the call path as two pipeline stages: `decisions` records the
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

from gateway.audit.journal import ROTATE_BYTES, Journal, journal_directory, recover, report_recovered
from gateway.audit.store import FIELDS, AuditStore, Mark, canonical, is_locked, now_iso
from gateway.calls import Approval, Decision, Effect, Handler, Outcome, OutcomeKind, SessionInfo, ToolCall
from gateway.catalog.pins import Assessment
from gateway.config.models import IN_MEMORY
from gateway.errors import AuditError
from gateway.policy.engine import PolicyEngine
from gateway.policy.redact import Redaction, Redactor

logger = logging.getLogger(__name__)
monitor = logging.getLogger("gateway.monitor")
"""One line per decided call (`mcp-armor serve` prints it to stderr unless `--quiet`)."""

CHECKPOINT_EVERY = 2000
"""Events between WAL checkpoints (run in a worker thread, never on the event loop)."""
DRAIN_DELAY = 0.02
"""How long journaled events wait to be moved into the chain, so that one commit takes many."""
DRAIN_BATCH = 256
"""Journaled events that are moved at once, without waiting for the delay."""
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
    """The single writer of one audit log (and of this process's journal in front of it)."""

    def __init__(self, path: Path, *, sync: str = "normal") -> None:
        self.path = path
        self.sync = sync
        self.redactor = Redactor(os.urandom(32))
        self.failure: str | None = None
        """Why the log cannot be written right now (`None` while it can)."""
        self._store: AuditStore | None = None
        self._journal: Journal | None = None
        """Where events become durable at once (`audit_sync = "normal"`, a log on disk, and it could be made)."""
        self._queue: list[str] = []
        """Events to commit that are not in the journal (no journal, or the log is failing), after its own."""
        self._tickets: list[_Ticket] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._commit_due = False
        self._drain: asyncio.TimerHandle | None = None
        """The journal's next move into the chain, when one is scheduled."""
        self._writing = False
        """The writer task is committing (maybe in a worker thread): nobody else may touch the store."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._since_checkpoint = 0
        self._checkpointing = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Recorder]:
        """Open the log and run the writer; on exit, commit everything still pending and close."""
        if self._open() is None:
            logger.error("%s; every tool call will be refused until it can be written", self.failure)
        else:
            self._start_journal()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._write_loop, tg)
            try:
                yield self
            finally:
                self._closing = True
                self._wake.set()
        self._close_journal()
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

    def _start_journal(self) -> None:
        """Replay the journals of gone processes into the chain, then start this process's own."""
        if self.sync != "normal" or str(self.path) == IN_MEMORY or self._store is None:
            return
        directory = journal_directory(self.path)
        try:
            moved = recover(self._store, directory)
            self._journal = Journal.create(directory)
        except (OSError, sqlite3.Error) as exc:
            logger.warning("%s: no audit journal (%s); each call waits for its events' commit", directory, exc)
            return
        report_recovered(self.path, moved)

    def _close_journal(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        journal, self._journal = self._journal, None
        if journal is None:
            return
        if journal.pending:
            logger.error(
                "%s: %d events could not be moved into the audit log; the next gateway to open it does that",
                journal.path,
                len(journal.pending),
            )
            journal.close(remove=False)
            return
        journal.close(remove=True)
        self._forget(journal)

    def _forget(self, journal: Journal) -> None:
        if self._store is not None:
            try:
                self._store.forget_journal(journal.name)
            except sqlite3.Error as exc:  # a stale row names a file that is gone: harmless
                logger.debug("could not forget journal %s: %s", journal.name, exc)

    def queue(self, *bodies: Mapping[str, Any]) -> None:
        """Queue events without waiting for their commit (order is kept with everything else queued): the
        next commit takes them, the writer task's or a caller's."""
        texts = [canonical(body) for body in bodies]
        if self._journal is not None:
            try:
                self._journal.write(texts)
            except OSError as exc:
                logger.error("%s: cannot write the audit journal (%s); the events wait in memory", self.path, exc)
            else:
                self._drain_later()
                return
        self._queue.extend(texts)
        self._wake.set()

    async def record(self, *bodies: Mapping[str, Any], alone: bool = False) -> None:
        """Record events before the caller goes on; `AuditError` when they could not be.

        A caller that knows nobody else is about to record (`alone`: one call at a time) writes its
        events to the journal, where they are durable at once; the chain takes them a little later.
        Otherwise (or without a journal) the caller waits for the commit: with `audit_sync = "normal"`
        it runs on the event loop once the callers already running have had their turn, taking
        everything they queued (for a burst of calls one commit costs less than a journal write each;
        an `alone` caller without a journal commits at once); with `"full"` the writer task commits.
        While the log cannot be written, nothing goes to the journal and every caller waits for a
        commit (and is told it failed): a call is never made on the strength of a log that is failing.
        """
        if self._closing:
            raise AuditError(f"{self.path}: the audit log is closed (the gateway is shutting down)")
        texts = [canonical(body) for body in bodies]
        if alone and self._journal is not None and self.failure is None:
            try:
                self._journal.write(texts)
            except OSError as exc:
                raise AuditError(f"{self.path}: cannot write the audit journal: {exc}") from None
            self._drain_later()
            return
        ticket = _Ticket()
        self._tickets.append(ticket)
        self._queue.extend(texts)
        if self.sync != "normal" or self._writing or self._store is None:
            self._wake.set()
        elif alone:
            self._commit_here()  # settles the ticket, or hands everything to the writer task
        else:
            self._commit_soon()
        await ticket.done.wait()
        if ticket.error is not None:
            raise AuditError(ticket.error)

    def _drain_later(self) -> None:
        """Move the journal into the chain a little later, with whatever else is journaled meanwhile."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().call_later(DRAIN_DELAY, self._commit_here)
        elif self._journal is not None and len(self._journal.pending) >= DRAIN_BATCH:
            self._commit_soon()

    def _commit_soon(self) -> None:
        """Commit on the event loop once everything ready to run has run (queuing its events too)."""
        if not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._commit_here)

    def _pending(self) -> bool:
        return bool(self._queue or (self._journal is not None and self._journal.pending))

    def _take(self) -> _Batch:
        journaled, mark = self._journal.take() if self._journal is not None else ([], None)
        batch = _Batch(journaled, self._queue, mark, self._tickets)
        self._queue, self._tickets = [], []
        return batch

    def _commit_here(self) -> None:
        """Commit what is pending, on the event loop; anything but success goes to the writer task."""
        self._commit_due = False
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        if self._writing:
            self._wake.set()  # the writer task takes what is pending once its commit is done
            return
        if self._store is None or not self._pending():
            return
        batch = self._take()
        try:
            self._store.append(batch.bodies, journal=batch.mark)
        except sqlite3.Error as exc:  # the write lock is taken, or worse: the writer task waits, or reports it
            logger.debug("audit commit on the event loop failed, handing over to the writer: %s", exc)
            if self._journal is not None:
                self._journal.put_back(batch.journaled)
            self._queue[:0] = batch.queued
            self._tickets[:0] = batch.tickets
            self._wake.set()
            return
        self.failure = None
        batch.settle(None)
        self._committed(len(batch.bodies))

    async def _write_loop(self, tg: anyio.abc.TaskGroup) -> None:
        self._tg = tg
        while True:
            if not self._closing:
                await self._wake.wait()
                self._wake = asyncio.Event()
            error = None
            if self._pending():
                batch = self._take()
                self._writing = True
                try:
                    with anyio.CancelScope(shield=True):
                        error = await self._commit(batch.bodies, batch.mark)
                finally:
                    self._writing = False
                if error is None:
                    self._committed(len(batch.bodies))
                elif self._journal is not None:
                    self._journal.put_back(batch.journaled)  # durable already: they wait for the log to recover
                batch.settle(error)
            if self._closing and (error is not None or not self._pending()):
                return

    async def _commit(self, bodies: list[str], mark: Mark | None) -> str | None:
        """Append one group; the reason when it could not be committed."""
        store = self._open()
        if store is None:
            return self.failure
        try:
            if self.sync == "normal":
                try:
                    store.append(bodies, journal=mark)  # a WAL append: tens of microseconds, cheaper than a thread hop
                    return None
                except sqlite3.OperationalError as exc:
                    if not is_locked(exc):
                        raise
            await anyio.to_thread.run_sync(lambda: store.append_waiting(bodies, journal=mark))
        except sqlite3.Error as exc:
            self.failure = f"{self.path}: cannot write the audit log: {exc}"
            logger.error("%s", self.failure)
            return self.failure
        self.failure = None
        return None

    def _committed(self, count: int) -> None:
        journal = self._journal
        if journal is not None and not journal.pending and journal.size >= ROTATE_BYTES:
            self._rotate(journal)
        self._since_checkpoint += count
        if self._since_checkpoint >= CHECKPOINT_EVERY and not self._checkpointing and str(self.path) != IN_MEMORY:
            self._since_checkpoint = 0
            if self._tg is not None:
                self._checkpointing = True
                self._tg.start_soon(self._checkpoint)

    def _rotate(self, journal: Journal) -> None:
        """Everything in the journal is in the chain: start a fresh one instead of growing it."""
        try:
            self._journal = Journal.create(journal.path.parent)
        except OSError as exc:
            logger.warning("%s: cannot start a new audit journal, this one keeps growing: %s", journal.path, exc)
            return
        journal.close(remove=True)
        self._forget(journal)

    async def _checkpoint(self) -> None:
        try:
            await anyio.to_thread.run_sync(_checkpoint, self.path)
        except sqlite3.Error as exc:
            logger.warning("audit log checkpoint failed (the WAL file keeps growing until one succeeds): %s", exc)
        finally:
            self._checkpointing = False


class _Batch:
    """What one commit takes: journaled events first, then the others, and the callers waiting on it."""

    __slots__ = ("bodies", "journaled", "mark", "queued", "tickets")

    def __init__(self, journaled: list[str], queued: list[str], mark: Mark | None, tickets: list[_Ticket]) -> None:
        self.journaled = journaled
        self.queued = queued
        self.bodies = journaled + queued
        self.mark = mark
        self.tickets = tickets

    def settle(self, error: str | None) -> None:
        for ticket in self.tickets:
            ticket.error = error
            ticket.done.set()


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
        self._answers: dict[str, Approval] = {}
        """What came of asking a person about a call, by call id, until the call's outcome is recorded."""
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

    def answered(self, call: ToolCall, approval: Approval) -> None:
        """What came of asking a person about a call, kept until its decision is recorded."""
        self._answers[call.id] = approval

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
        decision = call.decision or self._decisions.get(call.id)
        body, redaction = self._decision_event(call, decision, approval=self._answers.get(call.id))
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

    async def unresolved(
        self,
        session: SessionInfo,
        name: str,
        arguments: Mapping[str, Any],
        *,
        stage: str,
        reason: str,
        outcome: OutcomeKind,
    ) -> None:
        """A call that ended before it was resolved to a tool the pipeline could take (`stage` says where):
        no policy decided it, and it was not forwarded; recorded as denied there, with its outcome."""
        self.session(session)
        redaction = self.recorder.redactor.redact(arguments)
        reason = redaction.scrub(reason, self.recorder.redactor)
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
            stage=stage,
        )
        ended = event("outcome", **common, outcome=outcome.value, reason=reason, duration_ms=0.0)
        try:
            await self.recorder.record(decision, ended)
        except AuditError as exc:
            logger.error("a call to '%s' (%s) could not be recorded: %s", name, stage, exc)
        _print_line(session.id, name, "deny", "", outcome.value, 0.0)

    async def _finish(self, call: ToolCall, outcome: Outcome, started: float) -> Outcome:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        events = []
        decision = self._decisions.pop(call.id, None)
        recorded = self._recorded.pop(call.id, None)
        approval = self._answers.pop(call.id, None)
        if recorded is not None:
            redaction = recorded[1]
        else:
            # No policy decision: the tool's own input schema (checked first) refused the arguments.
            stage = "policy" if decision is not None else "input-schema"
            decision = decision or Decision(Effect.DENY, outcome.reason, self.engine.policies.revision)
            body, redaction = self._decision_event(call, decision, refusal=outcome, stage=stage, approval=approval)
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
        self,
        call: ToolCall,
        decision: Decision | None,
        *,
        refusal: Outcome | None = None,
        stage: str = "policy",
        approval: Approval | None = None,
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
            # `approval` says whether the call went on past its approval; `approval_request` what the
            # person answered, and how they were asked (granted, then refused by a rate limit: both).
            fields["approval"] = "granted" if refusal is None else "not granted"
            if approval is not None:
                request = approval.to_record()
                request["reason"] = redaction.scrub(request["reason"], redactor)
                fields["approval_request"] = request
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
        data = canonical(outcome.result).encode("utf-8", "surrogatepass")  # what the agent received, as stored
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

    def relayed(self, upstream: str, method: str, call: ToolCall | None, outcome: str, detail: str | None) -> None:
        """An upstream's own request (sampling, elicitation): passed to the agent's client, refused, or
        withdrawn before the client answered."""
        reason = method if detail is None else f"{method}: {detail}"
        fields: dict[str, Any] = {"upstream": upstream, "reason": reason, "outcome": outcome}
        if call is not None:
            fields.update(session_id=call.session.id, call_id=call.id, tool=call.tool.name)
        self.recorder.queue(event("upstream_request", **fields))

    def upstream_changed(self, name: str, up: bool, detail: str) -> None:
        self.recorder.queue(event("upstream", upstream=name, outcome="up" if up else "down", reason=detail))


def _print_line(session: str, tool: str, decision: str, rules: str, outcome: str, duration_ms: float) -> None:
    """The call's line on the monitor, written once the loop has sent the agent its answer (not before)."""
    if monitor.isEnabledFor(logging.INFO):
        stamp = datetime.now().strftime("%H:%M:%S")
        rule = f" [{rules}]" if rules else ""
        took = f"{duration_ms / 1000:.2f}s" if duration_ms >= 1000 else f"{duration_ms:.1f}ms"
        line = f"{stamp} {session[:8]} {tool} {decision}{rule} -> {outcome} {took}"
        asyncio.get_running_loop().call_soon(monitor.info, "%s", line)
