"""A bare stdio forwarder, the floor for any gateway written in Python: lines in, lines out, nothing else.

    python bench/bare_forwarder.py COMMAND [ARGS...]

Starts COMMAND and copies the agent's stdin to its stdin and its stdout to the agent's stdout, line
by line, on one asyncio event loop: no parsing, no checks, no policy, no audit, no renaming.
`bench/call_latency.py` measures it beside the gateway, so that what the gateway's own work costs
can be told apart from what crossing one more Python process costs on the machine at hand.
"""

from __future__ import annotations

import asyncio
import os
import sys

LIMIT = 64 * 1024 * 1024


async def forward(argv: list[str]) -> int:
    loop = asyncio.get_running_loop()
    upstream = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LIMIT
    )
    assert upstream.stdin is not None and upstream.stdout is not None
    agent = asyncio.StreamReader(limit=LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(agent), sys.stdin)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(sys.stdout.fileno(), "wb", buffering=0))

    async def answers() -> None:
        assert upstream.stdout is not None
        while line := await upstream.stdout.readline():
            out.write(line)

    relay = asyncio.ensure_future(answers())
    while line := await agent.readline():
        upstream.stdin.write(line)
    upstream.stdin.close()
    code = await upstream.wait()
    relay.cancel()
    return code


if __name__ == "__main__":
    raise SystemExit(asyncio.run(forward(sys.argv[1:])))
