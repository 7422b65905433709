"""Rate limits counted in the PostgreSQL store: exact across replicas racing each other, sliding
windows by the database's clock, refunds, finished sessions forgotten, and fail closed while the
database is away."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from gateway.audit.recorder import Recorder
from gateway.audit.stages import CallAudit
from gateway.calls import Answer, Approval, Channel, Decision, Effect, Outcome, OutcomeKind, ToolCall, Who
from gateway.core.pipeline import EnforcePolicy, compose
from gateway.policy import shared_rates
from gateway.policy.engine import PolicyEngine
from gateway.policy.rates import Charge
from gateway.policy.shared_rates import SharedRates
from gateway.store.postgres import Database
from tests.audit.test_stages import _call, _engine, _events, _forward
from tests.policy.test_engine import make_engine
from tests.postgres import PASSWORD, Cluster, cluster, server_missing

pytestmark = pytest.mark.anyio


def rated(limit: str, *more: str) -> str:
    """A policy allowing `fetch__get` under a rule `budget` of rate `limit` (and rules `extra1`... of `more`)."""
    text = f'[[rule]]\nid = "budget"\ntools = ["fetch__get"]\neffect = "allow"\nrate = "{limit}"\n'
    for number, rate in enumerate(more, 1):
        text += f'\n[[rule]]\nid = "extra{number}"\ntools = ["fetch__get"]\neffect = "allow"\nrate = "{rate}"\n'
    return text


@asynccontextmanager
async def replica(directory: Path, url: str, policy: str, *, monitor_mode: bool = False) -> AsyncIterator[PolicyEngine]:
    """One gateway replica's policy engine, counting in the store at `url` with connections of its own."""
    engine = make_engine(directory, policy, monitor_mode=monitor_mode)
    shared = SharedRates(Database(url))
    engine.shared = shared
    try:
        yield engine
    finally:
        await shared.close()


async def call(engine: PolicyEngine, who: Who) -> Charge:
    """A call to `fetch__get` as the pipeline makes it: decided, then charged."""
    decision = engine.evaluate("fetch__get", {}, now=0.0, who=who)
    assert decision.effect is Effect.ALLOW  # shared counts decide at charge time, never from memory
    return await engine.charge_call(decision, who, 0.0)


