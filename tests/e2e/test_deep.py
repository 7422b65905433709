"""Arguments and results nested hundreds of levels deep, end to end: refused or passed on, always recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.policy.nesting import MAX_NESTING
from gateway.policy.redact import TOO_DEEP
from tests.conftest import RawSession, events, fixture_upstream, gateway_process, write_config
from tests.e2e.test_audit import cli

pytestmark = pytest.mark.anyio

SCREENED = """
[defaults]
effect = "allow"

[[rule]]
id = "mask-keys"
tools = ["*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']
"""


def nested_text(depth: int, *, lists: bool = False) -> str:
    """`{"a":{"a":...1...}}` (or `[[...1...]]`) `depth` levels deep, as JSON text (built flat: no recursion)."""
    opening, closing = ("[", "]") if lists else ('{"a":', "}")
    return opening * depth + "1" + closing * depth


async def exchange(config: Path, *sent: tuple[str, str]) -> dict[int, dict[str, Any]]:
    """Send each (tool, arguments as JSON text) as a call; the answers by call number, each read flat
    (its result's text and whether it is an error: a deep result is not parsed here)."""
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        assert proc.stdin is not None and proc.stdout is not None
        with anyio.fail_after(60):
            await raw.initialize()
            for number, (tool, text) in enumerate(sent, 1):
                params = f'{{"name":{json.dumps(tool)},"arguments":{text}}}'
                await proc.stdin.send(
                    f'{{"jsonrpc":"2.0","id":{number},"method":"tools/call","params":{params}}}\n'.encode()
                )
            answers: dict[int, dict[str, Any]] = {}
            buffer = b""
            while len(answers) < len(sent):
                while b"\n" not in buffer:
                    buffer += await proc.stdout.receive()
                line, buffer = buffer.split(b"\n", 1)
                if line.startswith(b'{"jsonrpc":"2.0","id":') and b'"method"' not in line[:40]:
                    number = int(line[22:].split(b",", 1)[0])
                    answers[number] = {
                        "error": b'"isError":true' in line or b'"error":{' in line,
                        "line": line.decode(),
                    }
    return answers


def pairs(directory: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each call's decision and outcome, in the order the calls were made."""
    by_call: dict[str, list[dict[str, Any]]] = {}
    for event in events(directory):
        if event["kind"] in ("decision", "outcome"):
            by_call.setdefault(event["call_id"], []).append(event)
    assert all([event["kind"] for event in pair] == ["decision", "outcome"] for pair in by_call.values())
    return sorted(((pair[0], pair[1]) for pair in by_call.values()), key=lambda pair: pair[0]["seq"])


@pytest.mark.parametrize("depth", [600, 900])
@pytest.mark.parametrize("lists", [False, True], ids=["objects", "arrays"])
async def test_arguments_nested_hundreds_deep_are_refused_with_a_decision_and_an_outcome(
    tmp_path: Path, depth: int, lists: bool
) -> None:
    config = write_config(tmp_path, {"deep": fixture_upstream("deep.py")})
    inner = nested_text(depth, lists=lists)
    answers = await exchange(
        config,
        ("deep__take", f'{{"x":{inner}}}'),
        ("deep__recursive", f'{{"x":{inner}}}'),  # an input schema that descends as deep as the arguments
        ("deep__nonexistent", f'{{"x":{inner}}}'),
        ("deep__take", "{}"),
    )
    for number in (1, 2):
        assert answers[number]["error"] and f"nest deeper than {MAX_NESTING} levels" in answers[number]["line"]
    assert "Unknown tool" in answers[3]["line"]
    assert not answers[4]["error"]  # and the gateway kept serving
    recorded = pairs(tmp_path)
    assert sorted((decision["tool"], decision["decision"], outcome["outcome"]) for decision, outcome in recorded) == [
        ("deep__nonexistent", "deny", "refused"),
        ("deep__recursive", "deny", "refused"),
        ("deep__take", "allow", "ok"),
        ("deep__take", "deny", "refused"),
    ]
    refused = [decision for decision, _ in recorded if decision["tool"] != "deep__nonexistent"][:2]
    for decision in refused:
        assert decision["reason"] == (
            f"the arguments of '{decision['tool']}' nest deeper than {MAX_NESTING} levels of objects and arrays, "
            "the most the gateway accepts"
        )
        cut = "x" + (".0" if lists else ".a") * (MAX_NESTING - 1)  # the first level not stored
        assert decision["masked"] == [{"kind": "too-deep", "path": cut}]
    stored = json.dumps(refused[0]["arguments"])
    assert stored.count("[" if lists else "{") == MAX_NESTING and TOO_DEEP in stored
    assert cli(config, "audit", "verify").returncode == 0


async def test_arguments_at_the_nesting_limit_pass_and_one_level_more_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"deep": fixture_upstream("deep.py")})
    at_limit, beyond = nested_text(MAX_NESTING - 1), nested_text(MAX_NESTING)
    answers = await exchange(
        config, ("deep__recursive", f'{{"x":{at_limit}}}'), ("deep__recursive", f'{{"x":{beyond}}}')
    )
    assert not answers[1]["error"] and answers[2]["error"]
    (first, _), (second, _) = pairs(tmp_path)
    assert first["decision"] == "allow" and first["masked"] is None
    assert json.dumps(first["arguments"]) == f'{{"x": {nested_text(MAX_NESTING - 1)}}}'.replace('{"a":', '{"a": ')
    assert second["decision"] == "deny"


@pytest.mark.parametrize("depth", [250, 600])
async def test_results_nested_hundreds_deep_are_passed_on_or_refused_and_recorded(tmp_path: Path, depth: int) -> None:
    config = write_config(tmp_path, {"deep": fixture_upstream("deep.py")}, policy=SCREENED)
    answers = await exchange(config, ("deep__deep_result", f'{{"depth":{depth}}}'), ("deep__take", "{}"))
    assert not answers[2]["error"]
    recorded = pairs(tmp_path)
    assert [(decision["tool"], outcome["outcome"]) for decision, outcome in recorded][1] == ("deep__take", "ok")
    outcome = recorded[0][1]
    if depth < 290:  # passed on as the upstream sent it, its digest recorded
        assert not answers[1]["error"] and outcome["outcome"] == "ok" and outcome["result_size"] > depth * 5
    else:  # deeper than the result models check: an error, saying so
        assert answers[1]["error"] and outcome["outcome"] == "error"
        assert outcome["reason"] == (
            "upstream 'deep' returned a result that cannot be checked (Maximum serialization depth exceeded)"
        )
    assert cli(config, "audit", "verify").returncode == 0
