"""What hostile volume costs the gateway: a 48 MB upstream result, and 30,000 calls pushed at once.

    .venv/bin/python bench/wire_load.py [--size-mb 48] [--calls 30000] [--against DIR]

`big`: one `tools/call` whose answer is SIZE MB of text (tests/fixtures/wild.py, a raw JSON-RPC
server), through the bare forwarder (bench/bare_forwarder.py: lines copied, the floor for a Python
process in the middle) and through the gateway; the CPU time (from /proc) and peak RSS (VmHWM) of
the process in the middle, and the ratio gateway / bare.

`burst`: CALLS `tools/call` written to the gateway in one go, as fast as the pipe takes them; the
gateway's peak RSS and CPU time, how many were refused as busy, and the time until the last answer.

`--against DIR` measures the gateway of another checkout too (its `gateway/` imported from DIR, e.g.
`git worktree add /tmp/before REV`), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
from call_latency import cpu_seconds, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
WILD = ROOT / "tests" / "fixtures" / "wild.py"
BARE = ROOT / "bench" / "bare_forwarder.py"


def config(directory: Path, **gateway: Any) -> Path:
    path = directory / "upstreams.toml"
    upstream = {"command": sys.executable, "args": [str(WILD)]}
    data = {"gateway": {"audit": ":memory:", **gateway}, "upstreams": {"wild": upstream}}
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "all.toml").write_text('[defaults]\neffect = "allow"\n', encoding="utf-8")
    return path


def line(message: dict[str, Any]) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode()


INIT = line(
    {
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "b", "version": "1"}},
    }
) + line({"method": "notifications/initialized"})


def call(request_id: int, tool: str, **arguments: Any) -> bytes:
    return line({"id": request_id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`argv` started; in the checkout `env` names (`python -m` imports from the current directory first)."""
    cwd = (env or {}).get("PYTHONPATH", str(ROOT))
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd
    )


def read_answers(proc: subprocess.Popen[bytes], count: int) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    answers = []
    while len(answers) < count:
        raw = proc.stdout.readline()
        if not raw:
            raise RuntimeError("the process ended before answering")
        message = json.loads(raw)
        if "id" in message and "method" not in message:
            answers.append(message)
    return answers


def gateway_argv(path: Path, against: str | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if against is not None:
        env["PYTHONPATH"] = against
    return [sys.executable, "-m", "gateway", "serve", "--quiet", "--config", str(path)], env


def big(argv: list[str], env: dict[str, str] | None, size: int, tool: str) -> tuple[float, float]:
    proc = start(argv, env)
    assert proc.stdin is not None
    proc.stdin.write(INIT + call(1, tool, size=8))  # warmed: the upstream started and listed
    proc.stdin.flush()
    read_answers(proc, 2)
    before = cpu_seconds(proc.pid)
    proc.stdin.write(call(2, tool, size=size))
    proc.stdin.flush()
    (answer,) = read_answers(proc, 1)
    assert "result" in answer, str(answer)[:300]
    cpu, rss = cpu_seconds(proc.pid) - before, peak_rss_mb(proc.pid)
    proc.stdin.close()
    proc.wait(20)
    return cpu, rss


def burst(argv: list[str], env: dict[str, str], calls: int) -> dict[str, float]:
    proc = start(argv, env)
    assert proc.stdin is not None
    proc.stdin.write(INIT + call(1, "wild__ok"))
    proc.stdin.flush()
    read_answers(proc, 2)
    before = cpu_seconds(proc.pid)
    started = time.perf_counter()
    proc.stdin.write(b"".join(call(number, "wild__ok") for number in range(2, calls + 2)))
    proc.stdin.flush()
    answers = read_answers(proc, calls)
    drained = time.perf_counter() - started
    figures = {
        "drain_s": drained,
        "cpu_s": cpu_seconds(proc.pid) - before,
        "peak_rss_mb": peak_rss_mb(proc.pid),
        "refused_busy": sum(1 for answer in answers if answer.get("error", {}).get("code") == -32010),
        "served": sum(1 for answer in answers if "result" in answer),
    }
    proc.stdin.close()
    proc.wait(60)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=48)
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--against", help="another checkout whose gateway is measured too")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "new").mkdir()
        (Path(scratch) / "old").mkdir()
        paths = {
            "gateway": config(Path(scratch) / "new", max_upstream_message_size=f"{args.size_mb * 2}MB"),
            "against": config(Path(scratch) / "old"),  # a checkout from before the setting: its 64 MB default
        }
        bare_cpu, bare_rss = big([sys.executable, str(BARE), sys.executable, str(WILD)], None, size, "big")
        print(f"big ({args.size_mb} MB result): bare forwarder  CPU {bare_cpu:.2f} s, peak RSS {bare_rss:.0f} MB")
        checkouts = {"gateway": None} if args.against is None else {"gateway": None, "against": args.against}
        for label, where in checkouts.items():
            argv, env = gateway_argv(paths[label], where)
            cpu, rss = big(argv, env, size, "wild__big")
            print(
                f"big ({args.size_mb} MB result): {label:<15} CPU {cpu:.2f} s ({cpu / max(bare_cpu, 1e-3):.1f}x bare), "
                f"peak RSS {rss:.0f} MB ({rss / bare_rss:.1f}x bare)"
            )
        for label, where in checkouts.items():
            argv, env = gateway_argv(paths[label], where)
            figures = burst(argv, env, args.calls)
            print(
                f"burst ({args.calls} calls at once): {label:<8} "
                + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
            )


if __name__ == "__main__":
    main()
