"""Approvals are bound to one call, expire, and approve once (checked here with a fake clock)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.approvals import REQUEST_KEY, ApprovalDesk
from gateway.calls import Decision, Effect, SessionInfo, ToolCall
from gateway.catalog import Catalog, normalise_listing

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
