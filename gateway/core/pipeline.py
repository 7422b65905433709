"""The stages a tool call passes through, composed once at start-up.

A stage is `async (call, call_next) -> Outcome`; stages are listed outermost first and end in a
terminal handler that forwards the call upstream:

    audit outcomes -> check arguments (nesting; the upstream tool's own inputSchema) -> credentials
        -> enforce_policy -> audit decisions (committed, or the call is refused) -> forward

A call to an upstream served per principal runs on the calling principal's own connection; one whose
caller it has no values for is refused before anything is decided or asked (`Credentials`).

Every decision `enforce_policy` makes ends with the built-in rule over the gateway's own files
(`gateway.core.own_files`), which no policy, rewrite or approval can lift.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import mcp_types as types
from pydantic import BaseModel, ValidationError

from gateway.calls import (
    Answer,
    Approval,
    Decision,
    Effect,
    Handler,
    LogFn,
    Outcome,
    OutcomeKind,
    ProgressFn,
    ToolCall,
    mark_decided,
)
from gateway.core.own_files import GatewayFiles
from gateway.core.targets import candidate, completion_params
from gateway.errors import NoCredentials, UpstreamError, UpstreamTimeout, format_seconds
from gateway.policy.engine import PolicyEngine
from gateway.policy.nesting import MAX_NESTING, MAX_VALUES
from gateway.policy.redact import Redactor
from gateway.schema import past_limits
from gateway.upstream.pool import UpstreamPool
from gateway.wire.results import check_tool_result

logger = logging.getLogger(__name__)

ALLOW_ONLY = frozenset({"completion", "subscription"})
"""Kinds of call that only an `allow` lets through (see `EnforcePolicy._refusal`)."""

if TYPE_CHECKING:
    from gateway.audit.stages import CallAudit


class Stage(Protocol):
    """One step of the pipeline: it may pass the call on (`call_next`) or end it with an outcome."""

    def __call__(self, call: ToolCall, call_next: Handler) -> Awaitable[Outcome]: ...


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Wrap `terminal` in `stages`, the first stage outermost.

    Each stage is bound with `partial`, not a wrapping coroutine: a call then runs one coroutine
    frame per stage, and every resumption of the call passes through no others.
    """
    handler = terminal
    for stage in reversed(stages):
        handler = partial(stage, call_next=handler)
    return handler


class CheckArguments:
    """Refuse arguments nested deeper than `MAX_NESTING` levels, or holding more than `MAX_VALUES`
    values (both measured without recursion, and no further than the limit, before
    anything walks them), and arguments that the upstream tool's own inputSchema rejects; they never
    reach it. A refusal quotes the arguments masked as the audit log stores them."""

    def __init__(self, engine: PolicyEngine, redactor: Callable[[], Redactor]) -> None:
        self.engine = engine
        self._redactor = redactor

    async def __call__(self, call: ToolCall, call_next: Handler) -> Outcome:
        passed = past_limits(call.arguments, values=MAX_VALUES, depth=MAX_NESTING)  # one walk for both limits
        if passed == "values":
            reason = (
                f"the arguments of '{call.tool.name}' hold more than {MAX_VALUES} values (objects, arrays and "
                "their members), the most the gateway accepts"
            )
            return Outcome.refused(call, reason)
        if passed == "depth":
            reason = (
                f"the arguments of '{call.tool.name}' nest deeper than {MAX_NESTING} levels of objects and arrays, "
                "the most the gateway accepts"
            )
            return Outcome.refused(call, reason)
        redactor, paths = self._redactor(), self.engine.rules_for(call.tool.name).mask
        violation = call.tool.source.violation(call.arguments, partial(redactor.mask_at, paths=paths))
        if violation is not None:
            return Outcome.refused(call, f"arguments do not match the tool's input schema: {violation}")
        return await call_next(call)


