"""Asking a person: what they are shown, and how an approval is bound to the exact call it approves.

An approval covers one call: its session, exposed tool, the policy revision that asked, and an
HMAC-SHA256 (under this process's key, or with a shared store the key every replica shares) of its
arguments as sent and as the upstream would receive them (after any rewrite); the person is shown that
digest with the arguments (`gateway.display`). On handshake-era connections the person answers an
elicitation while the call waits. On 2026-07-28 connections the call returns `input_required` with an
elicitation and a sealed `requestState` (HMAC-SHA256 under that key, with the authenticated principal it
was issued to, an expiry and a one-time nonce); the client retries with the person's answer, and the
retry is approved only if the state is authentic, unexpired, unused (on any replica, with a store),
issued to the principal retrying and names this very call. MCP-free:
`gateway.core.gateway` does the talking.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any, Protocol

from gateway.calls import Answer, Approval, Channel, Decision, ToolCall
from gateway.display import approval_prompt
from gateway.errors import ApprovalsError, format_seconds
from gateway.schema import canonical_json

REQUEST_KEY = "mcp-armor-approval"
"""The key of the gateway's elicitation in `inputRequests` / `inputResponses`."""

REQUESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "approve": {
            "type": "boolean",
            "title": "Allow this call",
            "description": "Tick to let this exact call go ahead once.",
            "default": False,
        }
    },
    "required": ["approve"],
}


class States(Protocol):
    """The key approvals are bound and sealed under, and the record of the sealed states redeemed."""

    blocking: bool
    """Its calls wait on a server (the gateway makes them in a worker thread)."""

    def key(self) -> bytes: ...
    def first_use(self, nonce: str, until: float, now: float) -> bool:
        """Record `nonce` as redeemed until `until`: `True` only the first time."""
        ...

    def close(self) -> None: ...


class LocalStates:
    """This process's own: a key that never leaves it, and the nonces redeemed here (in memory)."""

    blocking = False

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._used: dict[str, float] = {}

    def key(self) -> bytes:
        return self._key

    def first_use(self, nonce: str, until: float, now: float) -> bool:
        self._used = {key: expiry for key, expiry in self._used.items() if expiry > now}
        if nonce in self._used:
            return False
        self._used[nonce] = until
        return True

    def close(self) -> None:
        pass


