"""Attacks on the gateway's wire, its schema checks and its recovery: what a manipulated agent sends, what a
malicious upstream defines or answers, and what a client claims. Each test asserts the secure behaviour."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.schema import FORMATS
from tests.conftest import RawSession, answers, events, fixture_upstream, gateway_process, ready, write_config

pytestmark = pytest.mark.anyio
BOUND = 10
"""Seconds: generous for an answer that takes milliseconds, far below a stall."""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, {"hostile": fixture_upstream("hostile_schema.py"), "box": fixture_upstream("toolbox.py")}
    )


async def _refused_while_another_call_is_answered(config: Path, tool: str, arguments: dict[str, Any]) -> str:
    """Send a call of `tool` and, in the same write, a call of another tool: the other is answered within
    `BOUND` whatever the first costs; the first's refusal text."""
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        batch = [raw.call(1, tool, arguments), raw.call(2, "box__echo", {"text": "still here"})]
        assert proc.stdin is not None
        await proc.stdin.send(b"".join((json.dumps({"jsonrpc": "2.0", **call}) + "\n").encode() for call in batch))
        with anyio.fail_after(BOUND):
            found = await answers(raw, {1, 2})
    assert found[2]["result"]["content"][0]["text"] == "still here"
    assert "result" in found[1], found[1]
    assert found[1]["result"]["isError"] is True, found[1]
    text: str = found[1]["result"]["content"][0]["text"]
    return text


async def test_wording_a_refusal_of_many_distinct_records_cannot_stall_the_gateway(config: Path) -> None:
    """`uniqueItems` over records (which do not sort) must not be worded by comparing every pair."""
    records = [{"n": index} for index in range(5000)]
    text = await _refused_while_another_call_is_answered(
        config, "hostile__distinct", {"records": records, "count": "many"}
    )
    assert "at 'count': the value does not satisfy type: [\"integer\"]" in text, text


async def test_a_regex_format_given_a_non_string_is_refused_with_its_reason(config: Path) -> None:
    """`format: regex` asserts nothing of a list; the refusal for the bad count is still worded."""
    text = await _refused_while_another_call_is_answered(
        config, "hostile__expression", {"expression": ["a"], "count": "many"}
    )
    assert "'integer'" in text, text


async def test_wording_a_refusal_of_a_large_call_cannot_stall_the_gateway(config: Path) -> None:
    """Fifty thousand refused items (more than Python's wording walks) are refused from the per-call check's
    first error, naming its place and keyword."""
    text = await _refused_while_another_call_is_answered(
        config, "hostile__distinct", {"records": [f"x{index}" for index in range(50_000)]}
    )
    assert "at 'records/0': the value does not satisfy type: [\"object\"]" in text, text


async def test_a_call_holding_a_million_values_is_refused_and_recorded_without_holding_up_others(
    config: Path, tmp_path: Path
) -> None:
    """Four megabytes of arguments, well under `max_message_size`: checking, deciding and masking each of a
    million values would hold the event loop for seconds; the call is refused by its size alone."""
    text = await _refused_while_another_call_is_answered(
        config, "hostile__distinct", {"records": [f"x{index}" for index in range(1_000_000)]}
    )
    assert "hold more than 100000 values" in text, text
    (decision,) = [
        item for item in events(tmp_path) if item["kind"] == "decision" and item["tool"] == "hostile__distinct"
    ]
    assert decision["arguments"] == {"arguments": "[more than 100000 values: not stored]"}


def test_a_callers_long_regular_expression_is_not_kept_after_its_check() -> None:
    """`format: regex` checks a caller's string: thousands of calls of megabytes each must not pile up."""
    expression = "a" * 1_000_000 + "("
    held = sys.getrefcount(expression)
    assert FORMATS.conforms(expression, "regex") is False
    assert sys.getrefcount(expression) == held


async def test_an_upstream_relisting_megabytes_of_tools_cannot_stall_the_gateway(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"crowded": fixture_upstream("crowded.py"), "box": fixture_upstream("toolbox.py")})
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        await raw.send(raw.call(1, "crowded__grow", {}))
        changed, echoes = False, 0
        while not changed:  # an echo at a time until the new listing reaches the agent: each answered in time
            echoes += 1
            await raw.send(raw.call(100 + echoes, "box__echo", {"text": "still here"}))
            with anyio.fail_after(BOUND):
                while (message := await raw.receive()).get("id") != 100 + echoes:
                    changed |= message.get("method") == "notifications/tools/list_changed"
            assert message["result"]["content"][0]["text"] == "still here"
