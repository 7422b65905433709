"""What the gateway costs per call: straight to an upstream vs through the gateway (stdio), interleaved.

    .venv/bin/python bench/call_latency.py [--calls 1000] [--rounds 5] [--poll-idle] [--against DIR]

Each round starts a direct upstream, a bare forwarder (bench/bare_forwarder.py: lines copied, nothing
else) and a gateway in front of the same kind of upstream process (tests/fixtures/toolbox.py, an SDK
server), one after the other, and measures on each:

- cold start: spawn -> `initialize` -> `tools/list` answered;
- sequential `tools/call` latency (p50, p99), with a plain JSON-RPC client over the pipes;
- throughput with 1, 8 and 32 calls in flight on one session;
- CPU time per call of the measured process (the gateway alone, not its upstream; for direct, the
  upstream), from /proc over the sequential and throughput phases;
- peak RSS (VmHWM) of the measured process at the end of the round;
- sequential latency through the SDK's own client (`mcp.Client`, which picks the 2026-07-28 era).

The gateway runs with a policy set of ~100 rules and its durable audit log on disk (SQLite, WAL,
`audit_sync = "normal"`). Prints each figure for the three, the gateway/direct ratio (the targets)
and the gateway/bare ratio (what the gateway's own work costs, beyond crossing one more process).

`--against DIR` measures, in the same interleaved rounds, the gateway of another checkout too (its
`gateway/` package imported from DIR, e.g. `git worktree add /tmp/before REV`), and prints the two
side by side: a change's cost, with the round-to-round noise shared.

`--poll-idle` (root, Linux) holds `/dev/cpu_dma_latency` at 0 for the run, so idle CPUs poll instead
of entering an idle state, as on a machine tuned for latency: a process woken by a pipe then runs at
once, and the figures show what each process's own work costs rather than how slowly an idle CPU
wakes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import tomli_w
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from policy_eval import TOOLS, rule

ROOT = Path(__file__).resolve().parent.parent
TOOLBOX = ROOT / "tests" / "fixtures" / "toolbox.py"
BARE = ROOT / "bench" / "bare_forwarder.py"
IN_FLIGHT = (1, 8, 32)
TICKS = os.sysconf("SC_CLK_TCK")


class Peer(asyncio.SubprocessProtocol):
    """A plain JSON-RPC client over a child's pipes: requests by id, answers routed as they are read."""

    def __init__(self) -> None:
        self.partial = b""
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            message = json.loads(line)
            future = self.waiting.pop(message.get("id"), None) if "method" not in message else None
            if future is not None:
                future.set_result(message)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        for future in self.waiting.values():
            future.set_exception(ConnectionError("the process closed its output"))
        self.waiting.clear()

    def send(self, message: dict[str, Any]) -> None:
        assert self.transport is not None
        stdin = self.transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(json.dumps(message).encode() + b"\n")

    def request(self, method: str, params: dict[str, Any] | None = None) -> asyncio.Future[dict[str, Any]]:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return future

    @property
    def pid(self) -> int:
        assert self.transport is not None
        return self.transport.get_pid()


async def spawn(command: list[str]) -> Peer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.subprocess_exec(
        Peer, *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None
    )
    return peer


async def stop(peer: Peer) -> None:
    assert peer.transport is not None
    stdin = peer.transport.get_pipe_transport(0)
    if stdin is not None:
        stdin.close()
    for _ in range(500):
        if peer.transport.get_returncode() is not None:
            break
        await asyncio.sleep(0.01)
    peer.transport.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def call(peer: Peer, tool: str, index: int) -> asyncio.Future[dict[str, Any]]:
    return peer.request("tools/call", {"name": tool, "arguments": {"text": f"hello {index}"}})


def check(reply: dict[str, Any], tool: str) -> None:
    if "result" not in reply or reply["result"].get("isError"):
        raise RuntimeError(f"{tool} failed: {reply}")


async def sequential(peer: Peer, tool: str, calls: int) -> list[float]:
    samples = []
    for index in range(calls):
        started = time.perf_counter()
        reply = await call(peer, tool, index)
        samples.append((time.perf_counter() - started) * 1000)
        check(reply, tool)
    return samples


async def throughput(peer: Peer, tool: str, calls: int, in_flight: int) -> float:
    """Calls per second with `in_flight` requests outstanding at all times (pipelined on one session)."""
    sent = 0

    async def lane() -> None:
        nonlocal sent
        while sent < calls:
            sent += 1
            check(await call(peer, tool, sent), tool)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return calls / (time.perf_counter() - started)


