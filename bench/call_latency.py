"""Sequential `tools/call` latency: straight to an upstream vs through the gateway (stdio), interleaved.

    .venv/bin/python bench/call_latency.py [--calls 500] [--rounds 3]

Each round starts one direct upstream and one gateway (in front of the same kind of upstream process),
then times N sequential calls on each, alternating direct and gateway. A plain JSON-RPC client over
the pipes does the timing, so the client adds as little as possible. Prints p50/p99 in milliseconds
for both and the gateway/direct ratio. The gateway runs with a realistic policy set of ~100 rules.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import tomli_w
from anyio.abc import Process
from policy_eval import TOOLS, rule

ROOT = Path(__file__).resolve().parent.parent
TOOLBOX = ROOT / "tests" / "fixtures" / "toolbox.py"


class RawClient:
    """Newline-delimited JSON-RPC over a child's pipes, handshake era."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.buffer = b""
        self.next_id = 0

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.process.stdin.send(json.dumps(message).encode() + b"\n")
        while True:
            while b"\n" not in self.buffer:
                self.buffer += await self.process.stdout.receive()
            line, _, self.buffer = self.buffer.partition(b"\n")
            reply = json.loads(line)
            if reply.get("id") == self.next_id:
                return reply

    async def initialize(self) -> None:
        await self.request(
            "initialize",
            {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
        )
        assert self.process.stdin is not None
        await self.process.stdin.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')


async def time_calls(client: RawClient, tool: str, calls: int) -> list[float]:
    await client.request("tools/list")
    samples = []
    for index in range(calls):
        started = time.perf_counter()
        reply = await client.request("tools/call", {"name": tool, "arguments": {"text": f"hello {index}"}})
        samples.append((time.perf_counter() - started) * 1000)
        if "result" not in reply or reply["result"].get("isError"):
            raise RuntimeError(f"{tool} failed: {reply}")
    return samples


async def measure(command: list[str], tool: str, calls: int) -> list[float]:
    async with await anyio.open_process(command, stderr=None) as process:
        client = RawClient(process)
        await client.initialize()
        await time_calls(client, tool, min(50, calls))  # warm-up
        samples = await time_calls(client, tool, calls)
        assert process.stdin is not None
        await process.stdin.aclose()
        await process.wait()
        return samples


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


async def main(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "upstreams.toml"
        config.write_text(
            tomli_w.dumps({"upstreams": {"box": {"command": sys.executable, "args": [str(TOOLBOX)]}}}), "utf-8"
        )
        (Path(directory) / "policies").mkdir()
        (Path(directory) / "policies" / "bench.toml").write_text(
            POLICY + "\n".join(rule(i, TOOLS[i % 50]) for i in range(96))
        )
        direct_cmd = [sys.executable, str(TOOLBOX)]
        gateway_cmd = [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(config)]
        direct: list[float] = []
        gateway: list[float] = []
        for round_number in range(1, rounds + 1):
            direct += await measure(direct_cmd, "echo", calls)
            gateway += await measure(gateway_cmd, "box__echo", calls)
            print(f"round {round_number}/{rounds} done", file=sys.stderr)
    print(f"sequential tools/call over stdio, {rounds} interleaved rounds x {calls} calls")
    print(f"{'':10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for label, samples in (("direct", direct), ("gateway", gateway)):
        print(
            f"{label:10}{percentile(samples, 0.5):10.3f}{percentile(samples, 0.99):10.3f}"
            f"{statistics.fmean(samples):10.3f}"
        )
    p50 = percentile(gateway, 0.5) / percentile(direct, 0.5)
    p99 = percentile(gateway, 0.99) / percentile(direct, 0.99)
    print(f"{'ratio':10}{p50:10.2f}x{p99:9.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.calls, args.rounds)
