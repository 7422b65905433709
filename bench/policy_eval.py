"""How long one policy decision takes: `PolicyEngine.evaluate()` alone, no I/O.

    .venv/bin/python bench/policy_eval.py [--calls 20000]

Two tables, each with ratios against its first row (measured in the same run):

1. 10, 100 and 1,000 rules spread evenly over 50 tools (so a tool has 0.2, 2 and 20 rules of its own),
   most with a `when` schema of three properties, some with a rate limit.
2. A tool with 5 rules of its own, plus 10, 100 and 1,000 rules for OTHER tools: the rules that do not
   concern a call's tool are never looked at (indexed per tool), so the cost stays flat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.calls import Who
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies

TOOLS = [f"up{index % 5}__tool{index}" for index in range(50)]
ARGUMENTS = {"path": "/srv/project/src/module.py", "limit": 20, "mode": "read"}


WHEN = {
    "deny": 'when = { required = ["path"], properties = { path = { pattern = "(^|/)\\\\.env$" } } }',
    "allow": (
        'when = { properties = { path = { type = "string", pattern = "^/srv/" }, '
        'limit = { type = "integer", maximum = 100 }, mode = { enum = ["read", "list"] } } }'
    ),
    "rewrite": 'set = { limit = 50 }\nwhen = { required = ["limit"], properties = { limit = { minimum = 51 } } }',
}


def rule(index: int, tool: str) -> str:
    """Rules of four kinds in turn: a conditional deny, allow and rewrite, and a rate-limited allow."""
    text = f'[[rule]]\nid = "r{index}"\ntools = ["{tool}"]\n'
    kind = ("deny", "allow", "rewrite", "rate")[index % 4]
    if kind == "rate":
        return text + 'effect = "allow"\nrate = "1000000/minute"\n'
    return text + f'effect = "{kind}"\n{WHEN[kind]}\n'


def engine_for(rules: list[str]) -> PolicyEngine:
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "bench.toml").write_text("\n".join(rules))
        engine = PolicyEngine(load_policies(Path(directory)))
    engine.index_tools(TOOLS)
    return engine


def measure(engine: PolicyEngine, tools: list[str], calls: int) -> tuple[float, float]:
    """p50 and p99 of one decision, in microseconds."""
    samples = []
    clock = time.perf_counter_ns
    who = Who("agent", "alice", frozenset({"group:users"}), "s")
    for index in range(calls):
        tool = tools[index % len(tools)]
        start = clock()
        engine.evaluate(tool, ARGUMENTS, now=float(index), who=who)
        samples.append((clock() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def table(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(title)
    print(f"  {'case':<44} {'p50 µs':>8} {'p99 µs':>8} {'p50 ratio':>10}")
    base = rows[0][1]
    for name, p50, p99 in rows:
        print(f"  {name:<44} {p50:8.1f} {p99:8.1f} {p50 / base:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    calls = parser.parse_args().calls

    spread = []
    for count in (10, 100, 1000):
        engine = engine_for([rule(index, TOOLS[index % 50]) for index in range(count)])
        measure(engine, TOOLS, calls // 10)  # warm up
        p50, p99 = measure(engine, TOOLS, calls)
        spread.append((f"{count} rules over 50 tools ({count / 50:g} per tool)", p50, p99))
    table("Rules spread over 50 tools (every call's tool has count/50 rules of its own):", spread)

    own = [rule(index, TOOLS[0]) for index in range(5)]
    flat = []
    for count in (10, 100, 1000):
        others = [rule(1000 + index, TOOLS[1 + index % 49]) for index in range(count)]
        engine = engine_for(own + others)
        measure(engine, [TOOLS[0]], calls // 10)
        p50, p99 = measure(engine, [TOOLS[0]], calls)
        flat.append((f"5 own rules + {count} rules for other tools", p50, p99))
    print()
    table("One tool with 5 rules of its own; rules for other tools added:", flat)


if __name__ == "__main__":
    main()
