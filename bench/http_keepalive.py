"""tools/call over streamable HTTP with a keep-alive client: the SDK's own server vs the gateway, interleaved.

    .venv/bin/python bench/http_keepalive.py [--calls 300] [--rounds 3]

The same upstream (tests/fixtures/toolbox.py, an SDK server) is served two ways:

- direct: by the SDK's streamable HTTP app under uvicorn (bench/sdk_http_server.py);
- gateway: `mcp-armor serve --http 127.0.0.1:0` fronting it as a command upstream, with a policy set
  of ~100 rules and its durable audit log on disk.

One client (httpx, one connection kept alive for the whole session, as most HTTP libraries and
`curl` with several URLs do) opens a handshake-era session on each and makes sequential
`tools/call` requests. Prints p50/p99 of each and the gateway/direct ratio. A server whose accepted
connections leave Nagle's algorithm on shows ~40 ms per request here (the body waits for the
client's delayed ACK), however fast it is otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
from call_latency import percentile, write_gateway

ROOT = Path(__file__).resolve().parent.parent
SDK_SERVER = ROOT / "bench" / "sdk_http_server.py"
ACCEPT = "application/json, text/event-stream"


@contextmanager
def launched(command: list[str], pattern: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start a server process and yield the URL its stderr announces, and the process."""
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in proc.stderr:
            if match := re.search(pattern, line):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{command[1]} did not start: {line}")
        else:
            raise SystemExit(f"{command[1]} exited before serving")
        yield match[1], proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def serving(command: list[str], pattern: str) -> Iterator[str]:
    """Start a server process and yield the URL its stderr announces."""
    with launched(command, pattern) as (url, _):
        yield url


def answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a response, sent as JSON or as one server-sent event."""
    response.raise_for_status()
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return dict(json.loads(data[-1]))
    return dict(response.json())


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def session_headers(response: httpx.Response) -> dict[str, str]:
    """The headers every later request of the handshake-era session `response` (to `initialize`) opened carries."""
    answer(response)
    return {"mcp-session-id": response.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}


def tool_call(tool: str, index: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": index,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"text": f"call {index}"}},
    }


def session_calls(url: str, tool: str, calls: int) -> list[float]:
    """Open a session on one kept-alive connection; the latency of each sequential call, in ms."""
    with httpx.Client(timeout=30, headers={"accept": ACCEPT}) as client:
        headers = session_headers(client.post(url, json=INITIALIZE))
        client.post(url, json=INITIALIZED, headers=headers)
        samples = []
        for index in range(1, calls + 1):
            start = time.perf_counter()
            reply = answer(client.post(url, json=tool_call(tool, index), headers=headers))
            samples.append((time.perf_counter() - start) * 1000)
            if reply.get("result", {}).get("isError", True):
                raise SystemExit(f"{tool} failed: {reply}")
        client.delete(url, headers=headers)
        return samples


def main(calls: int, rounds: int) -> None:
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    round_p50: dict[str, list[float]] = {"direct": [], "gateway": []}
    announced = r"serving streamable HTTP at (http://\S+/mcp)"
    with tempfile.TemporaryDirectory() as directory:
        config = write_gateway(Path(directory))
        servers = {
            "direct": ([sys.executable, str(SDK_SERVER)], announced, "echo"),
            "gateway": (
                [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(config), "--http", "127.0.0.1:0"],
                announced,
                "box__echo",
            ),
        }
        for number in range(1, rounds + 1):
            for name, (command, pattern, tool) in servers.items():
                with serving(command, pattern) as url:
                    session_calls(url, tool, 20)  # warm up: imports, the upstream's start, first compiles
                    measured = session_calls(url, tool, calls)
                samples[name] += measured
                round_p50[name].append(statistics.median(measured))
            print(f"round {number}/{rounds} done", file=sys.stderr)
    print(f"tools/call over streamable HTTP, one keep-alive connection, {rounds} rounds x {calls} sequential calls")
    print(f"\n{'':16}{'direct (SDK)':>14}{'gateway':>10}{'gw/direct':>11}")
    for label, fraction in (("latency p50 ms", 0.5), ("latency p99 ms", 0.99)):
        theirs, mine = percentile(samples["direct"], fraction), percentile(samples["gateway"], fraction)
        print(f"{label:16}{theirs:14.3f}{mine:10.3f}{mine / theirs:10.2f}x")
    for name, p50s in round_p50.items():
        print(f"p50 of each round, {name}: " + ", ".join(f"{p50:.3f}" for p50 in p50s) + " ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.calls, args.rounds)
