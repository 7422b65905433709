"""How quickly the approval queue carries a decision to the waiting call, against a plain call in the same run.

    .venv/bin/python bench/approvals.py [--calls 40]

One gateway (stdio, audit on disk) in front of tests/fixtures/toolbox.py, driven by the SDK's client
without elicitation, so an asked call waits in the queue. Interleaved, one at a time:

- baseline: `box__echo`, which the policy allows: the whole round trip;
- entered: from sending `box__write_note` (which a rule asks about) until its row is in the queue;
- released: from `ApprovalQueue.decide` (as `mcp-armor approvals approve` and the console call it)
  until the agent has the call's result: the queue's poll, the spend, the audit, the upstream.

Prints p50/p90/max of each and the ratio of each p50 to the baseline's. The stated bound: a decision
reaches its call within the poll interval (`gateway.audit.approvals.POLL`) plus one call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import tomli_w
from mcp import Client
from mcp.client.stdio import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.audit.approvals import POLL, ApprovalQueue  # noqa: E402

POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "notes"
tools = ["box__write_note"]
effect = "ask"
"""


def _config(directory: Path) -> Path:
    box = {"command": sys.executable, "args": [str(ROOT / "tests" / "fixtures" / "toolbox.py")]}
    path = directory / "upstreams.toml"
    path.write_text(tomli_w.dumps({"gateway": {"startup_timeout": "30s"}, "upstreams": {"box": box}}))
    (directory / "policies").mkdir()
    (directory / "policies" / "bench.toml").write_text(POLICY)
    return path


def _summary(name: str, values: list[float], baseline: float) -> str:
    ordered = sorted(values)
    p50 = statistics.median(ordered)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    ratio = f"{p50 / baseline:5.2f}x baseline" if baseline else ""
    return f"{name:<9} p50 {p50 * 1000:7.2f} ms  p90 {p90 * 1000:7.2f} ms  max {ordered[-1] * 1000:7.2f} ms  {ratio}"


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        config = _config(Path(scratch))
        queue = ApprovalQueue(config.parent / ".mcp-armor" / "approvals.db")
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "gateway", "serve", "--quiet", "--config", str(config)], cwd=str(ROOT)
        )
        plain: list[float] = []
        entered: list[float] = []
        released: list[float] = []
        async with Client(params, read_timeout_seconds=60) as client:
            for _ in range(3):  # warm up both paths
                await client.call_tool("box__echo", {"text": "warm"})
            for index in range(calls):
                started = time.perf_counter()
                await client.call_tool("box__echo", {"text": f"plain {index}"})
                plain.append(time.perf_counter() - started)
                async with anyio.create_task_group() as tg:
                    sent = time.perf_counter()
                    tg.start_soon(client.call_tool, "box__write_note", {"path": f"notes/{index}", "body": "x"})
                    while not (waiting := queue.entries(pending_only=True, limit=1)):  # noqa: ASYNC110 - another process's file
                        await anyio.sleep(0.001)
                    entered.append(time.perf_counter() - sent)
                    decided = time.perf_counter()
                    queue.decide(waiting[0].id, approve=True, by="bench", channel="cli")
                # the task group has waited for the call's result
                released.append(time.perf_counter() - decided)
        baseline = statistics.median(plain)
        print(f"approval queue, {calls} calls each, one at a time (poll interval {POLL * 1000:.0f} ms)")
        print(_summary("baseline", plain, 0.0))
        print(_summary("entered", entered, baseline))
        print(_summary("released", released, baseline))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    anyio.run(main, parser.parse_args().calls)
