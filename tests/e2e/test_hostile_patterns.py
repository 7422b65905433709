"""An upstream's own input schema cannot stall the gateway: its regular expressions run in linear time.

A backtracking engine takes seconds to find that `"a" * 30 + "!"` does not match `^(a|a)+$`, doubling
with each further character, and the gateway has one event loop: every session, every upstream waited.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from tests.conftest import RawSession, answers, fixture_upstream, gateway_process, ready, write_config

pytestmark = pytest.mark.anyio
HOSTILE = "a" * 30 + "!"
BOUND = 10
"""Seconds: generous for an answer that takes milliseconds, far below the stall (minutes)."""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, {"hostile": fixture_upstream("hostile_schema.py"), "box": fixture_upstream("toolbox.py")}
    )


async def test_a_call_to_another_tool_is_answered_while_hostile_arguments_are_checked(config: Path) -> None:
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        batch = [
            raw.call(1, "hostile__match", {"text": HOSTILE}),
            raw.call(2, "hostile__keyed", {"map": {HOSTILE: 1}}),
            raw.call(3, "box__echo", {"text": "still here"}),
        ]
        assert proc.stdin is not None
        await proc.stdin.send(b"".join((json.dumps({"jsonrpc": "2.0", **call}) + "\n").encode() for call in batch))
        with anyio.fail_after(BOUND):
            found = await answers(raw, {1, 2, 3})
    assert found[3]["result"]["content"][0]["text"] == "still here"
    for refused in (found[1], found[2]):
        assert refused["result"]["isError"] is True, refused
        assert "does not match" in refused["result"]["content"][0]["text"], refused


async def test_a_tool_whose_pattern_needs_backtracking_is_listed_and_its_calls_refused(config: Path) -> None:
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        await raw.send({"id": "list", "method": "tools/list"})
        await raw.send(raw.call(1, "hostile__twice", {"text": "abab"}))
        found = await answers(raw, {"list", 1})
    assert "hostile__twice" in {tool["name"] for tool in found["list"]["result"]["tools"]}
    text = found[1]["result"]["content"][0]["text"]
    assert found[1]["result"]["isError"] is True
    assert "cannot be checked in linear time" in text, text