def hits(url: str, rule: str = "budget") -> int:
    with Database(url).session() as db:
        row = db.execute("SELECT count(*) FROM rate_hits WHERE rule = %s", (rule,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def store(store_url: str) -> str:
    Database(store_url).migrate()
    return store_url


ALICE = Who(principal="alice", session="s1")


async def test_three_replicas_racing_admit_exactly_the_limit(tmp_path: Path, store: str) -> None:
    admitted: list[Charge] = []
    refused: list[Charge] = []

    async def fire(engine: PolicyEngine, number: int) -> None:
        charge = await call(engine, Who(principal="alice", session=f"s{number}"))
        (refused if charge.refusal else admitted).append(charge)

    async with (
        replica(tmp_path / "a", store, rated("25/minute")) as a,
        replica(tmp_path / "b", store, rated("25/minute")) as b,
        replica(tmp_path / "c", store, rated("25/minute")) as c,
    ):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for engine in (a, b, c):
                    for number in range(40):
                        tg.start_soon(fire, engine, number)
        assert len(admitted) == 25 and len(refused) == 95
        assert hits(store) == 25
        assert all(charge.refusal is not None for charge in refused)
        note = refused[0].refusal or ""
        assert "rule 'budget' allows 25 calls per minute per principal and that limit is reached" in note
        assert "try again in 60s" in note or "try again in 59s" in note
        assert (await call(a, Who(principal="bob", session="s1"))).refusal is None  # another principal: its own


async def test_the_window_slides_by_the_databases_clock(tmp_path: Path, store: str) -> None:
    async with replica(tmp_path, store, rated("2/1s")) as engine:
        assert (await call(engine, ALICE)).refusal is None
        assert (await call(engine, ALICE)).refusal is None
        limited = await call(engine, ALICE)
        assert limited.refusal is not None and "try again in 1s" in limited.refusal
        with anyio.fail_after(10):  # the oldest hit leaves the window within a second
            while (await call(engine, ALICE)).refusal is not None:  # noqa: ASYNC110 - the database's clock
                await anyio.sleep(0.05)
        assert hits(store) == 3


async def test_a_refund_gives_the_slot_back(tmp_path: Path, store: str) -> None:
    async with replica(tmp_path, store, rated("1/minute")) as engine:
        first = await call(engine, ALICE)
        assert first.refusal is None and len(first.hits) == 1
        assert (await call(engine, ALICE)).refusal is not None
        await engine.refund_call(first)  # refused later on: the call did not happen
        assert hits(store) == 0
        assert (await call(engine, ALICE)).refusal is None


async def test_several_rules_are_charged_all_or_none(tmp_path: Path, store: str) -> None:
    async with replica(tmp_path, store, rated("1/minute", "5/minute")) as engine:
        assert len((await call(engine, ALICE)).hits) == 2
        refused = await call(engine, ALICE)
        assert refused.refusal is not None and "rule 'budget'" in refused.refusal and refused.hits == ()
        assert (hits(store, "budget"), hits(store, "extra1")) == (1, 1)  # the refused call counted against neither


async def test_a_finished_sessions_own_counts_are_forgotten_and_a_principals_stay(tmp_path: Path, store: str) -> None:
    async with replica(tmp_path, store, rated("1/minute")) as engine:
        anonymous = Who(session="s1")
        assert (await call(engine, anonymous)).refusal is None
        assert (await call(engine, ALICE)).refusal is None
        assert (await call(engine, anonymous)).refusal is not None
        engine.forget("s1")  # the session ended
        assert (await call(engine, anonymous)).refusal is None  # its own counts went first
        assert (await call(engine, Who(principal="alice", session="s2"))).refusal is not None
        engine.forget("s1")
    assert hits(store) == 1  # what was left to forget went as the replica closed: alice's hit stays


async def test_a_monitored_limit_refuses_nothing_and_is_noted(tmp_path: Path, store: str) -> None:
    async with replica(tmp_path, store, rated("1/minute"), monitor_mode=True) as engine:
        assert (await call(engine, ALICE)).refusal is None
        over = await call(engine, ALICE)
        assert over.refusal is None and over.would_deny and over.hits == ()
        decision = engine.evaluate("fetch__get", {}, now=0.0, who=ALICE)
        assert engine.charged(decision, over).would is Effect.DENY
        assert hits(store) == 1


async def test_expired_hits_are_pruned(tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with replica(tmp_path, store, rated("5/1s")) as engine:
        for number in range(3):
            assert (await call(engine, Who(session=f"gone{number}"))).refusal is None
        monkeypatch.setattr(shared_rates, "PRUNE_EVERY", 0.0)
        with anyio.fail_after(10):  # the three expire a second after they were counted
            while hits(store) > 0:  # each charge sweeps what has expired (alice's own is refunded)
                await engine.refund_call(await call(engine, ALICE))
                await anyio.sleep(0.05)


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own, to stop and start (the session's is shared by every test)."""
    why = server_missing()
    if why is not None:
        pytest.skip(why)
    with cluster() as running:
        yield running


async def test_the_database_away_refuses_rated_calls_until_it_is_back(tmp_path: Path, own_cluster: Cluster) -> None:
    url = own_cluster.url(own_cluster.new_database())
    Database(url).migrate()
    async with replica(tmp_path, url, rated("100/minute")) as engine:
        assert (await call(engine, ALICE)).refusal is None
        own_cluster.stop()
        refused = await call(engine, ALICE)
        assert refused.refusal is not None and "\n" not in refused.refusal
        assert refused.refusal.startswith("the rate limits of rule 'budget' cannot be counted (")
        assert Database(url).shown in refused.refusal and PASSWORD not in refused.refusal
        decision = engine.evaluate("fetch__get", {}, now=0.0, who=ALICE)
        assert engine.charged(decision, refused).effect is Effect.DENY
        own_cluster.start()
        assert (await call(engine, ALICE)).refusal is None  # no restart: the next charge connects anew
    assert hits(url) == 2


async def test_a_call_over_a_shared_limit_is_recorded_as_denied_and_a_refused_one_refunded(
    tmp_path: Path, store: str
) -> None:
    engine = _engine(tmp_path)  # rule 'slow-down': box__read, 1/minute
    engine.shared = SharedRates(Database(store))

    async def refuse(call: ToolCall) -> Outcome:
        return Outcome.refused(call, "refused further on")

    try:
        async with Recorder(tmp_path / "audit.db").running() as recorder:
            audit = CallAudit(recorder, engine)
            stages = [audit.outcomes, EnforcePolicy(engine, ask_timeout=60), audit.decisions]
            assert (await compose(stages, refuse)(_call("read"))).kind is OutcomeKind.REFUSED  # refunded
            assert (await compose(stages, _forward)(_call("read"))).kind is OutcomeKind.OK
            over = await compose(stages, _forward)(_call("read"))
    finally:
        await engine.shared.close()
    assert over.kind is OutcomeKind.REFUSED and "rule 'slow-down' allows 1 call per minute" in (over.reason or "")
    decision, outcome = _events(tmp_path)[-2:]
    assert (decision["decision"], decision["rules"], decision["reason"]) == ("deny", ["slow-down"], over.reason)
    assert outcome["outcome"] == "refused"
    assert hits(store, "slow-down") == 1


async def test_nobody_is_asked_about_a_call_a_shared_limit_would_refuse(tmp_path: Path, store: str) -> None:
    asked: list[str] = []

    async def approve(call: ToolCall, decision: Decision) -> Approval:
        asked.append(call.id)
        return Approval(Answer.GRANTED, "approved by a person", Channel.ELICITATION)

    policy = '[[rule]]\nid = "careful"\ntools = ["box__ask"]\neffect = "ask"\nrate = "1/minute"\n'
    async with replica(tmp_path, store, policy) as engine:
        enforce = EnforcePolicy(engine, ask_timeout=60)
        assert (await enforce(replace(_call("ask"), approver=approve), _forward)).kind is OutcomeKind.OK
        over = await enforce(replace(_call("ask"), approver=approve), _forward)
    assert len(asked) == 1  # the second was refused before anyone was asked
    assert over.kind is OutcomeKind.REFUSED and over.call is not None and over.call.decision is not None
    assert over.call.decision.effect is Effect.DENY and over.call.approval is None
    assert "rule 'careful' allows 1 call per minute per session and that limit is reached" in (over.reason or "")
    assert hits(store, "careful") == 1