class ApprovalDesk:
    """Phrases approval requests, seals the state of pending ones, and checks the answers."""

    def __init__(
        self,
        ttl: float,
        *,
        clock: Callable[[], float] = time.time,
        declared: Callable[[str], Collection[str]] = lambda tool: (),
        states: States | None = None,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._declared = declared
        """The arguments of a tool that the policy's `[[paths]]` declare paths: shown first."""
        self._states = states if states is not None else LocalStates()
        self.blocking = self._states.blocking
        """Whether `ready` and `redeem` wait on the shared store (to be called in a worker thread)."""

    def ready(self) -> None:
        """Have the key at hand (from the shared store, the first time): `ApprovalsError` when it cannot be."""
        self._states.key()

    def close(self) -> None:
        """Let go of the shared store's connection, if any (the gateway is stopping)."""
        self._states.close()

    def binding(self, call: ToolCall) -> str:
        """What an approval is bound to: the session and its principal, the exposed name and the upstream behind it, the
        definition the agent was shown, a hash of the arguments, and, once decided, the policy revision
        and the arguments the upstream would receive (a rewrite under another revision is another call).
        Keyed: the queue and its notices show it beside masked arguments, and a plain hash of everything
        else they show would let a reader test guesses of a masked value."""
        target = {"tool": call.tool.name, "upstream": call.tool.upstream, "definition": call.tool.source.digest}
        who = {"session": call.session.id, "principal": call.session.principal}
        bound: dict[str, Any] = {**who, **target, "arguments": call.arguments}
        if call.decision is not None:
            bound.update(revision=call.decision.revision, forwarded=call.forwarded_arguments)
        return hmac.new(self._states.key(), canonical_json(bound), hashlib.sha256).hexdigest()

    def message(self, call: ToolCall, decision: Decision) -> str:
        """The person's prompt: every argument the upstream would receive, path-like ones first."""
        decided = replace_decision(call, decision)
        return approval_prompt(
            tool=call.tool.name,
            upstream_tool=call.tool.upstream_name,
            upstream=call.tool.upstream,
            reason=decision.reason,
            arguments=decided.forwarded_arguments,
            paths=self._declared(call.tool.name),
            binding=self.binding(decided),
            call_id=call.id,
            expires=format_seconds(self.ttl),
        )

    def answer(self, response: Mapping[str, Any] | None, via: Channel = Channel.ELICITATION) -> Approval:
        """Read a person's elicitation answer (asked through `via`): only an accepted form with `approve`
        ticked approves."""
        if not isinstance(response, Mapping):
            return Approval(Answer.NO_ANSWER, "no answer came from the person", via)
        action = response.get("action")
        content = response.get("content")
        if action == "accept" and isinstance(content, Mapping) and content.get("approve") is True:
            return Approval(Answer.GRANTED, "approved by a person", via)
        if action == "accept":
            return Approval(Answer.DECLINED, "the person did not tick 'Allow this call'", via)
        if action == "decline":
            return Approval(Answer.DECLINED, "the person declined it", via)
        return Approval(Answer.DECLINED, "the person dismissed the request without approving it", via)

    def pending(self, call: ToolCall, decision: Decision, entry: str | None = None) -> Approval:
        """The `input_required` result that asks the client to collect the person's answer (`entry`: the
        call also waits in the approval queue under this id, and the retry's answer is entered there)."""
        request = {
            "method": "elicitation/create",
            "params": {"mode": "form", "message": self.message(call, decision), "requestedSchema": REQUESTED_SCHEMA},
        }
        result = {
            "resultType": "input_required",
            "inputRequests": {REQUEST_KEY: request},
            "requestState": self.seal(call, entry),
        }
        waiting = "waiting for a person's approval"
        return Approval(Answer.PENDING, waiting, Channel.ROUND_TRIP, pending=result, entry=entry)

    def seal(self, call: ToolCall, entry: str | None = None) -> str:
        now = self._clock()
        claims = {
            "b": self.binding(call),
            "p": call.session.principal,
            "exp": now + self.ttl,
            "n": secrets.token_hex(16),
            "q": entry,
        }
        body = base64.urlsafe_b64encode(canonical_json(claims)).decode().rstrip("=")
        return f"{body}.{self._sign(body)}"

    def redeem(self, state: str | None, response: Mapping[str, Any] | None, call: ToolCall) -> Approval:
        """Check a retried call's `requestState` and the person's answer; each state approves once."""
        if not state:
            return _invalid("the retry carried no approval state")
        body, _, signature = state.partition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return _invalid("the approval state was not issued by this gateway (or was altered)")
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            bound, principal = str(claims["b"]), str(claims["p"])
            expires, nonce = float(claims["exp"]), str(claims["n"])
            entry = claims.get("q")
            if entry is not None and not isinstance(entry, str):
                raise TypeError(entry)
        except (ValueError, KeyError, TypeError):
            return _invalid("the approval state is malformed")
        now = self._clock()
        if expires <= now:
            return _invalid("the approval expired; call again to ask anew")
        if not hmac.compare_digest(principal.encode(), call.session.principal.encode()):
            return _invalid("the approval was given to another principal")
        if not hmac.compare_digest(bound, self.binding(call)):
            return _invalid("the approval was given for a different call (tool, arguments or policy changed)")
        try:
            first = self._states.first_use(nonce, expires, now)
        except ApprovalsError as exc:  # the store is unreachable: whether it was used cannot be known
            return _invalid(str(exc))
        if not first:
            return _invalid("this approval was already used; each approval covers one call")
        verdict = self.answer(response, Channel.ROUND_TRIP)
        return replace(verdict, entry=entry) if entry is not None else verdict

    def _sign(self, body: str) -> str:
        return hmac.new(self._states.key(), body.encode(), hashlib.sha256).hexdigest()


def replace_decision(call: ToolCall, decision: Decision) -> ToolCall:
    """`call` as decided (its binding then covers the revision and the forwarded arguments)."""
    return call if call.decision is not None else replace(call, decision=decision)


def _invalid(reason: str) -> Approval:
    return Approval(Answer.INVALID, reason, Channel.ROUND_TRIP)
