"""Three gateway replicas on one PostgreSQL store behind a real HAProxy (docs/deploy/haproxy.cfg), end to
end: many sessions make one audit chain, a rate limit is one budget, a replica killed mid-load loses no
decision, and the database restarted under load loses nothing and forwards nothing unrecorded.

Which replica served a call is told by the toolbox's `pid` tool (each replica runs its own toolbox, whose
parent is the replica); which replica a session lives on, by its `session_start` (`pid`, `lease`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.audit.shared import GONE_AFTER, SharedAuditStore
from gateway.store.postgres import Database
from tests.conftest import ALLOW_ALL, REPO, fixture_upstream, read_records, text_of
from tests.e2e.test_http_and_cli import RawHttpSession
from tests.postgres import cluster, server_missing
from tests.replicas import Replicas, running_replicas

pytestmark = pytest.mark.anyio

UPSTREAMS = {"box": fixture_upstream("toolbox.py")}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def store_events(url: str) -> list[dict[str, Any]]:
    log = SharedAuditStore.open_reader(Database(url))
    try:
        return list(log.events())
    finally:
        log.close()


def verified(config: Path, url: str) -> dict[str, Any]:
    """The chain checked twice, by `mcp-armor audit verify` and by a reader: its report."""
    checked = cli(config, "audit", "verify", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = SharedAuditStore.open_reader(Database(url))
    try:
        walked = log.verify()
    finally:
        log.close()
    report: dict[str, Any] = json.loads(checked.stdout)
    assert walked.problem is None and (walked.events, walked.head_seq) == (report["events"], report["head"])
    return report


def per_call(events: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """For each call id: how many decisions and outcomes the chain holds."""
    kinds: dict[str, Counter[str]] = {}
    for event in events:
        if event["kind"] in ("decision", "outcome"):
            kinds.setdefault(event["call_id"], Counter())[event["kind"]] += 1
    return kinds


def starts(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {event["session_id"]: event for event in events if event["kind"] == "session_start"}


def parent_of(pid: int) -> int:
    """The parent process of a running process (a toolbox's is the replica that started it)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    return int(stat.rsplit(")", 1)[1].split()[1])


async def until(done: Callable[[], object], seconds: float) -> None:
    """Poll `done()` (state in other processes: no event to await) until it holds, within `seconds`."""
    with anyio.fail_after(seconds):
        while not done():  # noqa: ASYNC110 - the state is another process's
            await anyio.sleep(0.2)


SESSIONS = 200
CALLS = 10
AT_ONCE = 25


async def test_200_sessions_of_10_calls_over_3_replicas_make_one_chain_that_verifies(
    tmp_path: Path, store_url: str
) -> None:
    """200 real SDK sessions of 10 calls each, 25 at a time through the proxy: every call is answered by the
    toolbox of the replica its session started on, all three replicas serve, and the one chain holds exactly
    one decision and one outcome per call, with every replica's events, and verifies."""
    served: dict[str, list[int]] = {}
    limiter = anyio.CapacityLimiter(AT_ONCE)

    async def one_session(gateways: Replicas, number: int) -> None:
        async with (
            limiter,
            gateways.client() as http,
            Client(streamable_http_client(gateways.url, http_client=http), mode="legacy") as client,
        ):
            for call in range(CALLS):
                answered = await client.call_tool("box__pid", {"tag": f"s{number}c{call}"})
                assert not answered.is_error, text_of(answered)
                served.setdefault(f"s{number}", []).append(int(text_of(answered)))

    async with running_replicas(tmp_path, UPSTREAMS, 3, policy=ALLOW_ALL, store_url=store_url) as gateways:
        replica_pids = {replica.process.pid for replica in gateways.replicas}
        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for number in range(SESSIONS):
                    tg.start_soon(one_session, gateways, number)
        # Each toolbox answered as the child of one replica (read while they run).
        toolbox_of = {pid: parent_of(pid) for pids in served.values() for pid in set(pids)}
    assert set(toolbox_of.values()) == replica_pids
    assert len(served) == SESSIONS and all(len(pids) == CALLS and len(set(pids)) == 1 for pids in served.values())

    events = store_events(store_url)
    counted = per_call(events)
    assert len(counted) == SESSIONS * CALLS
    assert all(kinds == Counter(decision=1, outcome=1) for kinds in counted.values())
    decisions = [event for event in events if event["kind"] == "decision"]
    started = starts(events)
    # Each call's decision is in the session of the replica whose toolbox answered it.
    for decision in decisions:
        tag = decision["arguments"]["tag"]
        session = tag.split("c")[0]
        assert started[decision["session_id"]]["pid"] == toolbox_of[served[session][0]], decision
    assert len({decision["session_id"] for decision in decisions}) == SESSIONS
    assert sorted(decision["arguments"]["tag"] for decision in decisions) == sorted(
        f"s{number}c{call}" for number in range(SESSIONS) for call in range(CALLS)
    )
    leases = {start["lease"] for start in started.values()}
    assert len(leases) == 3 and {int(lease.split(":")[1].split("/")[0]) for lease in leases} == replica_pids
    report = verified(gateways.config, store_url)
    assert report["events"] == len(events)


BUDGET = 7
RATED = f"""
[defaults]
effect = "allow"

[[rule]]
id = "echo-budget"
tools = ["box__echo"]
effect = "allow"
rate = "{BUDGET}/minute"
"""


async def test_a_rate_of_7_per_minute_for_one_principal_admits_exactly_7_across_the_replicas(
    tmp_path: Path, store_url: str
) -> None:
    """One principal's 30 calls from six sessions spread over the three replicas: exactly 7 go ahead (and
    reach the upstream), 23 are refused naming the rule, and the chain holds a decision for each of the 30.
    The principal is issued with `mcp-armor principal add` into the state directory the replicas share."""
    record = tmp_path / "calls.jsonl"
    upstreams = {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}
    answers: list[tuple[bool, str]] = []
    async with running_replicas(tmp_path, upstreams, 3, policy=RATED, store_url=store_url) as gateways:
        added = cli(gateways.config, "principal", "add", "alice", "--json")
        assert added.returncode == 0, added.stderr
        headers = {"authorization": f"Bearer {json.loads(added.stdout)['token']}"}
        async with AsyncExitStack() as stack:
            clients = []
            for _ in range(6):  # opened one after another: the proxy deals them to the replicas in turn
                http = await stack.enter_async_context(gateways.client(headers))
                transport = streamable_http_client(gateways.url, http_client=http)
                clients.append(await stack.enter_async_context(Client(transport, mode="legacy")))

            async def five_calls(client: Client, number: int) -> None:
                for call in range(5):
                    answered = await client.call_tool("box__echo", {"text": f"s{number}c{call}"})
                    answers.append((not answered.is_error, text_of(answered)))

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for number, client in enumerate(clients):
                        tg.start_soon(five_calls, client, number)
        replica_pids = {replica.process.pid for replica in gateways.replicas}
    assert Counter(ok for ok, _ in answers) == {True: BUDGET, False: 30 - BUDGET}
    refusals = [text for ok, text in answers if not ok]
    limit = f"rule 'echo-budget' allows {BUDGET} calls per minute per principal and that limit is reached"
    assert all(limit in text for text in refusals), refusals
    assert len(read_records(record)) == BUDGET
    events = store_events(store_url)
    decisions = [event for event in events if event["kind"] == "decision"]
    assert len(decisions) == 30 and {event["principal"] for event in decisions} == {"alice"}
    assert Counter(event["decision"] for event in decisions) == {"allow": BUDGET, "deny": 30 - BUDGET}
    sessions = {event["session_id"] for event in decisions}
    assert {start["pid"] for id, start in starts(events).items() if id in sessions} == replica_pids
    verified(gateways.config, store_url)


class Load:
    """Sessions through the proxy calling until told to stop; what each call's client saw, by its tag:
    `ok`, `error` (an error result) or `lost` (no answer: the replica went away under it)."""

    def __init__(self, gateways: Replicas) -> None:
        self.gateways = gateways
        self.seen: dict[str, tuple[str, str]] = {}
        """tag -> (what the client saw, the result's text)"""
        self.times: dict[str, tuple[float, float]] = {}
        """tag -> (when the call was sent, when its answer (or its loss) came), monotonic"""
        self.stop = anyio.Event()

    async def session(self, number: int, calls: Callable[[int], tuple[str, dict[str, Any]]]) -> None:
        """One session calling `calls(n)` (a tool and its arguments, the tag among them) until `stop`, or
        until its replica is gone (its next request reaches another one, which does not know it)."""
        async with self.gateways.client() as http:
            session = RawHttpSession(http, self.gateways.url)
            await session.open()
            n = 0
            while not self.stop.is_set():
                tool, arguments = calls(n)
                tag = f"s{number}c{n}"
                n += 1
                sent = anyio.current_time()
                params = {"name": tool, "arguments": {**arguments, "tag": tag}}
                try:
                    response = await session.post({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": params})
                except httpx2.TransportError:
                    response = None
                answer = answer_in(response, n)
                self.times[tag] = (sent, anyio.current_time())
                if answer is None:
                    self.seen[tag] = ("lost", "")
                    return
                result = answer["result"]
                text = "".join(block.get("text", "") for block in result["content"])
                self.seen[tag] = ("error" if result.get("isError") else "ok", text)

    def count(self, what: str, since: float = 0.0) -> int:
        return sum(seen == what and self.times[tag][0] >= since for tag, (seen, _) in self.seen.items())


def answer_in(response: httpx2.Response | None, request_id: int) -> dict[str, Any] | None:
    """The answer to `request_id` in a whole 200 response (as JSON or a server-sent event), else `None`."""
    if response is None or response.status_code != 200:
        return None
    if response.headers["content-type"].startswith("application/json"):
        return dict(response.json())
    for line in response.text.splitlines():
        if line.startswith("data:") and (answer := json.loads(line[5:])).get("id") == request_id:
            return dict(answer)
    return None


def slow_and_quick(n: int) -> tuple[str, dict[str, Any]]:
    return ("box__slow", {"steps": 30}) if n % 2 else ("box__echo", {"text": f"call {n}"})


async def test_kill_9_of_a_replica_mid_load_loses_no_decision(tmp_path: Path, store_url: str) -> None:
    """30 sessions over three replicas, half their calls slow; one replica is killed with SIGKILL while calls
    are in flight on it. Every call a client saw answered has its decision and outcome in the chain; the
    killed replica's calls in flight are recorded as interrupted by the survivors and its sessions ended;
    no call has two outcomes; the chain verifies."""
    async with running_replicas(tmp_path, UPSTREAMS, 3, policy=ALLOW_ALL, store_url=store_url) as gateways:
        load = Load(gateways)
        async with anyio.create_task_group() as tg:
            for number in range(30):
                tg.start_soon(load.session, number, slow_and_quick)
            victim = gateways.replicas[0]

            def in_flight_on_victim() -> list[dict[str, Any]]:
                events = store_events(store_url)
                on_victim = {id for id, start in starts(events).items() if start["pid"] == victim.process.pid}
                counted = per_call(events)
                return [
                    event
                    for event in events
                    if event["kind"] == "decision"
                    and event["tool"] == "box__slow"
                    and event["session_id"] in on_victim
                    and counted[event["call_id"]]["outcome"] == 0
                ]

            await until(lambda: len(in_flight_on_victim()) >= 3, 60)
            await gateways.kill(victim)
            killed = anyio.current_time()
            await until(lambda: load.count("ok", since=killed) >= 30, 60)  # the survivors go on serving
            load.stop.set()
        # The survivors take the killed replica for gone once its lock is free and it has been silent long enough.
        victim_leases = {s["lease"] for s in starts(store_events(store_url)).values() if s["pid"] == victim.process.pid}

        def settled() -> bool:
            events = store_events(store_url)
            ended = {event["session_id"] for event in events if event["kind"] == "session_end"}
            victims = {id for id, start in starts(events).items() if start["lease"] in victim_leases}
            return victims <= ended and all(kinds["outcome"] for kinds in per_call(events).values())

        await until(settled, GONE_AFTER + 30)
        events = store_events(store_url)
    verified(gateways.config, store_url)
    counted = per_call(events)
    assert all(kinds == Counter(decision=1, outcome=1) for kinds in counted.values()), counted
    decisions = {event["arguments"]["tag"]: event for event in events if event["kind"] == "decision"}
    outcomes = {event["call_id"]: event for event in events if event["kind"] == "outcome"}
    answered = [tag for tag, (seen, _) in load.seen.items() if seen != "lost"]
    assert answered and all(load.seen[tag][0] == "ok" for tag in answered)
    assert all(tag in decisions for tag in answered)
    interrupted = {tag for tag, event in decisions.items() if outcomes[event["call_id"]]["outcome"] == "interrupted"}
    victim_sessions = {id for id, start in starts(events).items() if start["lease"] in victim_leases}
    assert len(interrupted) >= 3
    assert all(decisions[tag]["session_id"] in victim_sessions for tag in interrupted)
    assert all(load.seen[tag][0] == "lost" for tag in interrupted)  # none was answered, and each was cut off
    assert all(
        "ended without recording an outcome" in outcomes[decisions[tag]["call_id"]]["reason"] for tag in interrupted
    )
    # The sessions ended by a survivor for the killed replica are its own, and only its own.
    settled_sessions = {e["session_id"] for e in events if e["kind"] == "session_end" and "ended without" in str(e)}
    assert settled_sessions == victim_sessions
    assert all(outcomes[decisions[tag]["call_id"]]["outcome"] != "interrupted" for tag in answered)


def echo_calls(n: int) -> tuple[str, dict[str, Any]]:
    return "box__echo", {"text": f"call {n}"}


async def test_the_database_restarted_under_load_loses_nothing_and_forwards_nothing_unrecorded(tmp_path: Path) -> None:
    """Clients keep calling through the proxy while the store's PostgreSQL is stopped for a few seconds and
    started again. Calls made while it is away are refused naming the audit log and never reach the
    upstream; calls after it is back are served, with nothing restarted; every call answered as a success
    has its decision and outcome in the chain, every call the upstream saw has its decision, each call has
    exactly one of each, and the chain verifies."""
    why = server_missing()
    if why is not None:
        pytest.skip(why)
    record = tmp_path / "calls.jsonl"
    upstreams = {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}
    with cluster() as pg:
        store_url = pg.url(pg.new_database())
        async with running_replicas(tmp_path, upstreams, 3, policy=ALLOW_ALL, store_url=store_url) as gateways:
            load = Load(gateways)
            async with anyio.create_task_group() as tg:
                for number in range(6):
                    tg.start_soon(load.session, number, echo_calls)
                await until(lambda: load.count("ok") >= 30, 60)
                await anyio.to_thread.run_sync(pg.stop, "fast")
                away = anyio.current_time()
                # Away for a few seconds: until calls sent 3 s after the stop have been answered.
                await until(lambda: any(sent >= away + 3 for sent, _ in load.times.values()), 60)
                restarting = anyio.current_time()
                await anyio.to_thread.run_sync(pg.start)
                back = anyio.current_time()
                await until(lambda: load.count("ok", since=back) >= 30, 60)
                load.stop.set()
        events = store_events(store_url)
        verified(gateways.config, store_url)
    during = {tag for tag, (sent, answered) in load.times.items() if sent >= away and answered <= restarting}
    after = {tag for tag, (sent, _) in load.times.items() if sent >= back}
    assert len(during) >= 6 and len(after) >= 30
    assert {load.seen[tag][0] for tag in during} == {"error"}
    assert all("cannot write the audit log" in load.seen[tag][1] for tag in during), [load.seen[t] for t in during]
    assert {load.seen[tag][0] for tag in after} == {"ok"}
    assert all(seen != "lost" for seen, _ in load.seen.values())
    forwarded = [call["arguments"]["tag"] for call in read_records(record)]
    assert len(forwarded) == len(set(forwarded)) and not during & set(forwarded)
    counted = per_call(events)
    assert all(kinds == Counter(decision=1, outcome=1) for kinds in counted.values()), counted
    decided = {event["arguments"]["tag"] for event in events if event["kind"] == "decision"}
    succeeded = {tag for tag, (seen, _) in load.seen.items() if seen == "ok"}
    assert succeeded <= decided and set(forwarded) <= decided
    # A call forwarded as the database went away has its result withheld (its outcome could not be
    # acknowledged): the client sees an error, and the chain says so once the database is back.
    withheld = set(forwarded) - succeeded
    assert all(load.seen[tag][0] == "error" and "audit log" in load.seen[tag][1] for tag in withheld)
    assert not withheld & after
    call_of = {event["arguments"]["tag"]: event["call_id"] for event in events if event["kind"] == "decision"}
    outcome_of = {event["call_id"]: event for event in events if event["kind"] == "outcome"}
    for tag in withheld:
        recorded = outcome_of[call_of[tag]]
        assert recorded["outcome"] == "refused" and "withheld" in recorded["reason"], recorded