class Credentials:
    """Refuse a call to an upstream served per principal that has no values for its caller (unauthenticated,
    or a principal without a table): it would otherwise run with another's authority, or none."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def __call__(self, call: ToolCall, call_next: Handler) -> Outcome:
        served = self._pool.upstreams.get(call.tool.upstream)
        refusal = served.spec.refusal(call.session.principal) if served is not None else None
        if refusal is not None:
            return replace(Outcome.refused(call, refusal), stage="credentials")
        return await call_next(call)


ASK_GRACE = 5.0
"""How long past `ask_timeout` the policy stage waits for an approver that has not kept its own time."""


class EnforcePolicy:
    """Decide the call under the current policies; refuse, ask a person, rewrite, or let it through.

    After the upstream has answered, the result rules screen what goes back to the agent. The decision,
    and what came of asking a person, ride on the call (`ToolCall.decision`, `ToolCall.approval`): it
    goes on with them, and every outcome returned carries it (`Outcome.call`), as does any exception
    leaving after the decision (`mark_decided`), so the audit records them however the call ends.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        *,
        ask_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        own_files: GatewayFiles | None = None,
    ) -> None:
        self.engine = engine
        self.ask_timeout = ask_timeout
        self._clock = clock
        self.own_files = own_files
        """The built-in rule over the gateway's own files, applied after every decision (`None`: not applied)."""

    def decide(self, call: ToolCall, name: str, arguments: Mapping[str, Any]) -> Decision:
        """The policy's decision on `call` reaching `name` with `arguments`, then the built-in rule's."""
        decision = self.engine.evaluate(name, arguments, now=self._clock(), who=call.session.who)
        if self.own_files is None:
            return decision
        declared = self.engine.policies.paths.declared(name)
        return self.own_files.decide(decision, call.tool.upstream, arguments, declared)

    async def __call__(self, call: ToolCall, call_next: Handler) -> Outcome:
        decision = self.decide(call, call.tool.name, call.arguments)
        call = replace(call, decision=decision)
        try:
            refusal = self._refusal(call, decision)
            if refusal is not None:
                return replace(refusal, call=call)
            if decision.effect is Effect.ASK:
                standing = await self.engine.before_asking(decision, call.session.who)
                if standing is not decision:  # shared counts: a rule at its limit (or noted, monitored)
                    decision, call = standing, replace(call, decision=standing)
                    if decision.effect is Effect.DENY:
                        return replace(Outcome.refused(call, decision.reason), call=call)
                call = replace(call, approval=await self._approval(call, decision))
            outcome = await self._proceed(call, decision, call_next)
        except BaseException as exc:
            mark_decided(exc, call)
            raise
        return replace(outcome, call=call) if outcome.call is None else outcome

    def _refusal(self, call: ToolCall, decision: Decision) -> Outcome | None:
        """The outcome of a call the decision itself refuses; `None` when it may go on."""
        if decision.effect is Effect.DENY:
            return Outcome.refused(call, decision.reason)
        if call.tool.kind in ALLOW_ONLY and decision.effect is not Effect.ALLOW:
            # Nobody is asked about a completion or a subscription, and their requests are never
            # rewritten: a person approves (and a rule rewrites) the get or the read itself.
            return Outcome.refused(call, f"{decision.reason}; only an allow lets a {call.tool.kind} go ahead")
        if decision.arguments is not None:
            violation = call.tool.source.violation(decision.arguments)
            if violation is not None:
                return Outcome.refused(
                    call,
                    f"{decision.reason}, but the rewritten arguments do not match the tool's input schema: {violation}",
                )
        return None

    async def _proceed(self, call: ToolCall, decision: Decision, call_next: Handler) -> Outcome:
        """After the person's answer (if asked): charge the rate limits, forward, screen the result."""
        session = call.session
        approval = call.approval
        if approval is not None:
            if approval.pending is not None:
                return Outcome.input_required(approval.pending)
            if not approval.granted:
                return Outcome.refused(call, f"{decision.reason}; {approval.reason}")
        charge = await self.engine.charge_call(decision, session.who, self._clock())
        if charge.refusal is not None:
            if approval is not None:
                reason = f"a rate limit of this call's rules was reached while it waited for approval: {charge.refusal}"
                return Outcome.refused(call, reason)
            # Only shared counts decide here (in memory, `evaluate` did): recorded as the deny it is.
            denied = replace(call, decision=self.engine.charged(decision, charge))
            return replace(Outcome.refused(call, charge.refusal), call=denied)
        if charge.would_deny:
            call = replace(call, decision=self.engine.charged(decision, charge))
        screened: list[str] = []
        if call.progress is not None:
            call = replace(call, progress=self._screened_progress(call, call.progress, screened))
        if call.log is not None:
            call = replace(call, log=self._screened_log(call, call.log, screened))
        outcome = await call_next(call)
        if outcome.kind is OutcomeKind.REFUSED:
            await self.engine.refund_call(charge)  # refused later on: the call did not happen
        elif outcome.kind in (OutcomeKind.OK, OutcomeKind.ERROR):
            try:
                screening = self.engine.screen_result(call.tool.name, outcome.result, session.who)
            except RecursionError:  # fail closed: a result too deep to screen is not passed on
                return Outcome.refused(call, "the upstream's result nests too deep to be screened, so it is withheld")
            if screening.withheld_by is not None:
                return Outcome.withheld(call, screening.reason, screening.withheld_by)
            result = screening.result
            if call.tool.kind == "completion":
                result = self._reachable_values(call, result)
            if screening.redacted_by or screened or result is not screening.result:
                rules = tuple(dict.fromkeys((*screened, *screening.redacted_by)))
                return replace(outcome, result=result, rules=rules)
        return outcome

    def _reachable_values(self, call: ToolCall, result: Mapping[str, Any]) -> Mapping[str, Any]:
        """A completion's values, each kept only when the get or read it would make could go ahead for
        this caller (a value the policy would refuse is not suggested: its name is data too)."""
        completion = result.get("completion")
        if not isinstance(completion, Mapping) or not isinstance(completion.get("values"), list):
            return result
        session, engine = call.session, self.engine
        kept: list[Any] = []
        for value in completion["values"]:
            name, arguments = candidate(call.tool, call.forwarded_arguments, str(value))
            if not engine.visible(name, session.who):
                continue
            decision = self.decide(call, name, arguments)
            if decision.effect is not Effect.DENY:
                kept.append(value)
        if len(kept) == len(completion["values"]):
            return result
        trimmed = {key: item for key, item in completion.items() if key not in ("total", "hasMore")}
        return {**result, "completion": {**trimmed, "values": kept}}

    def _screened_progress(self, call: ToolCall, relay_to: ProgressFn, screened: list[str]) -> ProgressFn:
        """`relay_to` with each message screened by the call's result rules, as a result of one text block:
        masked, or not relayed at all when a rule withholds it. The rules that acted join `screened`."""

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            if message is not None:
                result = self._screened_message(call, {"content": [{"type": "text", "text": message}]}, screened)
                if result is None:
                    return
                message = result["content"][0]["text"]
            await relay_to(progress, total, message)

        return relay

    def _screened_log(self, call: ToolCall, relay_to: LogFn, screened: list[str]) -> LogFn:
        """`relay_to` with each log message's data screened by the call's result rules like a progress
        message (a text as one text block; any other data as structured content)."""

        async def relay(level: str, data: Any, logger: str | None) -> None:
            text = isinstance(data, str)
            message = (
                {"content": [{"type": "text", "text": data}]} if text else {"content": [], "structuredContent": data}
            )
            result = self._screened_message(call, message, screened)
            if result is not None:
                await relay_to(level, result["content"][0]["text"] if text else result["structuredContent"], logger)

        return relay

    def _screened_message(
        self, call: ToolCall, message: Mapping[str, Any], screened: list[str]
    ) -> Mapping[str, Any] | None:
        """A message relayed while `call` runs, screened as a result of its own: masked, or `None` when a
        rule withholds it (or it cannot be screened: fail closed). The rules that acted join `screened`."""
        try:
            screening = self.engine.screen_result(call.tool.name, message, call.session.who)
        except Exception:
            logger.exception("a message relayed during call %s could not be screened; not relayed", call.id)
            return None
        for rule in (screening.withheld_by, *screening.redacted_by):
            if rule is not None and rule not in screened:
                screened.append(rule)
        return None if screening.withheld_by is not None else screening.result

    async def _approval(self, call: ToolCall, decision: Decision) -> Approval:
        if call.approver is None:
            return Approval(Answer.CANNOT_ASK, "this client cannot ask a person (it does not support elicitation)")
        # Each channel keeps its own time (and says which it was); this is the backstop.
        with anyio.move_on_after(self.ask_timeout + ASK_GRACE) as waited:
            approval = await call.approver(call, decision)
        if waited.cancelled_caught:
            return Approval(Answer.NO_ANSWER, f"no answer within {format_seconds(self.ask_timeout)}")
        return approval


