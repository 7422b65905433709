"""The pipeline's audit stages learn the decision from the call itself, whatever way it ends; sessions
are opened and ended by the gateway's session registry, which records them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.events import GatewayEvents
from gateway.audit.recorder import Recorder
from gateway.audit.stages import CallAudit
from gateway.audit.store import AuditStore
from gateway.calls import (
    Answer,
    Approval,
    Channel,
    Decision,
    Effect,
    Handler,
    Outcome,
    OutcomeKind,
    SessionInfo,
    ToolCall,
)
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.core.pipeline import EnforcePolicy, compose
from gateway.core.sessions import Sessions
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies

POLICY = """
[[rule]]
id = "w"
tools = ["box__write"]
effect = "ask"

[[rule]]
id = "no-drop"
tools = ["box__drop"]
effect = "deny"

[[rule]]
id = "slow-down"
tools = ["box__read"]
effect = "allow"
rate = "1/minute"
"""


def _call(name: str) -> ToolCall:
    listing = normalise_listing("box", [{"name": name, "inputSchema": {"type": "object"}}])
    tool = Catalog.build([listing], "__").tools[f"box__{name}"]
    return ToolCall(SessionInfo("s1", "stdio", "2025-06-18"), tool, {"path": "notes/a"})


def _engine(tmp_path: Path) -> PolicyEngine:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.toml").write_text(POLICY)
    engine = PolicyEngine(load_policies(tmp_path / "policies"))
    engine.index_tools(["box__write", "box__drop", "box__read"])
    return engine


@asynccontextmanager
async def _pipeline(tmp_path: Path, forward: Handler) -> AsyncIterator[Handler]:
    engine = _engine(tmp_path)
    async with Recorder(tmp_path / "audit.db").running() as recorder:
        audit = CallAudit(recorder, engine)
        yield compose([audit.outcomes, EnforcePolicy(engine, ask_timeout=60), audit.decisions], forward)


def _events(tmp_path: Path) -> list[dict[str, Any]]:
    store = AuditStore.open_reader(tmp_path / "audit.db")
    try:
        return [record for record in store.events() if record["kind"] in ("decision", "outcome")]
    finally:
        store.close()


async def _forward(call: ToolCall) -> Outcome:
    return Outcome.completed({"content": [], "isError": False})


@pytest.mark.anyio
async def test_every_outcome_leaving_the_policy_stage_carries_the_decided_call(tmp_path: Path) -> None:
    async def approve(call: ToolCall, decision: Decision) -> Approval:
        return Approval(Answer.GRANTED, "approved by a person", Channel.ELICITATION)

    engine = _engine(tmp_path)
    policy = EnforcePolicy(engine, ask_timeout=60)
    denied = await policy(_call("drop"), _forward)
    asked = await policy(replace(_call("write"), approver=approve), _forward)
    assert denied.kind is OutcomeKind.REFUSED and denied.call is not None and denied.call.decision is not None
    assert denied.call.decision.effect is Effect.DENY
    assert asked.kind is OutcomeKind.OK and asked.call is not None and asked.call.approval is not None
    assert asked.call.decision is not None and asked.call.decision.effect is Effect.ASK
    assert asked.call.approval.granted


@pytest.mark.anyio
async def test_a_call_cancelled_while_a_person_is_asked_is_recorded_once_as_asked(tmp_path: Path) -> None:
    asking = anyio.Event()

    async def never_answers(call: ToolCall, decision: Decision) -> Approval:
        asking.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async with _pipeline(tmp_path, _forward) as pipeline:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pipeline, replace(_call("write"), approver=never_answers))
                await asking.wait()
                tg.cancel_scope.cancel()
    decision, outcome = _events(tmp_path)
    assert (decision["decision"], decision["stage"], decision["rules"]) == ("ask", "policy", ["w"])
    assert decision["approval"] == "not granted" and "approval_request" not in decision  # nobody answered
    assert outcome["outcome"] == "cancelled" and outcome["call_id"] == decision["call_id"]


@pytest.mark.anyio
async def test_a_fault_while_asking_is_recorded_as_asked_and_raised_as_it_was(tmp_path: Path) -> None:
    async def broken(call: ToolCall, decision: Decision) -> Approval:
        raise RuntimeError("the approver broke")

    async with _pipeline(tmp_path, _forward) as pipeline:
        with pytest.raises(RuntimeError, match="the approver broke"):
            await pipeline(replace(_call("write"), approver=broken))
    decision, outcome = _events(tmp_path)
    assert (decision["decision"], decision["stage"], decision["approval"]) == ("ask", "policy", "not granted")
    assert (outcome["outcome"], outcome["reason"]) == ("error", "internal gateway error")


@pytest.mark.anyio
async def test_a_fault_after_the_decision_is_recorded_leaves_one_decision_and_one_outcome(tmp_path: Path) -> None:
    async def crash(call: ToolCall) -> Outcome:
        raise RuntimeError("forwarding broke")

    async with _pipeline(tmp_path, crash) as pipeline:
        with pytest.raises(RuntimeError, match="forwarding broke"):
            await pipeline(_call("read"))
    decision, outcome = _events(tmp_path)
    assert (decision["decision"], decision["stage"]) == ("allow", "policy")
    assert outcome["outcome"] == "error" and outcome["call_id"] == decision["call_id"]


@asynccontextmanager
async def _noted(tmp_path: Path, session: SessionInfo) -> AsyncIterator[tuple[PolicyEngine, Decision, Sessions]]:
    """A session noted by a gateway's sessions, with the decision of a rate-limited call in it."""
    engine = _engine(tmp_path)
    decision = engine.evaluate("box__read", {}, now=0.0, who=session.who)
    async with Recorder(tmp_path / "audit.db").running() as recorder:
        sessions = Sessions(GatewayEvents(recorder, engine), engine)
        sessions.note(session)
        yield engine, decision, sessions


