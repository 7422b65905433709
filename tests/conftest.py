"""Shared helpers: write a config, start the real gateway as a process, talk to it with the SDK client."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import mcp_types as types
import pytest
import tomli_w
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from gateway.audit.store import AuditStore

pytest_plugins = ["tests.postgres"]

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
NODE_BIN = REPO / ".ci" / "node" / "node_modules" / ".bin"


@pytest.fixture(autouse=True, scope="session")
def _anchors_kept_apart(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Gateways anchor their audit logs under the user's state directory: in tests, a temporary one."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fixture_upstream(script: str, **env: str) -> dict[str, Any]:
    """An `[upstreams.NAME]` table that runs one of our fixture servers with this interpreter."""
    table: dict[str, Any] = {"command": sys.executable, "args": [str(FIXTURES / script)]}
    if env:
        table["env"] = env
    return table


def node_server(name: str) -> str:
    """Path of an npm-installed MCP server (installed by `.ci/run` / `scripts/dev`)."""
    path = NODE_BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} is not installed: run `bash scripts/dev setup` first")
        return found
    return str(path)


ALLOW_ALL = '[defaults]\neffect = "allow"\n'
NOTES_NEED_APPROVAL = """
[defaults]
effect = "allow"

[[rule]]
id = "notes-need-approval"
tools = ["box__write_note"]
effect = "ask"
reason = "notes are written to disk"
"""
"""Everything allowed but the toolbox's `write_note`, which a person approves."""


def write_config(directory: Path, upstreams: dict[str, Any], *, policy: str | None = ALLOW_ALL, **gateway: Any) -> Path:
    """Write `upstreams.toml` (and, unless `policy` is None, `policies/test.toml` holding `policy`)."""
    path = directory / "upstreams.toml"
    data: dict[str, Any] = {"gateway": {"startup_timeout": "20s", **gateway}, "upstreams": upstreams}
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    if policy is not None:
        write_policy(directory / "policies", policy)
    return path


def write_policy(directory: Path, text: str, name: str = "test.toml") -> Path:
    """Write one policy file atomically (a reloading gateway never sees it half written)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    scratch = directory / f".{name}.tmp"
    scratch.write_text(text, encoding="utf-8")
    scratch.replace(path)
    return path


def gateway_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config), *extra]


def gateway_params(config: Path) -> StdioServerParameters:
    command, *args = gateway_command(config)
    return StdioServerParameters(
        command=command,
        args=args,
        env={
            "PYTHONPATH": str(REPO),
            "PATH": os.environ.get("PATH", ""),
            "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
        },
    )


class Notifications:
    """Collects server notifications and lets a test wait for one kind without sleeping."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self._changed = anyio.Event()

    async def __call__(self, message: Any) -> None:
        self.seen.append(message)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, kind: type, *, seconds: float = 20) -> Any:
        """Return (and consume) the oldest notification of `kind`, waiting for one if there is none yet."""
        with anyio.fail_after(seconds):
            while True:
                for message in self.seen:
                    if isinstance(message, kind):
                        self.seen.remove(message)
                        return message
                await self._changed.wait()


@asynccontextmanager
async def gateway_client(
    config: Path, *, mode: str = "legacy", notifications: Notifications | None = None, elicitation: Any = None
) -> AsyncIterator[Client]:
    """Start `mcp-armor serve` on `config` as a real process and connect a real SDK client over stdio."""
    async with Client(
        gateway_params(config),
        mode=mode,  # type: ignore[arg-type]
        message_handler=notifications,
        read_timeout_seconds=60,
        elicitation_callback=elicitation,
    ) as client:
        yield client


class ServerLog:
    """The stderr of a gateway process, read as it comes; a test can wait for a line without sleeping."""

    def __init__(self) -> None:
        self.text = ""
        self._changed = anyio.Event()

    def add(self, chunk: bytes) -> None:
        self.text += chunk.decode(errors="replace")
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, pattern: str, *, seconds: float = 20, after: int = 0) -> re.Match[str]:
        """The first match of `pattern` in the log from offset `after`, waiting for it to appear."""
        with anyio.fail_after(seconds):
            while not (match := re.compile(pattern).search(self.text, after)):
                await self._changed.wait()
            return match


