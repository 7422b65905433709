"""Approvals are bound to one call, expire, and approve once (checked here with a fake clock)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.recorder import Recorder
from gateway.audit.stages import CallAudit
from gateway.audit.store import AuditStore
from gateway.calls import Answer, Approval, Channel, Decision, Effect, Outcome, OutcomeKind, SessionInfo, ToolCall
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.core.approvals import REQUEST_KEY, ApprovalDesk
from gateway.core.pipeline import EnforcePolicy, compose
from gateway.errors import AuditError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies

ACCEPT = {"action": "accept", "content": {"approve": True}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def call() -> ToolCall:
    listing = normalise_listing("box", [{"name": "write", "inputSchema": {"type": "object"}}])
    tool = Catalog.build([listing], "__").tools["box__write"]
    return ToolCall(SessionInfo("s1", "stdio", "2026-07-28"), tool, {"path": "notes/a"})


DECISION = Decision(Effect.ASK, "rule 'w' needs a person's approval", "rev", ("w",))


def test_a_pending_approval_asks_with_a_sealed_state(call: ToolCall) -> None:
    desk = ApprovalDesk(60)
    pending = desk.pending(call, DECISION).pending
    assert pending is not None
    assert pending["resultType"] == "input_required"
    request = pending["inputRequests"][REQUEST_KEY]
    assert request["method"] == "elicitation/create"
    assert "'box__write'" in request["params"]["message"] and '"path": "notes/a"' in request["params"]["message"]
    assert desk.redeem(pending["requestState"], ACCEPT, call).granted


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: replace(c, arguments={"path": "notes/b"}), "given for a different call"),
        (lambda c: replace(c, session=replace(c.session, id="s2")), "given for a different call"),
    ],
    ids=["other-arguments", "other-session"],
)
def test_an_approval_does_not_carry_over(call: ToolCall, change: object, problem: str) -> None:
    desk = ApprovalDesk(60)
    state = desk.seal(call)
    verdict = desk.redeem(state, ACCEPT, change(call))  # type: ignore[operator]
    assert not verdict.granted and problem in verdict.reason


@pytest.mark.parametrize("requester", ["bob", ""], ids=["another-principal", "unauthenticated"])
def test_an_approval_is_redeemed_only_by_the_principal_it_was_issued_to(call: ToolCall, requester: str) -> None:
    """Same session id, same declared client: only the principal differs, and the state is refused."""
    issued = replace(call, session=replace(call.session, principal="alice"))
    desk = ApprovalDesk(60)
    state = desk.seal(issued)
    verdict = desk.redeem(state, ACCEPT, replace(issued, session=replace(issued.session, principal=requester)))
    assert verdict.answer is Answer.INVALID
    assert verdict.reason == "the approval was given to another principal"
    assert desk.redeem(state, ACCEPT, issued).granted


def test_an_approval_expires_and_approves_once(call: ToolCall) -> None:
    clock = Clock()
    desk = ApprovalDesk(60, clock=clock)
    late = desk.seal(call)
    clock.now += 61
    assert desk.redeem(late, ACCEPT, call).reason == "the approval expired; call again to ask anew"
    fresh = desk.seal(call)
    assert desk.redeem(fresh, ACCEPT, call).granted
    assert "already used" in desk.redeem(fresh, ACCEPT, call).reason


@pytest.mark.parametrize(
    ("answer", "granted", "reason"),
    [
        (ACCEPT, True, "approved by a person"),
        ({"action": "accept", "content": {"approve": "yes"}}, False, "did not tick"),
        ({"action": "accept"}, False, "did not tick"),
        ({"action": "decline"}, False, "declined"),
        ({"action": "cancel"}, False, "dismissed"),
        (None, False, "no answer"),
    ],
)
def test_answers(answer: dict[str, object] | None, granted: bool, reason: str) -> None:
    verdict = ApprovalDesk(60).answer(answer)
    assert verdict.granted is granted and reason in verdict.reason


def test_a_forged_or_mangled_state_is_refused(call: ToolCall) -> None:
    desk = ApprovalDesk(60)
    assert "not issued by this gateway" in desk.redeem(ApprovalDesk(60).seal(call), ACCEPT, call).reason
    assert "no approval state" in desk.redeem(None, ACCEPT, call).reason
    assert "not issued" in desk.redeem("garbage", ACCEPT, call).reason


@pytest.mark.anyio
async def test_an_approval_granted_stays_granted_in_the_log_when_the_audit_then_refuses_the_call(
    tmp_path: Path, call: ToolCall
) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "ask.toml").write_text('[[rule]]\nid = "w"\ntools = ["box__write"]\neffect = "ask"\n')
    engine = PolicyEngine(load_policies(tmp_path / "policies"))
    engine.index_tools(["box__write"])
    recorder = Recorder(tmp_path / "audit.db")
    failed: list[str] = []
    real_record = recorder.record

    async def record_failing_once(*bodies: Mapping[str, Any], alone: bool = False) -> None:
        if not failed:
            failed.append(bodies[0]["kind"])
            raise AuditError("disk full")
        await real_record(*bodies, alone=alone)

    async def approve(call: ToolCall, decision: Decision) -> Approval:
        return Approval(Answer.GRANTED, "approved by a person", Channel.ELICITATION)

    async def forward(call: ToolCall) -> Outcome:
        raise AssertionError("a call whose decision was not recorded was forwarded")

    async with recorder.running():
        recorder.record = record_failing_once  # type: ignore[method-assign]
        audit = CallAudit(recorder, engine)
        policy = EnforcePolicy(engine, ask_timeout=10)
        outcome = await compose([audit.outcomes, policy, audit.decisions], forward)(replace(call, approver=approve))
    assert failed == ["decision"]
    assert outcome.kind is OutcomeKind.REFUSED and "the audit log cannot record this call" in outcome.reason
    store = AuditStore.open_reader(tmp_path / "audit.db")
    try:
        (decision,) = [record for record in store.events() if record["kind"] == "decision"]
    finally:
        store.close()
    assert decision["approval"] == "not granted"  # the call did not go on
    assert decision["approval_request"] == {"answer": "granted", "via": "elicitation", "reason": "approved by a person"}


def test_answers_say_what_the_person_did_and_how_they_were_asked(call: ToolCall) -> None:
    desk = ApprovalDesk(60)
    heard = [desk.answer({"action": "decline"}), desk.answer(None), desk.answer(ACCEPT)]
    assert [(item.answer, item.via) for item in heard] == [
        (Answer.DECLINED, Channel.ELICITATION),
        (Answer.NO_ANSWER, Channel.ELICITATION),
        (Answer.GRANTED, Channel.ELICITATION),
    ]
    pending = desk.pending(call, DECISION)
    assert (pending.answer, pending.via, pending.granted) == (Answer.PENDING, Channel.ROUND_TRIP, False)
    assert pending.pending is not None
    state = pending.pending["requestState"]
    retried = [desk.redeem(state, {"action": "decline"}, call), desk.redeem(state, ACCEPT, call)]
    assert [(item.answer, item.via) for item in retried] == [
        (Answer.DECLINED, Channel.ROUND_TRIP),
        (Answer.INVALID, Channel.ROUND_TRIP),  # already used
    ]


def test_the_prompt_shows_the_destination_before_a_long_content(call: ToolCall) -> None:
    long = "line\n" * 2000
    asked = replace(call, arguments={"content": long, "path": "notes/a"}, decision=DECISION)
    message = ApprovalDesk(60).message(asked, DECISION)
    assert '"path": "notes/a"' in message
    assert message.index('"path": "notes/a"') < message.index('"content":')
    assert "10,000 characters" in message and "\n" not in message.split('"content":')[1].split("\n\n")[0]


def test_the_prompt_shows_declared_paths_first_and_the_digest_the_approval_is_bound_to(call: ToolCall) -> None:
    desk = ApprovalDesk(60, declared=lambda tool: {"where"} if tool == "box__write" else set())
    asked = replace(call, arguments={"body": "hi", "where": "/srv/notes"}, decision=DECISION)
    message = desk.message(asked, DECISION)
    assert message.index('"where"') < message.index('"body"')
    assert f"approval bound to sha256 {desk.binding(asked)}" in message


def test_an_approval_is_bound_to_the_rewritten_arguments_and_the_policy_revision(call: ToolCall) -> None:
    desk = ApprovalDesk(60)
    rewritten = replace(DECISION, arguments={"path": "/srv/notes/a"})
    asked = replace(call, decision=rewritten)
    state = desk.seal(asked)
    elsewhere = replace(asked, decision=replace(rewritten, arguments={"path": "/srv/.mcp-armor/keys"}))
    assert "given for a different call" in desk.redeem(state, ACCEPT, elsewhere).reason
    reloaded = replace(asked, decision=replace(rewritten, revision="rev2"))
    assert "given for a different call" in desk.redeem(state, ACCEPT, reloaded).reason
    assert desk.redeem(state, ACCEPT, asked).granted
