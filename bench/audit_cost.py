"""What the durable audit costs: sustained recording throughput, and the latency it adds per call.

    .venv/bin/python bench/audit_cost.py [--events 20000] [--calls 500] [--rounds 3]

Throughput: the recorder writing to a real SQLite file, one caller recording events one after the
other (each waits until its event is recorded: the baseline) against 64 concurrent callers, for
`audit_sync = "normal"` (a caller alone is done once its event is in the journal, commits to the
chain follow in groups; concurrent callers share commits) and `"full"` (each caller waits for an
fsynced group commit). Latency: sequential
`tools/call` through the gateway with its audit log on disk against the same gateway keeping the
log in memory (`audit = ":memory:"`: no journal, so every event waits for its commit), interleaved,
same policy set of ~100 rules as bench/call_latency.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import tomli_w
from call_latency import POLICY, TOOLBOX, measure, percentile
from policy_eval import TOOLS, rule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.audit.events import event
from gateway.audit.recorder import Recorder

PRODUCERS = 64


def sample_event(index: int) -> dict[str, object]:
    return event(
        "decision",
        session_id="8f14e45fceea167a5a36dedd4bea2543",
        call_id=f"{index:032x}",
        upstream="box",
        tool="box__echo",
        arguments={"text": f"hello {index}"},
        decision="allow",
        rules=["echo"],
        reason="allowed by rule 'echo'",
        policy_revision="0123456789abcdef",
    )


async def throughput(path: Path, sync: str, events: int, producers: int) -> float:
    recorder = Recorder(path, sync=sync)
    async with recorder.running():
        per_producer = events // producers

        async def produce(offset: int) -> None:
            for index in range(per_producer):
                await recorder.record(sample_event(offset + index), alone=producers == 1)

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for number in range(producers):
                tg.start_soon(produce, number * per_producer)
        elapsed = time.perf_counter() - started
    return per_producer * producers / elapsed


async def main(events: int, calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        print(f"audit recording throughput, {events} events each (events recorded per second)")
        print(f"{'audit_sync':12}{'1 caller':>14}{f'{PRODUCERS} callers':>14}{'ratio':>8}")
        for sync in ("normal", "full"):
            count = events if sync == "normal" else events // 10
            single = await throughput(root / f"single-{sync}.db", sync, count, 1)
            grouped = await throughput(root / f"group-{sync}.db", sync, count, PRODUCERS)
            print(f"{sync:12}{single:14,.0f}{grouped:14,.0f}{grouped / single:7.1f}x")

        policies = root / "policies"
        policies.mkdir()
        (policies / "bench.toml").write_text(POLICY + "\n".join(rule(i, TOOLS[i % 50]) for i in range(96)))
        commands = {}
        for label, audit in (("in memory", ":memory:"), ("on disk", "audit.db")):
            config = root / f"{label.replace(' ', '-')}.toml"
            data = {
                "gateway": {"audit": audit, "policies": "policies"},
                "upstreams": {"box": {"command": sys.executable, "args": [str(TOOLBOX)]}},
            }
            config.write_text(tomli_w.dumps(data), "utf-8")
            commands[label] = [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(config)]
        samples: dict[str, list[float]] = {label: [] for label in commands}
        for round_number in range(1, rounds + 1):
            for label, command in commands.items():
                samples[label] += await measure(command, "box__echo", calls)
            print(f"round {round_number}/{rounds} done", file=sys.stderr)
    print(f"\nsequential tools/call through the gateway, {rounds} interleaved rounds x {calls} calls")
    print(f"{'audit log':12}{'p50 ms':>10}{'p99 ms':>10}")
    for label, values in samples.items():
        print(f"{label:12}{percentile(values, 0.5):10.3f}{percentile(values, 0.99):10.3f}")
    memory, disk = samples["in memory"], samples["on disk"]
    added = (percentile(disk, 0.5) - percentile(memory, 0.5)) * 1000
    ratio = percentile(disk, 0.5) / percentile(memory, 0.5)
    print(f"{'ratio':12}{ratio:9.2f}x{percentile(disk, 0.99) / percentile(memory, 0.99):9.2f}x")
    print(f"the log on disk adds {added:.0f} us per call at p50 (negative: it saves that much)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.events, args.calls, args.rounds)
