"""Other sessions' latency while one session sends arguments built to stall a backtracking regex engine.

    .venv/bin/python bench/hostile_patterns.py [--calls 300] [--rounds 3] [--length 20] [--against DIR]

A gateway serves streamable HTTP in front of two upstreams: tests/fixtures/toolbox.py and
tests/fixtures/hostile_schema.py, whose tool `match` declares `"pattern": "^(a|a)+$"` in its own
inputSchema. One session (the victim) makes sequential `box__echo` calls and records their latency
while a second session sends `hostile__match` calls back to back; in each round it does so twice on
the same gateway, under the same load: with a benign argument the pattern rejects at once
(`"b" * (LENGTH + 1)`: the baseline), and with the hostile one (`"a" * LENGTH + "!"`). Both are
refused by the tool's schema. Prints the victim's p50 and p99 in both phases, the p99 ratio, and how
many of the second session's calls were answered.

Python's `re` takes 2^LENGTH steps for each hostile argument (about 0.1 s at 20 characters, 1.5 s at
24, doubling with each one more); the gateway's engine takes linear time at any length. `--against DIR`
measures the gateway of another checkout in the same rounds (e.g. `git worktree add /tmp/before REV`);
keep `--length` small then, or its hostile calls hold every session for minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import tomli_w
from call_latency import gateway_command, percentile
from http_keepalive import ACCEPT, answer, serving

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
ANNOUNCED = r"serving streamable HTTP at (http://\S+/mcp)"


class Session:
    """One handshake-era session on one kept-alive connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(timeout=600, headers={"accept": ACCEPT})
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
        response = self.client.post(url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        answer(response)
        self.headers = {"mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        self.client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=self.headers)
        self.next_id = 1

    def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call"}
        request["params"] = {"name": tool, "arguments": arguments}
        self.next_id += 1
        return answer(self.client.post(self.url, json=request, headers=self.headers))

    def close(self) -> None:
        self.client.delete(self.url, headers=self.headers)
        self.client.close()


def victim_calls(session: Session, calls: int) -> list[float]:
    samples = []
    for index in range(calls):
        start = time.perf_counter()
        reply = session.call("box__echo", {"text": f"call {index}"})
        samples.append((time.perf_counter() - start) * 1000)
        if reply.get("result", {}).get("isError", True):
            raise SystemExit(f"box__echo failed: {reply}")
    return samples


def other_calls(session: Session, argument: str, stop: threading.Event, answered: list[int]) -> None:
    while not stop.is_set():
        reply = session.call("hostile__match", {"text": argument})
        if not reply.get("result", {}).get("isError"):
            raise SystemExit(f"an argument that breaks the schema was not refused: {reply}")
        answered[0] += 1


def beside(victim: Session, other: Session, calls: int, argument: str) -> tuple[list[float], int]:
    """The victim's latencies while `other` sends `argument` back to back, and its calls answered."""
    stop, answered = threading.Event(), [0]
    thread = threading.Thread(target=other_calls, args=(other, argument, stop, answered))
    thread.start()
    try:
        return victim_calls(victim, calls), answered[0]
    finally:
        stop.set()
        thread.join()


def measure(command: list[str], calls: int, length: int) -> dict[str, tuple[list[float], int]]:
    """The victim's latencies and the other session's calls answered, under benign and hostile load."""
    with serving(command, ANNOUNCED) as url:
        victim, other = Session(url), Session(url)
        victim_calls(victim, 20)  # warm up: imports, the upstreams' start, first compiles
        found = {
            "baseline": beside(victim, other, calls, "b" * (length + 1)),
            "hostile": beside(victim, other, calls, "a" * length + "!"),
        }
        victim.close()
        other.close()
    return found


def main(calls: int, rounds: int, length: int, against: Path | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "upstreams.toml"
        upstreams = {
            name: {"command": sys.executable, "args": [str(FIXTURES / script)]}
            for name, script in (("box", "toolbox.py"), ("hostile", "hostile_schema.py"))
        }
        config.write_text(tomli_w.dumps({"gateway": {"audit": "audit.db"}, "upstreams": upstreams}), "utf-8")
        (Path(directory) / "policies").mkdir()
        (Path(directory) / "policies" / "bench.toml").write_text('[defaults]\neffect = "allow"\n', "utf-8")
        gateways = {"this checkout": [*gateway_command(config), "--http", "127.0.0.1:0"]}
        if against is not None:
            gateways[str(against)] = [*gateway_command(config, source=against), "--http", "127.0.0.1:0"]
        figures = {name: {"baseline": ([], 0), "hostile": ([], 0)} for name in gateways}
        for number in range(1, rounds + 1):
            for name, command in gateways.items():
                for phase, (samples, answered) in measure(command, calls, length).items():
                    kept, total = figures[name][phase]
                    figures[name][phase] = (kept + samples, total + answered)
            print(f"round {number}/{rounds} done", file=sys.stderr)
    print(f"box__echo latency of one session, {rounds} rounds x {calls} sequential calls, while another session")
    print(f"sends hostile__match ('^(a|a)+$') calls back to back: {length + 1} b's (baseline) or {length} a's and '!'")
    columns = ("baseline p50", 13), ("p99", 9), ("hostile p50", 13), ("p99", 9), ("p99 ratio", 11), ("other calls", 16)
    print("\n" + f"{'gateway':<28}" + "".join(f"{title:>{width}}" for title, width in columns))
    for name, found in figures.items():
        (base, base_answered), (hostile, hostile_answered) = found["baseline"], found["hostile"]
        base_p99, hostile_p99 = percentile(base, 0.99), percentile(hostile, 0.99)
        print(
            f"{name[-28:]:<28}{percentile(base, 0.5):13.3f}{base_p99:9.3f}{percentile(hostile, 0.5):13.3f}"
            f"{hostile_p99:9.3f}{hostile_p99 / base_p99:10.2f}x{base_answered:8d} /{hostile_answered:6d}"
        )
    print("(latencies in ms; other calls: the other session's calls answered, baseline / hostile, all refused)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--length", type=int, default=20, help="hostile argument: this many a's, then '!'")
    parser.add_argument("--against", type=Path, help="a checkout whose gateway is measured too")
    args = parser.parse_args()
    main(args.calls, args.rounds, args.length, args.against and args.against.resolve())
