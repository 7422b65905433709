"""A gateway process killed mid-call: the next gateway or audit command ends its calls and sessions, and
only its own (never a live process's)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from gateway.audit.store import AuditStore
from tests.conftest import REPO, RawSession, events, fixture_upstream, gateway_process, write_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})


async def start_slow_call(proc: anyio.abc.Process, marker: str) -> None:
    """Start a call that runs until its gateway ends, and return once it is under way (its first progress)."""
    raw = RawSession(proc)
    with anyio.fail_after(30):
        await raw.initialize()
        await raw.send(raw.call(1, "box__slow", {"steps": 100000}, progressToken=marker))
        while (await raw.receive()).get("method") != "notifications/progress":
            pass


async def settled_by_a_command(config: Path) -> None:
    with anyio.fail_after(60):
        await anyio.run_process(
            [sys.executable, "-m", "gateway", "audit", "sessions", "--config", str(config)], cwd=REPO
        )


def log_of(config: Path) -> list[dict[str, Any]]:
    return events(config.parent)


async def wait_for_decisions(config: Path, count: int) -> None:
    """Poll (with a deadline) until `count` decisions are in the chain (a journal moves into it within ms)."""
    with anyio.fail_after(30):
        while True:
            if sum(event["kind"] == "decision" for event in log_of(config)) >= count:
                return
            await anyio.sleep(0.01)  # polling another process's writes, under the deadline above


def by_call(config: Path) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for event in log_of(config):
        if event["kind"] in ("decision", "outcome"):
            calls.setdefault(event["call_id"], []).append(event)
    return calls


async def test_a_call_of_a_killed_gateway_is_ended_as_interrupted_by_the_next_command(config: Path) -> None:
    async with gateway_process(config) as (proc, _):
        await start_slow_call(proc, "killed")
        await wait_for_decisions(config, 1)
        pid = proc.pid
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    await settled_by_a_command(config)
    (call,) = by_call(config).values()
    assert [event["kind"] for event in call] == ["decision", "outcome"]
    outcome = call[1]
    assert outcome["outcome"] == "interrupted" and outcome["tool"] == "box__slow"
    assert outcome["reason"] == f"the gateway process {pid} ended without recording an outcome"
    (ended,) = [event for event in log_of(config) if event["kind"] == "session_end"]
    assert ended["session_id"] == call[0]["session_id"] and str(pid) in ended["reason"]
    await settled_by_a_command(config)  # settled once: a second command adds nothing
    assert sum(event["kind"] == "outcome" for event in log_of(config)) == 1
    assert list((config.parent / ".mcp-armor" / "audit.leases").iterdir()) == []
    store = AuditStore.open_reader(config.parent / ".mcp-armor" / "audit.db")
    try:
        assert store.verify().problem is None
    finally:
        store.close()


async def test_a_live_gateway_s_call_is_left_alone_while_a_dead_one_s_is_ended(config: Path) -> None:
    async with gateway_process(config) as (live, _):
        await start_slow_call(live, "live")
        async with gateway_process(config) as (doomed, _):
            await start_slow_call(doomed, "doomed")
            await wait_for_decisions(config, 2)
            doomed.send_signal(signal.SIGKILL)
            await doomed.wait()
        await settled_by_a_command(config)
        calls = by_call(config)
        interrupted = [call for call in calls.values() if len(call) == 2]
        assert len(interrupted) == 1 and interrupted[0][1]["outcome"] == "interrupted"
        still_running = [call for call in calls.values() if len(call) == 1]
        assert len(still_running) == 1  # the live gateway's call has no outcome yet
        live.send_signal(signal.SIGTERM)  # stopped in order: its call is cancelled, by itself
        with anyio.fail_after(30):
            await live.wait()
    outcomes = sorted(call[1]["outcome"] for call in by_call(config).values())
    assert outcomes == ["cancelled", "interrupted"]  # exactly one outcome per call
