"""Asking a person through the approval queue, alone or side by side with the agent's own client.

A call a rule sends to `ask` is entered in the queue (`gateway.audit.approvals`), announced (a webhook
notice, if configured), and waits for a decision made with `mcp-armor approvals` or in the console. When
the client can elicit too, both are asked at once: whichever decides first wins (the client's answer is
entered in the queue the same way, so the queue's row says who won), and the other is withdrawn. The
call waits at most `ask_timeout`, with a progress notification every few seconds when its caller gave a
progress token (so a client keeps waiting), and its row is closed as expired or withdrawn when it ends
undecided. An approval goes ahead only for the call it was given for (its binding), once (`spend`), and
only under the policy revision that asked: a reload in between voids it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from gateway.audit.approvals import POLL, AskedCall, Entry, Queue, Status
from gateway.audit.store import iso_utc
from gateway.calls import Answer, Approval, Channel, Decision, ProgressFn, ToolCall
from gateway.core.approvals import ApprovalDesk, replace_decision
from gateway.errors import ApprovalsError, format_seconds

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

PROGRESS_EVERY = 5.0
"""Seconds between the progress notifications a waiting call sends its caller (when it gave a token)."""

Shown = Callable[[ToolCall, Decision], AskedCall]
"""What the queue shows a person of a call (masked as the audit log masks it)."""
Notify = Callable[[Entry], None]
"""Announces a waiting approval; must not block (a notice is sent in the background)."""
ClientAsk = Callable[[], Awaitable[Approval]]
"""Asks the person through the agent's client; what they answered."""


