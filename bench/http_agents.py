"""Many agents at once over streamable HTTP: the SDK's own server vs the gateway, interleaved.

    .venv/bin/python bench/http_agents.py [--rounds 3] [--calls 600] [--agents 1,16,64] [--quick]

The same upstream (tests/fixtures/toolbox.py) is served two ways, as in bench/http_keepalive.py:
directly by the SDK's streamable HTTP app under uvicorn, and through `mcp-armor serve --http`
fronting it as a command upstream, with ~100 rules and its durable audit log on disk. Each round
starts one, then the other, and on each runs, for every number of agents, `--calls` sequential
`tools/call` requests shared among that many agents, each agent its own handshake-era session:

- plain: httpx, one client (one kept-alive connection) per agent;
- sdk: the SDK's own client (`mcp.Client` over `streamable_http_client`, `mode="legacy"`: a session).

Prints per configuration calls/s (sessions open before the clock starts), p50/p99, errors, the
measured server's CPU per call (its own process; the gateway's upstream is another), and the
ratios gateway/direct; the server's RSS with the largest number of agents' sessions open; the RSS
1,000 idle sessions (`initialize` + `notifications/initialized`) add; and whether the gateway's
audit log holds one decision and one outcome event for every call made through it.

The machine these run on is usually shared: CPU per call and the ratios within one run say more
than absolute calls/s.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx2 as httpx
from call_latency import cpu_seconds, percentile, write_gateway
from http_keepalive import (
    ACCEPT,
    INITIALIZE,
    INITIALIZED,
    SDK_SERVER,
    answer,
    launched,
    session_headers,
    tool_call,
)
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ANNOUNCED = r"serving streamable HTTP at (http://\S+/mcp)"
CLIENTS = ("plain", "sdk")
IDLE_SESSIONS = 1000
WARM_UP_CALLS = 20


@dataclass
class Figures:
    """What one configuration (server, client, agents) measured over every round."""

    latency_ms: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    cpu_ms_per_call: list[float] = field(default_factory=list)
    errors: int = 0


@dataclass
class Phase:
    """One run of N agents: when to start calling, and when to let go of the sessions."""

    agents: int
    calls: int
    ready: int = 0
    go: anyio.Event = field(default_factory=anyio.Event)
    all_ready: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)
    samples: list[float] = field(default_factory=list)
    errors: int = 0

    async def start_together(self) -> None:
        self.ready += 1
        if self.ready == self.agents:
            self.all_ready.set()
        await self.go.wait()

    def record(self, started: float, ok: bool) -> None:
        self.samples.append((time.perf_counter() - started) * 1000)
        self.errors += not ok
        if len(self.samples) == self.calls:
            self.done.set()


Agent = Callable[[str, str, int, Phase], Awaitable[None]]


async def plain_agent(url: str, tool: str, calls: int, phase: Phase) -> None:
    """One session on one kept-alive httpx connection, sequential calls."""
    async with httpx.AsyncClient(timeout=60, headers={"accept": ACCEPT}) as client:
        headers = session_headers(await client.post(url, json=INITIALIZE))
        await client.post(url, json=INITIALIZED, headers=headers)
        await phase.start_together()
        for index in range(1, calls + 1):
            started = time.perf_counter()
            try:
                reply = answer(await client.post(url, json=tool_call(tool, index), headers=headers))
                ok = not reply.get("result", {}).get("isError", True)
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            phase.record(started, ok)
        await phase.release.wait()
        await client.delete(url, headers=headers)


async def sdk_agent(url: str, tool: str, calls: int, phase: Phase) -> None:
    """One session through the SDK's client, sequential calls."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        await phase.start_together()
        for index in range(1, calls + 1):
            started = time.perf_counter()
            try:
                result = await client.call_tool(tool, {"text": f"call {index}"})
                ok = not result.is_error
            except Exception:  # a lost call is counted, not raised: the run goes on
                ok = False
            phase.record(started, ok)
        await phase.release.wait()