class Forward:
    """The terminal handler: send the call to its upstream and check what comes back (the dispatcher
    shapes it for the caller, as it shapes every result)."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def __call__(self, call: ToolCall) -> Outcome:
        method, params = _request(call)
        upstream, principal = call.tool.upstream, call.session.principal
        try:
            session = await self._pool.session_for(upstream, principal)
            with self._pool.relaying(call), self._pool.in_use(upstream, principal):
                raw = await session.request(method, params, on_progress=call.progress)
                await self._pool.notices_passed(upstream, principal)
        except NoCredentials as exc:
            return Outcome.refused(call, str(exc))
        except UpstreamTimeout as exc:
            return Outcome.failed(call, OutcomeKind.TIMEOUT, str(exc))
        except UpstreamError as exc:
            return Outcome.failed(call, OutcomeKind.ERROR, str(exc))
        try:
            if call.tool.kind == "tool":
                result = check_tool_result(raw, call.session.protocol_version)
            else:
                result = (
                    _RESULTS[call.tool.kind]
                    .model_validate(raw, by_name=False)
                    .model_dump(by_alias=True, mode="json", exclude_none=True)
                )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            reason = f"upstream '{call.tool.upstream}' returned a malformed result ({where}: {first['msg']})"
            return Outcome.failed(call, OutcomeKind.ERROR, reason)
        except (ValueError, RecursionError) as exc:  # nested deeper than the result models can check
            reason = f"upstream '{call.tool.upstream}' returned a result that cannot be checked ({exc})"
            return Outcome.failed(call, OutcomeKind.ERROR, reason)
        return Outcome.completed(result)


_RESULTS: dict[str, type[BaseModel]] = {
    "resource": types.ReadResourceResult,
    "prompt": types.GetPromptResult,
    "subscription": types.EmptyResult,
    "completion": types.CompleteResult,
}
"""What a resource read and a prompt get must answer (a tool's result is checked for the caller's version)."""


def _request(call: ToolCall) -> tuple[str, dict[str, Any]]:
    """The request the upstream receives for `call`, with the arguments as policy left them."""
    if call.tool.kind == "resource":
        return "resources/read", {"uri": call.tool.upstream_name}
    if call.tool.kind == "subscription":
        return "resources/subscribe", {"uri": call.tool.upstream_name}
    if call.tool.kind == "completion":
        return "completion/complete", completion_params(call.forwarded_arguments, call.tool.source.definition)
    arguments = dict(call.forwarded_arguments)
    if call.tool.kind == "prompt":
        params: dict[str, Any] = {"name": call.tool.upstream_name}
        if arguments:
            params["arguments"] = arguments
        return "prompts/get", params
    return "tools/call", {"name": call.tool.upstream_name, "arguments": arguments}


def build_pipeline(pool: UpstreamPool, engine: PolicyEngine, audit: CallAudit, own_files: GatewayFiles) -> Handler:
    ask_timeout = pool.config.gateway.ask_timeout
    policy = EnforcePolicy(engine, ask_timeout=ask_timeout, own_files=own_files)
    check = CheckArguments(engine, lambda: audit.recorder.redactor)
    return compose([audit.outcomes, check, Credentials(pool), policy, audit.decisions], Forward(pool))