@asynccontextmanager
async def gateway_process(config: Path, *extra: str) -> AsyncIterator[tuple[anyio.abc.Process, ServerLog]]:
    """Run `mcp-armor serve` with `extra` arguments as a process, its stderr collected in a `ServerLog`."""
    log = ServerLog()
    async with await anyio.open_process(gateway_command(config, *extra), stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        stderr = proc.stderr

        async def pump() -> None:
            async for chunk in stderr:
                log.add(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                yield proc, log
            finally:
                if proc.returncode is None:
                    proc.terminate()
                with anyio.fail_after(20):
                    await proc.wait()
                tg.cancel_scope.cancel()


@asynccontextmanager
async def http_gateway(config: Path, log: list[ServerLog] | None = None) -> AsyncIterator[str]:
    """Run `mcp-armor serve --http 127.0.0.1:0` and yield its /mcp URL once it is listening."""
    async with gateway_process(config, "--http", "127.0.0.1:0") as (process, server_log):
        if log is not None:
            log.append(server_log)
        yield await serving_url(process, server_log)


async def serving_url(process: anyio.abc.Process, log: ServerLog, seconds: float = 30) -> str:
    """The /mcp URL a gateway started with `--http` serves at, once it says so. One that exits first fails
    the test at once, and one silent for `seconds` fails it too, each with its log."""
    async with anyio.create_task_group() as tg:

        async def exited() -> None:
            await process.wait()
            raise AssertionError(f"the gateway exited ({process.returncode}) before serving:\n{log.text}")

        tg.start_soon(exited)
        try:
            match = await log.wait_for(r"serving streamable HTTP at (https?://\S+/mcp)", seconds=seconds)
        except TimeoutError:
            raise AssertionError(f"the gateway did not start within {seconds:g}s:\n{log.text}") from None
        tg.cancel_scope.cancel()
    return match[1]


@asynccontextmanager
async def client_over(transport: str, config: Path, mode: str = "legacy", **callbacks: Any) -> AsyncIterator[Client]:
    """A real SDK client of a gateway process, over stdio or streamable HTTP, in `mode`'s era."""
    if transport == "stdio":
        async with Client(gateway_params(config), mode=mode, **callbacks) as client:  # type: ignore[arg-type]
            yield client
        return
    async with (
        http_gateway(config) as url,
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, **callbacks) as client,  # type: ignore[arg-type]
    ):
        yield client


async def call_then_cancel(client: Client, tool: str, arguments: dict[str, Any]) -> None:
    """Start a call, wait for its first progress notification (so it is under way), then cancel it."""
    started = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        started.set()

    async with anyio.create_task_group() as tg:

        async def long_call() -> None:
            await client.call_tool(tool, arguments, progress_callback=on_progress)

        tg.start_soon(long_call)
        with anyio.fail_after(20):
            await started.wait()
        tg.cancel_scope.cancel()


class RawSession:
    """A bare JSON-RPC client over a gateway process's stdio pipes."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._buffer = b""

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())

    async def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            self._buffer += await self.proc.stdout.receive()
        line, self._buffer = self._buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    async def initialize(self) -> None:
        await self.send(
            {
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
        )
        while (await self.receive()).get("id") != 0:
            pass
        await self.send({"method": "notifications/initialized"})

    def call(self, call_id: int, tool: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"name": tool, "arguments": arguments}
        if meta:
            params["_meta"] = meta
        return {"id": call_id, "method": "tools/call", "params": params}


def text_of(result: types.CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, types.TextContent))


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def events(config_dir: Path) -> list[dict[str, Any]]:
    store = AuditStore.open_reader(config_dir / ".mcp-armor" / "audit.db")
    try:
        return list(store.events())
    finally:
        store.close()


def calls(config_dir: Path) -> dict[str, dict[str, Any]]:
    """Per tool (last call wins): the decision and outcome events of each call; asserts one of each per call."""
    per_call: dict[str, list[dict[str, Any]]] = {}
    for event in events(config_dir):
        if event["kind"] in ("decision", "outcome"):
            per_call.setdefault(event["call_id"], []).append(event)
    by_tool: dict[str, dict[str, Any]] = {}
    for call_id, pair in per_call.items():
        assert [event["kind"] for event in pair] == ["decision", "outcome"], (call_id, pair)
        decision, outcome = pair
        assert decision["session_id"] == outcome["session_id"]
        by_tool[decision["tool"]] = {"decision": decision, "outcome": outcome}
    return by_tool


async def ready(raw: RawSession) -> None:
    """Shake hands and list the tools (which waits until the upstreams are up), as an agent does."""
    with anyio.fail_after(30):
        await raw.initialize()
        await raw.send({"id": "list", "method": "tools/list"})
        while (await raw.receive()).get("id") != "list":
            pass


async def answers(raw: RawSession, ids: set[Any]) -> dict[Any, dict[str, Any]]:
    found: dict[Any, dict[str, Any]] = {}
    with anyio.fail_after(30):
        while not ids <= found.keys():
            message = await raw.receive()
            if "id" in message and "method" not in message:
                assert message["id"] not in found, f"answered twice: {message}"
                found[message["id"]] = message
    return found


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # never a terminal: a command that would ask someone must not wait
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]},
    )


@contextmanager
def held_while_new(path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Another connection holds the new SQLite file `path` (as a process still making it would), so that
    switching it to WAL is refused at once ("locked"); the first pause `gateway.audit.store.use_wal` takes
    lets it go. Yields the pauses taken; on exit, the holder has let go."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if other.in_transaction:
            other.execute("COMMIT")

    monkeypatch.setattr("gateway.audit.store.time.sleep", pause)
    try:
        yield pauses
        assert not other.in_transaction
    finally:
        other.close()
