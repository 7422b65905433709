"""The audit log's vocabulary: each kind of event as it is recorded, arguments and reasons masked.

`event` builds any event's body; `decision_event` and `outcome_event` a call's pair (the pipeline's
audit stages, gateway/audit/stages.py, record them); `GatewayEvents` queues the gateway's other
events: sessions, the catalogue, policy reloads, pins, upstreams and their own requests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.audit.chain import canonical
from gateway.audit.recorder import AuditWriter
from gateway.audit.store import event
from gateway.calls import Decision, Effect, Outcome, SessionInfo, ToolCall
from gateway.catalog.pins import Assessment
from gateway.policy.engine import PolicyEngine
from gateway.policy.nesting import canonical_flat
from gateway.policy.redact import Redaction, Redactor

ToolEntry = tuple[str, str, Any]
"""An exposed tool as the catalogue events see it: upstream, definition digest, definition."""


def call_fields(call: ToolCall, redaction: Redaction, redactor: Redactor) -> dict[str, Any]:
    """Who called what. A resource's name holds its URI, which the agent chose: masked like its arguments."""
    name = call.tool.name if call.tool.kind == "tool" else redaction.scrub(call.tool.name, redactor)
    return {"session_id": call.session.id, "call_id": call.id, "upstream": call.tool.upstream, "tool": name}


def decided_for(session: SessionInfo) -> dict[str, Any]:
    """Who a decision was made for: the client as its request named it (what `clients` globs matched),
    and the principal with its attributes, when the transport authenticated one (what `principals` and
    `attributes` globs matched): `policy replay` decides again for them. Over HTTP, also the address the
    request came from (a stateless 2026-07-28 session spans requests from wherever its principal is)."""
    return {
        "client": session.client_name,
        "principal": session.principal or None,
        **_attributes(session),
        "address": session.address or None,
    }


def _attributes(session: SessionInfo) -> dict[str, Any]:
    return {"attributes": sorted(session.attributes) if session.principal else None}


_DECIDED_AS = {"completion": "completion/complete", "subscription": "resources/subscribe"}
"""Requests decided under the name of what they reach (a prompt, a resource), by the method they were."""


def decision_event(
    call: ToolCall,
    decision: Decision | None,
    recorder: AuditWriter,
    engine: PolicyEngine,
    *,
    refusal: Outcome | None = None,
    stage: str = "policy",
) -> tuple[dict[str, Any], Redaction]:
    """A call's `decision` event (what the person answered comes from `call.approval`), with the
    arguments' masking, which its outcome event reuses."""
    if decision is None:  # cannot happen: the policy stage always decides before this stage runs
        decision = Decision(Effect.DENY, "no policy decision was made", engine.policies.revision)
    redactor = recorder.redactor
    paths = engine.rules_for(call.tool.name).mask
    redaction = redactor.redact(call.arguments, paths)
    fields: dict[str, Any] = {}
    masked = list(redaction.masked)
    if decision.arguments is not None:
        rewritten = redactor.redact(decision.arguments, paths)
        fields["rewritten_arguments"] = rewritten.value
        masked += rewritten.masked
    reason = refusal.reason if refusal is not None and refusal.reason else decision.reason
    fields["stage"] = stage
    if call.tool.kind in _DECIDED_AS:
        fields["method"] = _DECIDED_AS[call.tool.kind]  # decided as the get or read it reaches: say what it was
    if decision.effect is Effect.ASK:
        # `approval` says whether the call went on past its approval; `approval_request` what the
        # person answered, and how they were asked (granted, then refused by a rate limit: both).
        fields["approval"] = "granted" if refusal is None else "not granted"
        if call.approval is not None:
            request = call.approval.to_record()
            request["reason"] = redaction.scrub(request["reason"], redactor)
            fields["approval_request"] = request
    if decision.would is not None:
        fields["would"] = decision.would.value
    if decision.monitored:
        fields["monitored"] = list(decision.monitored)
    upstream_tool = call.tool.upstream_name
    if call.tool.kind != "tool":
        upstream_tool = redaction.scrub(upstream_tool, redactor)
    body = event(
        "decision",
        **call_fields(call, redaction, redactor),
        arguments=redaction.value,
        decision=decision.effect.value,
        rules=list(decision.rules),
        reason=redaction.scrub(reason, redactor),
        policy_revision=decision.revision,
        upstream_tool=upstream_tool,
        tool_digest=call.tool.source.digest,
        masked=[item.to_record() for item in masked] or None,
        **decided_for(call.session),
        # The process that forwards the call: should it die, its calls are settled by its lease, never
        # by the session's (a stateless session's calls reach every replica).
        lease=recorder.lease_name,
        **fields,
    )
    return body, redaction


def outcome_event(
    call: ToolCall, outcome: Outcome, duration_ms: float, redaction: Redaction, recorder: AuditWriter
) -> dict[str, Any]:
    """A call's `outcome` event: how it ended, and a digest of what the agent received."""
    data = _stored(outcome.result).encode("utf-8", "surrogatepass")  # what the agent received, as stored
    return event(
        "outcome",
        **call_fields(call, redaction, recorder.redactor),
        principal=call.session.principal or None,
        outcome=outcome.kind.value,
        rules=list(outcome.rules),
        reason=redaction.scrub(outcome.reason, recorder.redactor) or None,
        duration_ms=duration_ms,
        result_size=len(data),
        result_sha256=hashlib.sha256(data).hexdigest(),
    )


def _stored(value: Any) -> str:
    """`value` in the log's canonical form, however deep it nests (a result may be too deep for `canonical`)."""
    try:
        return canonical(value)
    except RecursionError:
        return canonical_flat(value)


class GatewayEvents:
    """The gateway's own events, queued (the next commit takes them): sessions, catalogue, policy, pins,
    upstreams."""

    def __init__(self, recorder: AuditWriter, engine: PolicyEngine) -> None:
        self.recorder = recorder
        self.engine = engine
        self._pins: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        """(upstream, kind, name) -> (digest, state, why it is held) last recorded for each definition on offer."""

    def session_started(self, session: SessionInfo) -> None:
        self.recorder.queue(
            event(
                "session_start",
                session_id=session.id,
                transport=session.transport,
                protocol_version=session.protocol_version,
                client_name=session.client_name,
                client_version=session.client_version,
                principal=session.principal or None,
                **_attributes(session),
                address=session.address or None,
                pid=os.getpid(),
                lease=self.recorder.lease_name,
            )
        )

    def session_ended(self, session: SessionInfo, reason: str) -> None:
        self.recorder.queue(
            event("session_end", session_id=session.id, principal=session.principal or None, reason=reason)
        )
        self.recorder.anchor_soon()

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
            # Held for a new cause (its server changed again, say): recorded again, with the new reason.
            now = (item.digest, state, assessment.cause if state != "clear" else "")
            self._pins[key] = now
            if previous == now:
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
                    reason=assessment.cause,
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
            fields.update(session_id=call.session.id, call_id=call.id, tool=call.tool.name, **decided_for(call.session))
        self.recorder.queue(event("upstream_request", **fields))

    def upstream_changed(self, name: str, up: bool, detail: str) -> None:
        self.recorder.queue(event("upstream", upstream=name, outcome="up" if up else "down", reason=detail))
