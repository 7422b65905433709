"""The flow objects of one tool call: the `ToolCall` going in, the policy's `Decision`, the `Outcome`.

All are frozen; a stage that changes a call passes a modified copy (`dataclasses.replace`). A `Decision`
and an `Approval` are serialised through their versioned `to_record()`. Nothing here imports MCP at run
time, so the sans-IO policy engine can build `Decision`s without it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gateway.catalog.listing import ExposedTool

RECORD_VERSION = 1


class ProgressFn(Protocol):
    """Relays one progress notification to the agent."""

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None: ...


class LogFn(Protocol):
    """Relays one upstream log message (`notifications/message`) to the agent, at the agent's chosen level."""

    async def __call__(self, level: str, data: Any, logger: str | None) -> None: ...


class Effect(StrEnum):
    """What the policy does with a call. `deny` beats `ask` beats `rewrite`/`allow`."""

    ALLOW = "allow"
    REWRITE = "rewrite"
    ASK = "ask"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict on one call, with everything needed to explain and audit it."""

    effect: Effect
    reason: str
    revision: str
    """The policy revision that decided: a hash of every loaded policy file."""
    rules: tuple[str, ...] = ()
    """Every enforcing rule that matched (for a default decision: none)."""
    arguments: Mapping[str, Any] | None = None
    """The arguments to forward, when not those the agent sent: declared paths normalised, then `rewrite`
    rules applied; `None` when nothing changed."""
    would: Effect | None = None
    """What the decision would have been with `monitor` rules (or monitor mode) enforcing, when it differs."""
    monitored: tuple[str, ...] = ()
    """The `monitor` rules that matched: recorded, never enforced."""
    rated: tuple[str, ...] = ()
    """Rules with a rate limit that this call counts against once it goes ahead."""

    @property
    def proceeds(self) -> bool:
        return self.effect in (Effect.ALLOW, Effect.REWRITE)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "decision": self.effect.value,
            "rules": list(self.rules),
            "reason": self.reason,
            "policy_revision": self.revision,
        }
        if self.arguments is not None:
            record["rewritten_arguments"] = dict(self.arguments)
        if self.would is not None:
            record["would"] = self.would.value
        if self.monitored:
            record["monitored"] = list(self.monitored)
        return record


ATTRIBUTE_KINDS = ("scope:", "group:", "role:")
"""How every attribute of a principal begins: an access token's scopes and groups, a role given to it."""


@dataclass(frozen=True, slots=True)
class Who:
    """Who a policy decision is for: what the client says it is, who authenticated (if anyone) and with
    which attributes, and the session it comes from."""

    client: str = ""
    """The client's self-description (`clients` globs match it): never identity."""
    principal: str = ""
    """The authenticated principal (`principals` globs match it); empty when none authenticated."""
    attributes: frozenset[str] = frozenset()
    """The principal's attributes (`scope:NAME`, `group:NAME`, `role:NAME`: `attributes` globs match them)."""
    session: str = ""

    @property
    def counted_as(self) -> tuple[str, str]:
        """Whose budget a rate-limited call uses: the principal's, across its sessions, when one
        authenticated; else the session's."""
        return ("principal", self.principal) if self.principal else ("session", self.session)


ANONYMOUS = Who()
"""A caller no one authenticated, in no session, whose client says nothing of itself."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Who is calling: one downstream MCP connection (see the README for how sessions are told apart)."""

    id: str
    transport: str
    protocol_version: str
    client_name: str = ""
    client_version: str = ""
    principal: str = ""
    """Who authenticated the connection, when the transport knows (empty otherwise)."""
    attributes: frozenset[str] = frozenset()
    """The principal's attributes (`scope:NAME`, `group:NAME`, `role:NAME`) rules can match."""
    address: str = ""
    """The client's network address (HTTP: behind a trusted proxy, the one it forwards); empty on stdio."""

    @property
    def who(self) -> Who:
        """Who calls in this session, as the policy engine matches rules against it."""
        return Who(self.client_name, self.principal, self.attributes, self.id)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One `tools/call` the agent made, resolved to the upstream tool behind the exposed name."""

    session: SessionInfo
    tool: ExposedTool
    arguments: Mapping[str, Any]
    id: str = field(default_factory=lambda: os.urandom(16).hex())
    received: float = field(default_factory=time.time)
    progress: ProgressFn | None = field(default=None, compare=False, repr=False)
    """Relays the upstream's progress notifications to the agent; `None` when the agent sent no token."""
    log: LogFn | None = field(default=None, compare=False, repr=False)
    """Relays the upstream's log messages sent while the call is in flight; `None`: the agent takes none."""
    approver: Approver | None = field(default=None, compare=False, repr=False)
    """Asks a person to approve this call; `None` when the client cannot ask."""
    relay: Relay | None = field(default=None, compare=False, repr=False)
    """Passes the upstream's own requests (sampling, elicitation) to the agent's client; `None`: it cannot take them."""
    decision: Decision | None = None
    """The policy's decision, once the policy stage has made it."""
    approval: Approval | None = None
    """What came of asking a person, once the policy stage has asked (`ask` decisions only)."""

    @property
    def forwarded_arguments(self) -> Mapping[str, Any]:
        """The arguments the upstream receives: rewritten by policy, or as the agent sent them."""
        if self.decision is not None and self.decision.arguments is not None:
            return self.decision.arguments
        return self.arguments