@pytest.mark.anyio
async def test_a_session_starts_once_ends_once_and_its_rate_windows_go_with_it(tmp_path: Path) -> None:
    session = SessionInfo("s1", "http", "2025-06-18", "claude-code", "1.0")
    async with _noted(tmp_path, session) as (engine, decision, sessions):
        sessions.note(session)
        assert engine.charge(decision, session.who, 0.0) and not engine.charge(decision, session.who, 1.0)
        sessions.end(session.id, "the client ended the session")
        sessions.end(session.id, "again")
        assert engine.charge(decision, session.who, 2.0)  # a new session under the same id starts afresh
        sessions.note(replace(session, id="s2"))
        sessions.end_all("the gateway shut down")
    store = AuditStore.open_reader(tmp_path / "audit.db")
    try:
        seen = [(record["kind"], record["session_id"], record["reason"]) for record in store.events()]
    finally:
        store.close()
    assert seen == [
        ("session_start", "s1", None),
        ("session_end", "s1", "the client ended the session"),
        ("session_start", "s2", None),
        ("session_end", "s2", "the gateway shut down"),
    ]


@pytest.mark.anyio
async def test_a_stateless_sessions_end_leaves_its_rate_windows_to_the_replicas_sharing_its_id(tmp_path: Path) -> None:
    # Unauthenticated 2026-07-28 requests are one session, with one id, on every replica, counted as that
    # session: one replica stopping (its sessions ending) must not give them a fresh budget everywhere.
    session = SessionInfo("anonymous-hash", "http", "2026-07-28", "claude-code", "1.0")
    async with _noted(tmp_path, session) as (engine, decision, sessions):
        assert engine.charge(decision, session.who, 0.0)
        sessions.end_all("the gateway shut down")
        assert not engine.charge(decision, session.who, 1.0)


class _BrokenRefusalCheck(EnforcePolicy):
    """A policy stage whose check of a decided call (the rewritten arguments' schema check) faults."""

    def _refusal(self, call: ToolCall, decision: Decision) -> Outcome | None:
        raise RuntimeError("the schema check broke")


@pytest.mark.anyio
async def test_a_fault_right_after_the_decision_is_recorded_with_the_decision(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    async with Recorder(tmp_path / "audit.db").running() as recorder:
        audit = CallAudit(recorder, engine)
        pipeline = compose([audit.outcomes, _BrokenRefusalCheck(engine, ask_timeout=60), audit.decisions], _forward)
        with pytest.raises(RuntimeError, match="the schema check broke"):
            await pipeline(_call("read"))
    decision, outcome = _events(tmp_path)
    assert (decision["decision"], decision["stage"], decision["rules"]) == ("allow", "policy", ["slow-down"])
    assert outcome["outcome"] == "error"


@pytest.mark.anyio
async def test_a_fault_after_the_decision_is_raised_with_its_own_context(tmp_path: Path) -> None:
    async def crash(call: ToolCall) -> Outcome:
        try:
            {}["missing"]
        except KeyError:
            raise RuntimeError("forwarding broke")  # noqa: B904
        raise AssertionError("unreachable")

    async with _pipeline(tmp_path, crash) as pipeline:
        with pytest.raises(RuntimeError, match="forwarding broke") as raised:
            await pipeline(_call("read"))
    assert isinstance(raised.value.__context__, KeyError)
    assert not raised.value.__suppress_context__


@pytest.mark.anyio
async def test_a_stage_bounding_the_call_with_a_timeout_gets_its_own_timeout(tmp_path: Path) -> None:
    async def slow(call: ToolCall) -> Outcome:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def bounded(call: ToolCall, call_next: Handler) -> Outcome:
        with anyio.move_on_after(0.05):
            return await call_next(call)
        return Outcome.refused(call, "took too long")

    engine = _engine(tmp_path)
    async with Recorder(tmp_path / "audit.db").running() as recorder:
        audit = CallAudit(recorder, engine)
        pipeline = compose([audit.outcomes, bounded, EnforcePolicy(engine, ask_timeout=60), audit.decisions], slow)
        outcome: Outcome | None = None
        with anyio.fail_after(10):
            outcome = await pipeline(_call("read"))
    # The scope's own cancellation must come back to it as it left (not wrapped, not lost to a scope
    # further out), however deep in the pipeline the decision was taken.
    assert outcome is not None and outcome.reason == "took too long"
