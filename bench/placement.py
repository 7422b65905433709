"""How much of a call's latency is where the scheduler puts the processes: direct and gateway, pinned and free.

    .venv/bin/python bench/placement.py [--calls 1500]

On a machine with two CPUs, sequential `tools/call` latency (p50) of the fixture upstream called
directly (client and upstream) and through the gateway (client, gateway, upstream), with every
thread of each process pinned to a CPU in turn (`c0 u1`: the client on CPU 0, the upstream on CPU
1) and then free, as the other benchmarks run them. Prints each placement's p50 and, per line, the
ratio to the direct call pinned the same way where there is one. Linux only (sched_setaffinity).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from call_latency import TOOLBOX, Peer, gateway_command, open_session, percentile, sequential, stop, write_gateway

DIRECT = ("c0 u0", "c0 u1", "free")
GATEWAY = ("c0 g0 u0", "c0 g0 u1", "c0 g1 u0", "c0 g1 u1", "free")


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:  # a worker thread that ended meanwhile
            continue


def children(pid: int) -> list[int]:
    found = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{thread}/children").read_text()
        found += [int(child) for child in text.split()]
    return found


async def measure(peer: Peer, tool: str, placement: str, roles: dict[str, int], calls: int) -> float:
    every = set(range(os.cpu_count() or 1))
    for role, pid in roles.items():
        pin(pid, every if placement == "free" else {int(placement.split(role)[1][0])})
    await sequential(peer, tool, 200)  # settle where they now run
    return percentile(await sequential(peer, tool, calls), 0.5)


async def main(calls: int) -> None:
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPUs")
    me = os.getpid()
    direct: dict[str, float] = {}
    peer = await open_session([sys.executable, str(TOOLBOX)], "echo")
    for placement in DIRECT:
        direct[placement] = await measure(peer, "echo", placement, {"c": me, "u": peer.pid}, calls)
    await stop(peer)
    with tempfile.TemporaryDirectory() as directory:
        peer = await open_session(gateway_command(write_gateway(Path(directory))), "box__echo")
        roles = {"c": me, "g": peer.pid, "u": children(peer.pid)[0]}
        gateway = {placement: await measure(peer, "box__echo", placement, roles, calls) for placement in GATEWAY}
        await stop(peer)
    pin(me, set(range(os.cpu_count() or 1)))
    print(f"sequential tools/call p50, {calls} calls per placement (c = client, u = upstream, g = gateway)\n")
    for placement, p50 in direct.items():
        print(f"direct   {placement:10} {p50:7.3f} ms")
    for placement, p50 in gateway.items():
        same = placement.replace(" g0", "").replace(" g1", "")
        ratio = f"  {p50 / direct[same]:.2f}x direct {same}" if same in direct else ""
        print(f"gateway  {placement:10} {p50:7.3f} ms{ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500)
    asyncio.run(main(parser.parse_args().calls))
