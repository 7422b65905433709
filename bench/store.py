"""The shared store (PostgreSQL) against the embedded one (SQLite): events/s into the one chain from 1 and 3
replicas, and a call's latency through a gateway on each store, interleaved in one run.

    .venv/bin/python bench/store.py [--seconds 5] [--rounds 3] [--calls 400] [--concurrency 64]

Starts its own throwaway PostgreSQL cluster (Debian's postgresql; as root it runs as `postgres`), with
`fsync` on: every commit is durable, as in production.

- Chain throughput: R replica processes (R = 1, then 3), each a `SharedRecorder` with `--concurrency`
  callers recording a decision and then an outcome per "call", each waiting for its commit (as the call
  path does), for `--seconds`; events/s = events in the chain / elapsed. SQLite's recorder, one process
  with the same callers, is the baseline.
- Call latency: two gateways over stdio in front of the same kind of upstream (tests/fixtures/toolbox.py),
  one on the SQLite store and one on the PostgreSQL store, called one call at a time, alternating, so that
  both see the same machine; p50 and p99 of each, and the ratio (the target: PostgreSQL <= 1.3 x SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tomli_w  # noqa: E402
from call_latency import TOOLBOX, Peer, call, check, hold_poll_idle, open_session, stop  # noqa: E402

from tests.postgres import cluster  # noqa: E402


async def _replica(url: str, seconds: float, concurrency: int, start_at: float) -> None:
    """One replica: `concurrency` callers recording decision + outcome pairs until the time is up."""
    import anyio

    from gateway.audit.recorder import Recorder
    from gateway.audit.shared import SharedRecorder
    from gateway.audit.store import event
    from gateway.store.postgres import Database

    recorder: SharedRecorder | Recorder = (
        SharedRecorder(Database(url)) if url.startswith("postgresql") else Recorder(Path(url))
    )
    async with recorder.running():
        await anyio.sleep(max(start_at - time.time(), 0))
        deadline = time.monotonic() + seconds

        async def caller(lane: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                call_id = f"{lane}-{n}-{time.time_ns()}"
                fields = {"session_id": f"s{lane}", "call_id": call_id, "tool": "box__echo"}
                await recorder.record(event("decision", **fields, decision="allow", arguments={"text": "x" * 40}))
                await recorder.record(event("outcome", **fields, outcome="ok", duration_ms=1.0))
                n += 1

        async with anyio.create_task_group() as tg:
            for lane in range(concurrency):
                tg.start_soon(caller, lane)


SQLITE, ONE, THREE = "sqlite, 1 process", "postgresql, 1 replica", "postgresql, 3 replicas"


def chain_rate(url: str, replicas: int, seconds: float, concurrency: int, count: Callable[[], int]) -> float:
    before = count()
    start_at = time.time() + 3.0  # every replica connected and ready first
    command = [sys.executable, __file__, "--replica", url, "--seconds", str(seconds)]
    command += ["--concurrency", str(concurrency), "--start-at", str(start_at)]
    procs = [subprocess.Popen(command) for _ in range(replicas)]
    for proc in procs:
        if proc.wait(timeout=seconds + 120) != 0:
            raise RuntimeError("a replica failed")
    return (count() - before) / seconds


def pg_count(url: str) -> int:
    from gateway.store.postgres import Database

    with Database(url).session() as db:
        row = db.execute("SELECT seq FROM head").fetchone()
    return int(row[0]) if row else 0


def sqlite_count(path: Path) -> int:
    import sqlite3

    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])


def gateway_config(directory: Path, store: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    gateway: dict[str, object] = {"startup_timeout": "20s", "audit_anchor": "off"}
    if store is not None:
        gateway["store"] = store
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "all.toml").write_text('[[rule]]\nid = "all"\ntools = ["*"]\neffect = "allow"\n')
    config = directory / "upstreams.toml"
    config.write_text(
        tomli_w.dumps({"gateway": gateway, "upstreams": {"box": {"command": sys.executable, "args": [str(TOOLBOX)]}}})
    )
    return config


async def timed(peer: Peer, index: int, into: list[float] | None) -> None:
    started = time.perf_counter()
    reply = await call(peer, "box__echo", index)
    if into is not None:
        into.append((time.perf_counter() - started) * 1000)
    check(reply, "box__echo")


async def latencies(
    sqlite_config: Path, pg_config: Path, calls: int, in_flight: int
) -> tuple[list[float], list[float]]:
    """Per-call latency on each gateway, `in_flight` calls outstanding at a time on one session, the two
    gateways taking turns in blocks of `in_flight` calls (one call at a time: they alternate call by call)."""
    command = [sys.executable, "-m", "gateway", "serve", "--quiet", "--config"]
    lite = await open_session([*command, str(sqlite_config)], "box__echo")
    pg = await open_session([*command, str(pg_config)], "box__echo")
    samples: tuple[list[float], list[float]] = ([], [])
    try:
        for block in range(calls // in_flight + 20):
            order = ((lite, samples[0]), (pg, samples[1]))
            for peer, into in order if block % 2 else order[::-1]:
                kept = into if block >= 20 else None  # the first blocks warm up
                await asyncio.gather(*(timed(peer, block * in_flight + n, kept) for n in range(in_flight)))
    finally:
        await stop(lite)
        await stop(pg)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", choices=["chain", "calls"], help="measure only the chain or only the calls")
    parser.add_argument(
        "--poll-idle",
        action="store_true",
        help="hold /dev/cpu_dma_latency at 0: idle CPUs poll (root; see call_latency)",
    )
    parser.add_argument(
        "--socket", action="store_true", help="gateways reach the database over its Unix socket instead of TCP"
    )
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replica:
        asyncio.run(_replica(args.replica, args.seconds, args.concurrency, args.start_at))
        return
    held = hold_poll_idle() if args.poll_idle else None
    with cluster() as server, tempfile.TemporaryDirectory() as scratch:
        url = server.url(server.new_database())
        from gateway.store.postgres import Database

        Database(url).migrate()
        log = Path(scratch) / "audit.db"
        rates: dict[str, list[float]] = {name: [] for name in (SQLITE, ONE, THREE)}
        if args.only != "calls":
            for round_ in range(args.rounds):
                rates[SQLITE].append(chain_rate(str(log), 1, args.seconds, args.concurrency, lambda: sqlite_count(log)))
                rates[ONE].append(chain_rate(url, 1, args.seconds, args.concurrency, lambda: pg_count(url)))
                rates[THREE].append(chain_rate(url, 3, args.seconds, args.concurrency, lambda: pg_count(url)))
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} events/s" for k, v in rates.items()))
            print("\nevents/s into the chain (median of rounds; each caller waits for its commit):")
            for name, values in rates.items():
                print(f"  {name:24} {statistics.median(values):>10,.0f}")
            three = statistics.median(rates[THREE])
            print(f"  {THREE} / {SQLITE}: {three / statistics.median(rates[SQLITE]):.2f}x (target: >= 10,000 events/s)")
        if args.only == "chain":
            return
        lite_config = gateway_config(Path(scratch) / "lite", None)
        name = server.new_database()
        where = f"?host={server.data.parent}" if args.socket else ""
        pg_config = gateway_config(Path(scratch) / "pg", server.url(name) + where)
        for in_flight in (1, 16):
            lite, pg = asyncio.run(latencies(lite_config, pg_config, args.calls, in_flight))
            what = "one call at a time" if in_flight == 1 else f"{in_flight} calls in flight on one session"
            print(f"\n{what}, through a gateway over stdio ({len(lite)} calls each, interleaved):")
            print(f"  sqlite store      p50 {statistics.median(lite):6.2f} ms  p99 {pct(lite, 0.99):6.2f} ms")
            print(f"  postgresql store  p50 {statistics.median(pg):6.2f} ms  p99 {pct(pg, 0.99):6.2f} ms")
            ratio = statistics.median(pg) / statistics.median(lite)
            print(f"  ratio p50 postgresql / sqlite: {ratio:.2f}x (target <= 1.3x)")
    if held is not None:
        os.close(held)


if __name__ == "__main__":
    main()