@dataclass
class Figures:
    cold_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    round_p50_ms: list[float] = field(default_factory=list)
    rate: dict[int, list[float]] = field(default_factory=lambda: {n: [] for n in IN_FLIGHT})
    cpu_ms_per_call: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    sdk_ms: list[float] = field(default_factory=list)


async def open_session(command: list[str], tool: str) -> Peer:
    """Spawn, shake hands, and list the tools (which for the gateway waits until its upstream is up)."""
    peer = await spawn(command)
    await peer.request(
        "initialize",
        {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
    )
    peer.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    listed = await peer.request("tools/list")
    if tool not in {item["name"] for item in listed["result"]["tools"]}:
        raise RuntimeError(f"{tool} is not listed: {listed}")
    return peer


async def measure(command: list[str], tool: str, calls: int) -> list[float]:
    """Sequential latency alone (for bench/audit_cost.py)."""
    peer = await open_session(command, tool)
    await sequential(peer, tool, min(100, calls))  # warm-up
    samples = await sequential(peer, tool, calls)
    await stop(peer)
    return samples


async def round_of(command: list[str], tool: str, calls: int, figures: Figures) -> None:
    started = time.perf_counter()
    peer = await open_session(command, tool)
    figures.cold_ms.append((time.perf_counter() - started) * 1000)
    await sequential(peer, tool, min(100, calls))  # warm-up
    cpu_before = cpu_seconds(peer.pid)
    samples = await sequential(peer, tool, calls)
    figures.latency_ms += samples
    figures.round_p50_ms.append(percentile(samples, 0.5))
    measured = calls
    for in_flight in IN_FLIGHT:
        figures.rate[in_flight].append(await throughput(peer, tool, calls * 2, in_flight))
        measured += calls * 2
    figures.cpu_ms_per_call.append((cpu_seconds(peer.pid) - cpu_before) * 1000 / measured)
    figures.rss_mb.append(peak_rss_mb(peer.pid))
    await stop(peer)


async def sdk_round(command: list[str], tool: str, calls: int, figures: Figures) -> None:
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    async with Client(params) as client:
        for index in range(min(50, calls)):
            await client.call_tool(tool, {"text": f"warm {index}"})
        for index in range(calls // 2):
            started = time.perf_counter()
            result = await client.call_tool(tool, {"text": f"hello {index}"})
            figures.sdk_ms.append((time.perf_counter() - started) * 1000)
            if result.is_error:
                raise RuntimeError(f"{tool} failed through the SDK client: {result}")


POLICY = """
# The call measured: two rules of its own and two result rules, among ~100 rules for other tools.
[[rule]]
id = "echo"
tools = ["box__echo"]
effect = "allow"
when = { required = ["text"], properties = { text = { type = "string", maxLength = 10000 } } }

[[rule]]
id = "echo-no-secrets"
tools = ["box__echo"]
effect = "deny"
when = { properties = { text = { pattern = "(?i)BEGIN [A-Z ]*PRIVATE KEY" } } }

[[rule]]
id = "mask"
tools = ["box__*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']

[[rule]]
id = "withhold"
tools = ["box__*"]
on = "result"
effect = "deny"
when = { required = ["text"], properties = { text = { pattern = "PRIVATE KEY" } } }
"""


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def write_gateway(directory: Path) -> Path:
    config = directory / "upstreams.toml"
    data = {"gateway": {"audit": "audit.db"}, "upstreams": {"box": {"command": sys.executable, "args": [str(TOOLBOX)]}}}
    config.write_text(tomli_w.dumps(data), "utf-8")
    (directory / "policies").mkdir()
    (directory / "policies" / "bench.toml").write_text(POLICY + "\n".join(rule(i, TOOLS[i % 50]) for i in range(96)))
    return config


def gateway_command(config: Path, source: Path | None = None) -> list[str]:
    """The gateway of this checkout, or the one whose `gateway/` package is in `source`."""
    if source is None:
        return [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(config)]
    run = f"import sys; sys.path.insert(0, {str(source)!r}); from gateway.launch import main; raise SystemExit(main())"
    return [sys.executable, "-c", run, "serve", "--quiet", "--config", str(config)]


def report(direct: Figures, bare: Figures, gateway: Figures) -> None:
    rows: list[tuple[str, Callable[[Figures], float], str]] = [
        ("cold start ms (median)", lambda f: statistics.median(f.cold_ms), "<= 1.3x"),
        ("latency p50 ms", lambda f: percentile(f.latency_ms, 0.5), "<= 1.5x"),
        ("latency p99 ms", lambda f: percentile(f.latency_ms, 0.99), ""),
        *(
            (f"calls/s, {n} in flight", (lambda f, n=n: statistics.median(f.rate[n])), target)
            for n, target in zip(IN_FLIGHT, (">= 0.7x", "", ">= 0.85x"), strict=True)
        ),
        ("CPU ms per call (process)", lambda f: statistics.median(f.cpu_ms_per_call), "gw <= 0.5"),
        ("peak RSS MB (process)", lambda f: max(f.rss_mb), "gw <= 60"),
        ("SDK client p50 ms", lambda f: percentile(f.sdk_ms, 0.5), ""),
    ]
    print(f"\n{'':28}{'direct':>10}{'bare':>10}{'gateway':>10}{'gw/direct':>11}  {'target':10}{'gw/bare':>8}")
    for label, measure, target in rows:
        theirs, floor, mine = measure(direct), measure(bare), measure(gateway)
        figures = f"{theirs:10.3f}{floor:10.3f}{mine:10.3f}"
        print(f"{label:28}{figures}{mine / theirs:10.2f}x  {target:10}{mine / floor:7.2f}x")
    for name, figures in (("direct", direct), ("bare", bare), ("gateway", gateway)):
        print(f"p50 of each round, {name}: " + ", ".join(f"{p50:.3f}" for p50 in figures.round_p50_ms) + " ms")


async def main(calls: int, rounds: int, against: Path | None = None) -> None:
    direct, bare, gateway, before = Figures(), Figures(), Figures(), Figures()
    with tempfile.TemporaryDirectory() as directory:
        config = write_gateway(Path(directory))
        commands = {
            "direct": ([sys.executable, str(TOOLBOX)], "echo", direct),
            "bare": ([sys.executable, str(BARE), sys.executable, str(TOOLBOX)], "echo", bare),
            "gateway": (gateway_command(config), "box__echo", gateway),
        }
        if against is not None:  # its own directory: its audit log may be of another schema version
            (Path(directory) / "before").mkdir()
            other = write_gateway(Path(directory) / "before")
            commands["before"] = (gateway_command(other, source=against), "box__echo", before)
        for number in range(1, rounds + 1):
            for command, tool, figures in commands.values():
                await round_of(command, tool, calls, figures)
            for command, tool, figures in commands.values():
                await sdk_round(command, tool, calls, figures)
            print(f"round {number}/{rounds} done", file=sys.stderr)
    print(f"tools/call over stdio, {rounds} interleaved rounds x {calls} sequential calls (+ {2 * calls} per level)")
    report(direct, bare, gateway)
    if against is not None:
        compare(gateway, before, against)


def compare(gateway: Figures, before: Figures, against: Path) -> None:
    """The gateway of this checkout beside the one in `against`, measured in the same rounds."""
    rows: list[tuple[str, Callable[[Figures], float]]] = [
        ("cold start ms (median)", lambda f: statistics.median(f.cold_ms)),
        ("latency p50 ms", lambda f: percentile(f.latency_ms, 0.5)),
        ("latency p99 ms", lambda f: percentile(f.latency_ms, 0.99)),
        *((f"calls/s, {n} in flight", (lambda f, n=n: statistics.median(f.rate[n]))) for n in IN_FLIGHT),
        ("CPU ms per call (process)", lambda f: statistics.median(f.cpu_ms_per_call)),
        ("peak RSS MB (process)", lambda f: max(f.rss_mb)),
        ("SDK client p50 ms", lambda f: percentile(f.sdk_ms, 0.5)),
    ]
    print(f"\nthis checkout against {against}")
    print(f"{'':28}{'before':>10}{'now':>10}{'now/before':>12}")
    for label, measure in rows:
        theirs, mine = measure(before), measure(gateway)
        print(f"{label:28}{theirs:10.3f}{mine:10.3f}{mine / theirs:11.2f}x")


def hold_poll_idle() -> int:
    """Ask the kernel for zero wake-up latency (PM QoS) until the returned descriptor is closed."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"--poll-idle: cannot open /dev/cpu_dma_latency ({exc.strerror}; it needs root)") from None
    os.write(fd, (0).to_bytes(4, sys.byteorder))
    return fd


def run_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--poll-idle", action="store_true", help="hold /dev/cpu_dma_latency at 0: idle CPUs poll (root)"
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="DIR",
        help="also measure, in the same rounds, the gateway of another checkout (e.g. a worktree of an older commit)",
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    held = hold_poll_idle() if args.poll_idle else None
    try:
        anyio.run(main, args.calls, args.rounds, args.against and args.against.resolve())
    finally:
        if held is not None:
            os.close(held)
    if held is not None:
        print("(idle CPUs polled for this run: /dev/cpu_dma_latency held at 0)")


if __name__ == "__main__":
    run_main()