class Answer(StrEnum):
    """What came of asking a person, as the audit log records it (whatever then became of the call)."""

    GRANTED = "granted"
    DECLINED = "declined"
    """Declined, dismissed, or the "Allow this call" box left unticked."""
    NO_ANSWER = "no answer"
    CANNOT_ASK = "could not ask"
    """The client cannot elicit, or failed to ask."""
    INVALID = "invalid"
    """A 2026-07-28 retry whose approval state is missing, forged, expired, for another call or used."""
    PENDING = "pending"
    """Asked by an `input_required` round trip: the answer comes with the client's retry, a call of its own."""


class Channel(StrEnum):
    """How the person was asked."""

    ELICITATION = "elicitation"
    """An elicitation request while the call waits (handshake-era connections)."""
    ROUND_TRIP = "input_required"
    """An `input_required` result and the client's retry (2026-07-28 connections)."""
    QUEUE = "queue"
    """The approval queue: `mcp-armor approvals`, or the console."""


@dataclass(frozen=True, slots=True)
class Approval:
    """A person's answer to "may this call go ahead?".

    `pending` carries an `input_required` result when the answer must come in a later round trip
    (2026-07-28 connections): the agent's client asks the person and retries the call with the answer.
    """

    answer: Answer
    reason: str = ""
    via: Channel | None = None
    """`None`: no channel reached a person."""
    pending: Mapping[str, Any] | None = None
    entry: str | None = None
    """The approval queue's id for this ask (`None`: it was not in the queue)."""
    by: str | None = None
    """Who decided: the OS user at `approvals`, the console's principal, or the agent's client."""
    through: str | None = None
    """Where they decided: `cli`, `console`, `elicitation`, `input_required`."""
    at: str | None = None
    """When they decided (ISO 8601, UTC)."""

    @property
    def granted(self) -> bool:
        return self.answer is Answer.GRANTED

    def to_record(self) -> dict[str, Any]:
        record = {"answer": self.answer.value, "via": self.via.value if self.via else None, "reason": self.reason}
        if self.entry is not None:
            record.update(entry=self.entry, by=self.by, through=self.through, at=self.at)
        return record


Approver = Callable[[ToolCall, Decision], Awaitable[Approval]]
Relay = Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]]
"""Sends a request (method, params) to the agent's client and returns its result in wire form; raises
`ProtocolError` when the client cannot or will not answer it."""


class OutcomeKind(StrEnum):
    OK = "ok"
    ERROR = "error"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INPUT_REQUIRED = "input_required"
    """The call waits for a person's approval that the client collects and sends with its retry."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, and the `CallToolResult` (wire form) the agent receives."""

    kind: OutcomeKind
    result: Mapping[str, Any]
    reason: str = ""
    rules: tuple[str, ...] = ()
    """Result rules that withheld or redacted what the upstream returned."""
    call: ToolCall | None = field(default=None, compare=False, repr=False)
    """The call as the policy stage left it (its decision, and the person's answer): the policy stage
    sets it on every outcome it returns, so the audit's outer stage learns what was decided; `None`
    for an outcome that never passed through the policy stage."""
    stage: str = ""
    """Which stage refused a call before the policy decided it (recorded with the refusal); "": the input schema."""

    @classmethod
    def completed(cls, result: Mapping[str, Any]) -> Outcome:
        """The upstream answered; its own `isError` decides between ok and error."""
        return cls(OutcomeKind.ERROR if result.get("isError") else OutcomeKind.OK, result)

    @classmethod
    def refused(cls, call: ToolCall, reason: str) -> Outcome:
        """The gateway refused the call; the text lets the model see why and correct itself."""
        text = f"Refused by the mcp-armor gateway: {reason} (call {call.id})"
        return cls(OutcomeKind.REFUSED, _error_result(text), reason)

    @classmethod
    def failed(cls, call: ToolCall, kind: OutcomeKind, reason: str) -> Outcome:
        """The call was forwarded (or meant to be) but did not complete."""
        text = f"The mcp-armor gateway could not complete the call to '{call.tool.name}': {reason} (call {call.id})"
        return cls(kind, _error_result(text), reason)

    @classmethod
    def withheld(cls, call: ToolCall, reason: str, rule: str) -> Outcome:
        """The upstream answered, but a result rule keeps the answer from the agent."""
        text = f"The mcp-armor gateway withheld the result of this call: {reason} (call {call.id})"
        return cls(OutcomeKind.REFUSED, _error_result(text), reason, (rule,))

    @classmethod
    def input_required(cls, pending: Mapping[str, Any]) -> Outcome:
        return cls(OutcomeKind.INPUT_REQUIRED, pending, "waiting for a person's approval")


def _error_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


Handler = Callable[[ToolCall], Awaitable[Outcome]]
"""The rest of the pipeline, as a stage sees it: hand it the call, get the outcome."""


_DECIDED = "_mcp_armor_decided"
"""The attribute of an exception under which `mark_decided` keeps the decided calls it left, by call id."""


def mark_decided(error: BaseException, call: ToolCall) -> None:
    """Note on `error`, as it leaves the policy stage, the call as decided (and asked): the audit's outer
    stage records that one. The exception itself goes on unchanged, so a cancel scope still knows its
    own cancellation and a fault keeps its context; keyed by call, since one exception object can end
    several calls (a closed channel's)."""
    decided = getattr(error, _DECIDED, None)
    if not isinstance(decided, dict):
        decided = {}
        setattr(error, _DECIDED, decided)
    decided[call.id] = call


def decided_call(error: BaseException, call_id: str) -> ToolCall | None:
    """The call `call_id` as the policy stage had decided it when `error` left it; `None` if it had not."""
    decided = getattr(error, _DECIDED, None)
    found = decided.get(call_id) if isinstance(decided, dict) else None
    return found if isinstance(found, ToolCall) else None