@dataclass(frozen=True, slots=True)
class QueueAsker:
    """The approval queue as a way of asking a person, for one gateway process."""

    queue: Queue
    desk: ApprovalDesk
    shown: Shown
    revision: Callable[[], str]
    """The policy revision in force now."""
    notify: Notify | None = None
    most: int | None = None
    """Approvals one session may have waiting at once (`[gateway] max_calls_per_session`): a 2026-07-28
    call asks and returns at once, so no limit on calls in flight bounds how many it leaves in the queue."""

    async def enter(self, call: ToolCall, decision: Decision) -> Entry | None:
        """Enter `call` in the queue, and announce it; `None` (logged) when the queue cannot be written."""
        try:
            binding = self.desk.binding(replace_decision(call, decision))
            shown = self.shown(call, decision)
            entry = await anyio.to_thread.run_sync(
                lambda: self.queue.ask(shown, binding, self.desk.ttl, most=self.most)
            )
        except ApprovalsError as exc:
            logger.error("%s", exc)
            return None
        if self.notify is not None:
            self.notify(entry)
        return entry

    async def ask(self, call: ToolCall, decision: Decision, client: ClientAsk | None = None) -> Approval:
        """Enter `call` in the queue and wait for the first decision, from the queue or from `client`."""
        entry = await self.enter(call, decision)
        unavailable = "the approval queue is unavailable (see the gateway's log)"
        if self.queue.remote:  # one line naming the store (without its password)
            unavailable = f"the approval queue in {self.queue.where} is unavailable (see the gateway's log)"
        if entry is None:
            if client is not None:  # the queue is unavailable; the client can still ask
                return await client()
            return Approval(Answer.CANNOT_ASK, unavailable, Channel.QUEUE)
        left = entry.expires - self.queue.now()
        try:
            with anyio.move_on_after(left) as waited:
                final = await self._first_decision(entry, call, client)
        except BaseException:  # the call was cancelled (its client, or the gateway stopping): withdrawn
            with anyio.CancelScope(shield=True):
                await self._close_undecided(entry, expired=False)
            raise
        if waited.cancelled_caught:
            await self._close_undecided(entry, expired=True)
            no_answer = f"no answer within {format_seconds(self.desk.ttl)}"
            return Approval(Answer.NO_ANSWER, no_answer, Channel.QUEUE, entry=entry.id)
        if final is None:  # the queue failed while the call waited (logged): refused, its row closed if it can be
            await self._close_undecided(entry, expired=False)
            return Approval(Answer.CANNOT_ASK, unavailable, Channel.QUEUE, entry=entry.id)
        return await self._release(final, entry.binding, decision)

    async def settle(self, entry_id: str, approval: Approval, call: ToolCall, decision: Decision) -> Approval:
        """A 2026-07-28 retry's answer to a call also waiting in the queue: entered as the decision if none
        was made there first; whichever decision came first is what the call gets."""
        binding = self.desk.binding(replace_decision(call, decision))
        try:
            entry = await anyio.to_thread.run_sync(self._settled, entry_id, approval, call)
        except ApprovalsError as exc:
            return Approval(Answer.INVALID, str(exc), Channel.ROUND_TRIP)
        return await self._release(entry, binding, decision)

    def _settled(self, entry_id: str, approval: Approval, call: ToolCall) -> Entry:
        """The row after entering the client's answer (or as the queue decided it first)."""
        try:
            return self.queue.decide(
                entry_id,
                approve=approval.granted,
                by=_client_of(call),
                channel=(approval.via or Channel.ELICITATION).value,
                note=approval.reason,
            )
        except ApprovalsError:
            entry = self.queue.get(entry_id)
            if entry is None or entry.status is Status.PENDING:
                raise
            return entry

    async def _first_decision(self, entry: Entry, call: ToolCall, client: ClientAsk | None) -> Entry | None:
        """The row once decided, by the queue or by the client's answer (entered as a decision); `None`
        (logged) when the queue can no longer be read (an answer could not be entered there either)."""
        result: list[Entry | None] = []
        async with anyio.create_task_group() as tg:

            async def from_queue() -> None:
                try:
                    result.append(await self._wait(entry, call.progress))
                except ApprovalsError as exc:
                    logger.error("%s", exc)
                    result.append(None)
                tg.cancel_scope.cancel()

            async def from_client(ask: ClientAsk) -> None:
                approval = await ask()
                if approval.answer not in (Answer.GRANTED, Answer.DECLINED):
                    return  # the client could not ask, or had no answer: the queue still can
                try:
                    settled = await anyio.to_thread.run_sync(self._settled, entry.id, approval, call)
                except ApprovalsError:
                    return  # expired meanwhile: the waiter sees it
                result.append(settled)
                tg.cancel_scope.cancel()

            tg.start_soon(from_queue)
            if client is not None:
                tg.start_soon(from_client, client)
        return result[0]

    async def _wait(self, entry: Entry, progress: ProgressFn | None) -> Entry:
        """Watch the row until it is decided (a look every `POLL` seconds costs one `PRAGMA`, or with a
        shared store one row read, made in a worker thread)."""
        started = time.monotonic()
        next_progress = started + PROGRESS_EVERY
        version = -1
        while True:
            now = await self._look(self.queue.version)
            if now != version:
                version = now
                current = await self._look(lambda: self.queue.get(entry.id))
                if current is None:
                    raise ApprovalsError(f"approval {entry.id} vanished from the queue")
                if current.status is not Status.PENDING:
                    return current
            if progress is not None and time.monotonic() >= next_progress:
                next_progress += PROGRESS_EVERY
                waited = time.monotonic() - started
                left = format_seconds(max(0.0, entry.expires - self.queue.now()))
                message = f"waiting for a person's approval ({entry.id}; {left} left)"
                await progress(round(waited, 1), self.desk.ttl, message)
            await anyio.sleep(POLL)

    async def _look(self, read: Callable[[], _T]) -> _T:
        """A read of the queue: at once from its file, in a worker thread from a shared store's server."""
        return await anyio.to_thread.run_sync(read) if self.queue.remote else read()

    async def _release(self, entry: Entry, binding: str, decision: Decision) -> Approval:
        """What the decided row means for the call: granted only once, for this call, under its revision."""
        client_channels = {Channel.ELICITATION.value: Channel.ELICITATION, Channel.ROUND_TRIP.value: Channel.ROUND_TRIP}
        via = client_channels.get(entry.channel or "", Channel.QUEUE)
        decided = entry.decided_at
        at = None if decided is None else iso_utc(datetime.fromtimestamp(decided, UTC))
        by, through = entry.decided_by, entry.channel

        def approval(answer: Answer, reason: str) -> Approval:
            return Approval(answer, reason, via, entry=entry.id, by=by, through=through, at=at)

        if entry.status is Status.DENIED:
            if via is not Channel.QUEUE:  # the agent's client answered: its own words
                return approval(Answer.DECLINED, entry.note or "the person declined it")
            said = f": {entry.note}" if entry.note else ""
            return approval(Answer.DECLINED, f"denied by {entry.decided_by} ({entry.channel}){said}")
        if entry.status is not Status.APPROVED:
            return approval(Answer.INVALID, f"approval {entry.id} is {entry.status.value}")
        if self.revision() != decision.revision:
            note = "the policy was reloaded while the call waited; call again to ask under the new policy"
            await anyio.to_thread.run_sync(
                lambda: self.queue.close_out(entry.id, Status.VOID, note, only=Status.APPROVED)
            )
            return approval(Answer.INVALID, note)
        spent = await anyio.to_thread.run_sync(self.queue.spend, entry.id, binding)
        if not spent:
            unfit = f"approval {entry.id} was already used or does not fit this call"
            return approval(Answer.INVALID, unfit)
        if via is not Channel.QUEUE:
            return approval(Answer.GRANTED, entry.note or "approved by a person")
        return approval(Answer.GRANTED, f"approved by {entry.decided_by} ({entry.channel})")

    async def _close_undecided(self, entry: Entry, expired: bool) -> None:
        """The call ended undecided (its time ran out, or it was cancelled): close its row so nobody decides it."""
        status = Status.EXPIRED if expired else Status.WITHDRAWN
        note = (
            f"no decision within {format_seconds(self.desk.ttl)}"
            if expired
            else "the call ended before anyone decided (cancelled, or the gateway shut down)"
        )
        late = "approved after the call had ended undecided; it did not go ahead"
        try:
            with anyio.move_on_after(5):
                if not await anyio.to_thread.run_sync(lambda: self.queue.close_out(entry.id, status, note)):
                    # Decided in the instant the call ended: an approval nobody will spend must not read as live.
                    await anyio.to_thread.run_sync(
                        lambda: self.queue.close_out(entry.id, Status.VOID, late, only=Status.APPROVED)
                    )
        except ApprovalsError as exc:
            logger.error("%s", exc)


def _client_of(call: ToolCall) -> str:
    """Who answered through the agent's client: its principal, else the client's name."""
    session = call.session
    return session.principal or f"{session.client_name} (the agent's client)"


def masked_call(
    call: ToolCall,
    decision: Decision,
    mask: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    paths: tuple[str, ...],
    scrub: Callable[[str], str] = str,
) -> AskedCall:
    """What the queue shows of `call`: its arguments (and the rewritten ones) through `mask`, its reason
    through `scrub` (free text that may quote an argument)."""
    decided = replace_decision(call, decision)
    session = call.session
    rewritten = decision.arguments is not None
    return AskedCall(
        call_id=call.id,
        session=session.id,
        client=f"{session.client_name} {session.client_version}".strip(),
        principal=session.principal,
        tool=call.tool.name,
        upstream=call.tool.upstream,
        upstream_tool=call.tool.upstream_name,
        arguments=mask(decided.forwarded_arguments),
        rules=tuple(decision.rules),
        reason=scrub(decision.reason),
        revision=decision.revision,
        sent_arguments=mask(call.arguments) if rewritten else None,
        paths=paths,
    )