AGENTS: dict[str, Agent] = {"plain": plain_agent, "sdk": sdk_agent}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_phase(url: str, tool: str, pid: int, client: str, agents: int, calls: int, figures: Figures) -> float:
    """`calls` calls shared among `agents` sessions at once; the server's RSS while they were all open."""
    phase = Phase(agents, calls)
    share = [calls // agents + (index < calls % agents) for index in range(agents)]
    async with anyio.create_task_group() as tg:
        for count in share:
            tg.start_soon(AGENTS[client], url, tool, count, phase)
        with anyio.fail_after(120):
            await phase.all_ready.wait()
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        phase.go.set()
        with anyio.fail_after(600):
            await phase.done.wait()
        elapsed = time.perf_counter() - started
        figures.cpu_ms_per_call.append((cpu_seconds(pid) - cpu_before) * 1000 / calls)
        held = rss_mb(pid)
        phase.release.set()
    figures.rate.append(calls / elapsed)
    figures.latency_ms += phase.samples
    figures.errors += phase.errors
    return held


async def idle_sessions(url: str, pid: int, count: int) -> float:
    """Open `count` handshake-era sessions and leave them idle; the RSS they added, in MB."""
    before = rss_mb(pid)
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(timeout=60, headers={"accept": ACCEPT}, limits=limits) as client:
        opened: list[dict[str, str]] = []

        async def open_some(how_many: int) -> None:
            for _ in range(how_many):
                headers = session_headers(await client.post(url, json=INITIALIZE))
                (await client.post(url, json=INITIALIZED, headers=headers)).raise_for_status()
                opened.append(headers)

        async with anyio.create_task_group() as tg:
            for index in range(16):
                tg.start_soon(open_some, count // 16 + (index < count % 16))
        added = rss_mb(pid) - before
        if len(opened) != count:
            raise SystemExit(f"opened {len(opened)} of {count} idle sessions")
    return added


def audited(directory: Path) -> dict[str, int]:
    """How many decision and outcome events the gateway's audit log holds (the gateway stopped)."""
    with sqlite3.connect(f"file:{directory / 'audit.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT kind, count(*) FROM events WHERE kind IN ('decision', 'outcome') GROUP BY kind")
        counts = dict(rows.fetchall())
    return {kind: counts.get(kind, 0) for kind in ("decision", "outcome")}


@dataclass
class Server:
    command: list[str]
    tool: str
    figures: dict[tuple[str, int], Figures]
    rss_with_sessions: list[float] = field(default_factory=list)
    idle_added: list[float] = field(default_factory=list)
    calls_made: int = 0


async def round_of(server: Server, agent_counts: list[int], calls: int, idle: bool) -> None:
    with launched(server.command, ANNOUNCED) as (url, proc):
        warm = Figures()
        await run_phase(url, server.tool, proc.pid, "plain", 1, WARM_UP_CALLS, warm)
        server.calls_made += WARM_UP_CALLS
        for agents in agent_counts:
            for client in CLIENTS:
                figures = server.figures[client, agents]
                held = await run_phase(url, server.tool, proc.pid, client, agents, calls, figures)
                server.calls_made += calls
                if agents == max(agent_counts):
                    server.rss_with_sessions.append(held)
        if idle:
            server.idle_added.append(await idle_sessions(url, proc.pid, IDLE_SESSIONS))


def ratio_row(label: str, direct: float, gateway: float, digits: int = 1) -> str:
    return f"{label:34}{direct:12.{digits}f}{gateway:12.{digits}f}{gateway / direct:10.2f}x"


def report(direct: Server, gateway: Server, agent_counts: list[int], calls: int, rounds: int) -> dict[str, float]:
    """Print the figures; return the ones the targets are about."""
    print(f"tools/call over streamable HTTP, {rounds} interleaved rounds x {calls} calls per configuration")
    print(f"\n{'':34}{'direct (SDK)':>12}{'gateway':>12}{'gw/direct':>11}")
    facts: dict[str, float] = {}
    for agents in agent_counts:
        for client in CLIENTS:
            mine, theirs = gateway.figures[client, agents], direct.figures[client, agents]
            name = f"{client}, {agents} agent{'s' if agents > 1 else ''}"
            rate = (statistics.median(theirs.rate), statistics.median(mine.rate))
            p50 = (percentile(theirs.latency_ms, 0.5), percentile(mine.latency_ms, 0.5))
            p99 = (percentile(theirs.latency_ms, 0.99), percentile(mine.latency_ms, 0.99))
            cpu = (statistics.median(theirs.cpu_ms_per_call), statistics.median(mine.cpu_ms_per_call))
            print(ratio_row(f"{name}: calls/s", *rate))
            print(ratio_row(f"{name}: p50 ms", *p50, digits=2))
            print(ratio_row(f"{name}: p99 ms", *p99, digits=2))
            print(ratio_row(f"{name}: server CPU ms/call", *cpu, digits=3))
            print(f"{name + ': errors':34}{theirs.errors:12}{mine.errors:12}")
            facts[f"rate {client} {agents}"] = rate[1] / rate[0]
            facts[f"p50 {client} {agents}"] = p50[1] / p50[0]
    most = max(agent_counts)
    held = (max(direct.rss_with_sessions), max(gateway.rss_with_sessions))
    print(ratio_row(f"RSS MB, {most} sessions open", *held))
    facts["rss"] = held[1]
    if gateway.idle_added:
        idle = (max(direct.idle_added), max(gateway.idle_added))
        print(ratio_row(f"RSS MB added by {IDLE_SESSIONS:,} idle sessions", *idle))
        facts["idle"] = idle[1]
    return facts


def targets(facts: dict[str, float], agent_counts: list[int]) -> None:
    print("\ntargets (gateway)")
    lines = []
    for client in CLIENTS:
        lines += [
            (f"calls/s {client}, {n} agents >= 0.9x direct", facts[f"rate {client} {n}"], 0.9, "x", True)
            for n in (16, 64)
            if n in agent_counts
        ]
        if 1 in agent_counts:
            lines.append((f"p50 {client}, 1 agent <= 1.3x direct", facts[f"p50 {client} 1"], 1.3, "x", False))
    lines.append((f"RSS with {max(agent_counts)} sessions <= 100 MB", facts["rss"], 100, " MB", False))
    if "idle" in facts:
        lines.append((f"{IDLE_SESSIONS:,} idle sessions add <= 50 MB", facts["idle"], 50, " MB", False))
    for label, value, bound, unit, at_least in lines:
        met = value >= bound if at_least else value <= bound
        print(f"  {label:42}{value:9.2f}{unit:4}{'met' if met else 'NOT MET'}")


async def main(rounds: int, calls: int, agent_counts: list[int]) -> None:
    def configurations() -> dict[tuple[str, int], Figures]:
        return {(client, agents): Figures() for agents in agent_counts for client in CLIENTS}

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        config = write_gateway(directory)
        direct = Server([sys.executable, str(SDK_SERVER)], "echo", configurations())
        gateway_command = [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(config)]
        gateway = Server([*gateway_command, "--http", "127.0.0.1:0"], "box__echo", configurations())
        for number in range(1, rounds + 1):
            for server in (direct, gateway) if number % 2 else (gateway, direct):
                await round_of(server, agent_counts, calls, idle=number == rounds)
            print(f"round {number}/{rounds} done", file=sys.stderr)
        facts = report(direct, gateway, agent_counts, calls, rounds)
        counts = audited(directory)
    made = gateway.calls_made
    lost = {kind: made - count for kind, count in counts.items() if count != made}
    print(f"\naudit: {made} calls through the gateway; " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    print("  no call lost" if not lost else f"  MISSING EVENTS: {lost}")
    targets(facts, agent_counts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=600, help="calls per configuration, shared among its agents")
    parser.add_argument("--agents", default="1,16,64", help="comma-separated numbers of agents at once")
    parser.add_argument("--quick", action="store_true", help="one round of 256 calls per configuration")
    args = parser.parse_args()
    counts = sorted({int(part) for part in args.agents.split(",")})
    rounds, calls = (1, 256) if args.quick else (args.rounds, args.calls)
    anyio.run(main, rounds, calls, counts)
