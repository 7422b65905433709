"""The audit log end to end: real client, real gateway process, real upstreams, a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.shared.exceptions import MCPError

from gateway.audit.store import AuditStore
from tests.conftest import (
    REPO,
    RawSession,
    ServerLog,
    call_then_cancel,
    calls,
    events,
    fixture_upstream,
    gateway_client,
    gateway_process,
    http_gateway,
    text_of,
    write_config,
    write_policy,
)

pytestmark = pytest.mark.anyio

POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "box-open"
tools = ["box__echo", "box__slow", "box__crash", "box__pid", "box__add", "box__fail"]
effect = "allow"

[[rule]]
id = "add-zero"
tools = ["box__add"]
effect = "rewrite"
set = { b = 0 }
when = { properties = { b = { const = 13 } }, required = ["b"] }

[[rule]]
id = "notes-asked"
tools = ["box__write_note"]
effect = "ask"

[[rule]]
id = "no-failing"
tools = ["box__fail"]
effect = "deny"
when = { type = "object" }  # conditional, so the tool stays listed and its calls reach the policy
reason = "failing on purpose is not allowed"

[[rule]]
id = "mask-note-body"
tools = ["box__write_note"]
mask = ["body"]
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


class Approve:
    async def __call__(self, context: Any, params: Any) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"approve": True})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    box = {**fixture_upstream("toolbox.py"), "timeout": "1s"}
    return write_config(tmp_path, {"box": box}, policy=POLICY)


async def test_every_call_leaves_exactly_one_decision_and_one_outcome(config: Path) -> None:
    async with gateway_client(config, elicitation=Approve()) as client:
        assert not (await client.call_tool("box__echo", {"text": "hi"})).is_error
        rewritten = await client.call_tool("box__add", {"a": 2, "b": 13})
        assert rewritten.structured_content == {"sum": 2}
        assert not (await client.call_tool("box__write_note", {"path": "notes/a", "body": "s3cret plan"})).is_error
        assert (await client.call_tool("box__fail", {})).is_error
        assert (await client.call_tool("box__add", {"a": "two", "b": 1})).is_error  # the tool's own schema
        timed_out = await client.call_tool("box__slow", {"steps": 100})
        assert "did not answer within 1s" in text_of(timed_out)

        await call_then_cancel(client, "box__slow", {"steps": 15})

        crashed = await client.call_tool("box__crash", {})
        assert crashed.is_error
        with pytest.raises(MCPError, match="Unknown tool"):
            await client.call_tool("box__nonexistent", {"password": "hunter2"})

    directory = config.parent
    seen = calls(directory)
    summary = {tool: (pair["decision"]["decision"], pair["outcome"]["outcome"]) for tool, pair in seen.items()}
    assert summary == {
        "box__echo": ("allow", "ok"),
        "box__add": ("deny", "refused"),  # the last call to add: refused by the tool's own input schema
        "box__write_note": ("ask", "ok"),
        "box__fail": ("deny", "refused"),
        "box__slow": ("allow", "cancelled"),
        "box__crash": ("allow", "error"),
        "box__nonexistent": ("deny", "refused"),
    }
    all_events = events(directory)
    kinds = Counter(event["kind"] for event in all_events)
    assert kinds["decision"] == kinds["outcome"] == 9
    assert kinds["session_start"] == kinds["session_end"] == 1
    assert [event["outcome"] for event in all_events if event["kind"] == "upstream"][:2] == ["up", "down"]
    assert kinds["catalog"] >= len(seen)

    by_call = [event for event in all_events if event["kind"] in ("decision", "outcome")]
    timeouts = [event for event in by_call if event.get("outcome") == "timeout"]
    assert len(timeouts) == 1 and timeouts[0]["tool"] == "box__slow"
    rewrites = [event for event in by_call if event.get("decision") == "rewrite"]
    assert rewrites[0]["rules"] == ["box-open", "add-zero"]
    assert rewrites[0]["arguments"] == {"a": 2, "b": 13}
    assert rewrites[0]["rewritten_arguments"] == {"a": 2, "b": 0}
    assert seen["box__add"]["decision"]["stage"] == "input-schema"
    note = seen["box__write_note"]["decision"]
    assert note["approval"] == "granted" and note["rules"] == ["notes-asked"]
    assert note["arguments"]["body"].startswith("[masked:policy:")
    assert note["masked"] == [{"path": "body", "kind": "policy"}]
    assert seen["box__fail"]["decision"]["reason"] == "denied by rule 'no-failing': failing on purpose is not allowed"
    assert seen["box__nonexistent"]["decision"]["arguments"]["password"].startswith("[masked:key-name:")
    echo = seen["box__echo"]
    assert echo["decision"]["policy_revision"] and len(echo["decision"]["tool_digest"]) == 64
    assert echo["outcome"]["result_size"] > 0 and len(echo["outcome"]["result_sha256"]) == 64
    assert echo["outcome"]["duration_ms"] >= 0
    assert "s3cret plan" not in (directory / ".mcp-armor" / "audit.db").read_bytes().decode("latin-1")

    verified = cli(config, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith(f"ok: {len(all_events)} events, chain intact")


async def test_an_upstream_that_hangs_up_is_recorded_down_though_the_gateway_stops_while_it_lingers(
    config: Path,
) -> None:
    # The upstream closes its stdout but takes seconds to stop; the gateway is stopped meanwhile.
    async with gateway_client(config) as client:
        assert (await client.call_tool("box__crash", {"linger": True})).is_error
    changes = [(event["upstream"], event["outcome"]) for event in events(config.parent) if event["kind"] == "upstream"]
    assert changes == [("box", "up"), ("box", "down")]


async def test_asked_call_refused_and_input_required_are_recorded(tmp_path: Path) -> None:
    box = fixture_upstream("toolbox.py")
    config = write_config(tmp_path, {"box": box}, policy=POLICY, approvals={"via": ["client"]})
    async with gateway_client(config) as client:  # no elicitation, no queue: the ask cannot be put to a person
        refused = await client.call_tool("box__write_note", {"path": "notes/a", "body": "x"})
        assert "cannot ask a person" in text_of(refused)
    async with gateway_client(config, mode="auto", elicitation=Approve()) as client:
        assert not (await client.call_tool("box__write_note", {"path": "notes/b", "body": "y"})).is_error
    pairs = [
        (event["decision"] if event["kind"] == "decision" else event["outcome"])
        for event in events(tmp_path)
        if event["kind"] in ("decision", "outcome")
    ]
    # Refused; then on 2026-07-28 the first round trip waits for the person, the retry goes ahead.
    assert pairs == ["ask", "refused", "ask", "input_required", "ask", "ok"]
    assert len({event["session_id"] for event in events(tmp_path) if event["kind"] == "session_start"}) == 2


async def test_two_concurrent_sessions_are_kept_apart_in_one_chain(config: Path) -> None:
    async with gateway_client(config) as first, gateway_client(config) as second:
        for index in range(3):
            await first.call_tool("box__echo", {"text": f"first {index}"})
            await second.call_tool("box__echo", {"text": f"second {index}"})
    listed = json.loads(cli(config, "audit", "sessions", "--json").stdout)
    assert [row["calls"] for row in listed] == [3, 3]
    assert all(row["client"].startswith("mcp") and row["end"] for row in listed)
    for row in listed:
        shown = cli(config, "audit", "show", row["session_id"][:10], "--json")
        texts = {
            json.loads(line)["arguments"]["text"].split()[0]
            for line in shown.stdout.splitlines()
            if json.loads(line)["kind"] == "decision"
        }
        assert len(texts) == 1  # one session's timeline holds only its own calls
    # Two gateway processes appended to the same file: one chain, still intact.
    assert cli(config, "audit", "verify").returncode == 0


async def test_secrets_in_arguments_never_reach_the_database_file(config: Path) -> None:
    secrets = {
        "github": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "aws": "AKIAIOSFODNN7EXAMPLE",
        "url_password": "Tr0ub4dor-and-3",
        "field_password": "correct horse battery staple",
        "random": "q8Xz2LmN4vB7tR1yK9pW3sD6",
        "bearer": "abcDEF1234567890ghiJKL",
    }
    text = (
        f"push with {secrets['github']} then aws {secrets['aws']} "
        f"to postgres://admin:{secrets['url_password']}@db.internal/prod "
        f"with -H 'Authorization: Bearer {secrets['bearer']}' and {secrets['random']}"
    )
    async with gateway_client(config) as client:
        echoed = await client.call_tool("box__echo", {"text": text, "password": secrets["field_password"]})
        assert secrets["github"] in text_of(echoed)  # the agent gets the result; the log keeps only a digest
        refused = await client.call_tool("box__add", {"a": secrets["random"], "b": 1})
        assert refused.is_error
    state = config.parent / ".mcp-armor"
    stored = b"".join(path.read_bytes() for path in state.glob("audit.db*"))
    for name, secret in secrets.items():
        assert secret.encode() not in stored, f"{name} secret found in the audit file"
    decision = next(event for event in events(config.parent) if event["kind"] == "decision")
    kinds = {item["kind"] for item in decision["masked"]}
    assert {"github-token", "aws-access-key", "url-password", "bearer-token", "key-name"} <= kinds


def _blocked_by_a_file(directory: Path) -> str:
    (directory / "state").write_text("a file where the audit directory should be")
    return "state/audit.db"


def _blocked_by_a_directory(directory: Path) -> str:
    (directory / "audit.db").mkdir()
    return "audit.db"


def _read_only_directory(directory: Path) -> str:
    (directory / "ro").mkdir()
    (directory / "ro").chmod(0o555)
    return "ro/audit.db"


def _read_only_file(directory: Path) -> str:
    store = AuditStore.open_writer(directory / "audit.db")
    store.close()
    for path in directory.glob("audit.db*"):
        path.chmod(0o444)
    return "audit.db"


@pytest.mark.parametrize(
    "make_unwritable",
    [
        pytest.param(_blocked_by_a_file, id="parent-is-a-file"),
        pytest.param(_blocked_by_a_directory, id="path-is-a-directory"),
        pytest.param(_read_only_directory, id="read-only-directory"),
        pytest.param(_read_only_file, id="read-only-file"),
    ],
)
async def test_an_unwritable_audit_log_refuses_calls_and_the_gateway_keeps_answering(
    tmp_path: Path, make_unwritable: Any
) -> None:
    if make_unwritable in (_read_only_directory, _read_only_file) and os.geteuid() == 0:
        pytest.skip("permission bits do not stop root; the two variants above cover this as root")
    record = tmp_path / "calls.jsonl"
    audit = make_unwritable(tmp_path)
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))
    config = write_config(tmp_path, {"box": box}, policy=POLICY, audit=audit)
    async with gateway_client(config) as client:
        assert "box__echo" in {tool.name for tool in (await client.list_tools()).tools}
        for _ in range(2):
            refused = await client.call_tool("box__echo", {"text": "hi"})
            assert refused.is_error
            assert "the audit log cannot record this call, so it is not made" in text_of(refused)
    assert not record.exists()  # never forwarded


async def test_calls_resume_once_the_audit_log_can_be_written_again(tmp_path: Path) -> None:
    audit = _blocked_by_a_file(tmp_path)
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY, audit=audit)
    async with gateway_client(config) as client:
        assert (await client.call_tool("box__echo", {"text": "blocked"})).is_error
        (tmp_path / "state").unlink()
        assert text_of(await client.call_tool("box__echo", {"text": "recorded"})) == "recorded"
    store = AuditStore.open_reader(tmp_path / "state" / "audit.db")
    events = list(store.events())
    decisions = [event for event in events if event["kind"] == "decision"]
    # The refused call is in the log too, recorded once it could be written, as the agent was told.
    assert [event["arguments"]["text"] for event in decisions] == ["blocked", "recorded"]
    outcomes = {event["call_id"]: event for event in events if event["kind"] == "outcome"}
    blocked = outcomes[decisions[0]["call_id"]]
    assert blocked["outcome"] == "refused" and "the audit log cannot record this call" in blocked["reason"]
    assert outcomes[decisions[1]["call_id"]]["outcome"] == "ok"


async def test_calls_in_flight_at_shutdown_are_recorded_as_cancelled(config: Path) -> None:
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.initialize()
            await raw.send(raw.call(1, "box__slow", {"steps": 400}, progressToken="p"))
            while (await raw.receive()).get("method") != "notifications/progress":
                pass
            # Stopped: a client that closed the gateway's input and saw it go on answering stops it so.
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    seen = calls(config.parent)
    assert seen["box__slow"]["outcome"]["outcome"] == "cancelled"
    kinds = [event["kind"] for event in events(config.parent)]
    assert kinds.count("session_end") == 1 and kinds.index("session_end") > kinds.index("outcome")


async def test_calls_answered_just_before_the_gateway_is_killed_are_in_the_log_once(config: Path) -> None:
    """Killed with events journaled but maybe not yet in the chain: the next gateway moves them in, once."""
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.initialize()
            for index in range(1, 4):
                await raw.send(raw.call(index, "box__echo", {"text": f"before the crash {index}"}))
                while (answer := await raw.receive()).get("id") != index:
                    pass
                assert "result" in answer, answer
        proc.kill()  # no shutdown: nothing more is committed
        await proc.wait()
    journals = config.parent / ".mcp-armor" / "audit.journal"
    assert len(list(journals.glob("*.jsonl"))) == 1  # the killed gateway's, left behind
    async with gateway_client(config) as client:  # the next gateway recovers it while starting
        assert "box__echo" in {tool.name for tool in (await client.list_tools()).tools}
    assert list(journals.glob("*.jsonl")) == []
    echoed = [event for event in events(config.parent) if event["tool"] == "box__echo"]
    decisions = sorted(event["arguments"]["text"] for event in echoed if event["kind"] == "decision")
    assert decisions == [f"before the crash {index}" for index in range(1, 4)]
    assert [event["outcome"] for event in echoed if event["kind"] == "outcome"] == ["ok"] * 3
    store = AuditStore.open_reader(config.parent / ".mcp-armor" / "audit.db")
    try:
        assert store.verify().problem is None
    finally:
        store.close()


async def call_sloppy(config: Path, *calls: tuple[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Make `calls` (tool, arguments) through a gateway over raw pipes; its answers by call number (1, 2, ...)."""
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.initialize()
            for number, (tool, arguments) in enumerate(calls, 1):
                await raw.send(raw.call(number, tool, arguments))
            answers: dict[int, dict[str, Any]] = {}
            while len(answers) < len(calls):
                message = await raw.receive()
                if "id" in message:
                    answers[message["id"]] = message
    return answers


async def test_nan_and_infinity_in_arguments_are_refused_and_in_results_fail_the_call_recorded(tmp_path: Path) -> None:
    """Numbers JSON cannot carry: arguments carrying them are refused before any decision (never forwarded
    as something else); a result carrying them fails its call, and that outcome is recorded."""
    config = write_config(tmp_path, {"sloppy": fixture_upstream("sloppy.py")})
    answers = await call_sloppy(
        config,
        ("sloppy__loose", {"ratio": float("nan"), "cap": float("-inf")}),
        ("sloppy__nan_result", {}),
    )
    assert answers[1]["error"]["code"] == -32602
    assert "a number JSON cannot carry" in answers[2]["result"]["content"][0]["text"]
    seen = calls(tmp_path)
    assert "sloppy__loose" not in seen
    assert seen["sloppy__nan_result"]["outcome"]["outcome"] == "error"
    assert "upstream 'sloppy'" in seen["sloppy__nan_result"]["outcome"]["reason"]
    assert cli(config, "audit", "verify").returncode == 0


async def test_a_lone_surrogate_in_a_result_reaches_the_agent_escaped_and_is_recorded(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"sloppy": fixture_upstream("sloppy.py")})
    answers = await call_sloppy(config, ("sloppy__lone_surrogate", {}), ("sloppy__loose", {}))
    assert answers[1]["result"]["content"] == [{"type": "text", "text": "half \ud800 a pair"}]
    assert answers[2]["result"]["content"][0]["text"] == "loose ok"  # and the gateway kept serving
    seen = calls(tmp_path)
    assert seen["sloppy__lone_surrogate"]["outcome"]["outcome"] == "ok"
    assert cli(config, "audit", "verify").returncode == 0


async def test_kill_9_during_a_burst_leaves_a_valid_chain(config: Path) -> None:
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        answered: set[int] = set()
        with anyio.fail_after(30):
            await raw.initialize()
            for call_id in range(1, 201):
                await raw.send(raw.call(call_id, "box__echo", {"text": f"burst {call_id}"}))
            while len(answered) < 20:
                message = await raw.receive()
                if "result" in message:
                    answered.add(message["id"])
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    assert cli(config, "audit", "verify").returncode == 0
    recorded = {
        int(event["arguments"]["text"].split()[1]): event["kind"]
        for event in events(config.parent)
        if event["kind"] == "decision"
    }
    outcomes = Counter(event["call_id"] for event in events(config.parent) if event["kind"] == "outcome")
    assert set(recorded) >= answered  # every answer the client saw was recorded before it was sent
    assert all(count == 1 for count in outcomes.values())


async def test_serve_prints_a_line_per_call_and_tail_follows_live(config: Path) -> None:
    logs: list[ServerLog] = []
    async with http_gateway(config, logs) as url:
        async with Client(url) as client:
            await client.call_tool("box__echo", {"text": "one"})
            await logs[0].wait_for(r"\S+ box__echo allow \[box-open\] -> ok \d")
            follower = await anyio.open_process(
                [sys.executable, "-m", "gateway", "audit", "tail", "-f", "-n", "1", "--config", str(config)],
                cwd=REPO,
            )
            try:
                assert follower.stdout is not None
                seen = b""
                with anyio.fail_after(20):
                    while b"\n" not in seen:  # -n 1: the latest event, then it follows
                        seen += await follower.stdout.receive()
                    assert b"outcome box__echo ok" in seen and b"decision" not in seen
                    await client.call_tool("box__fail", {})
                    while b"box__fail refused" not in seen:
                        seen += await follower.stdout.receive()
                assert b"decision box__fail deny box-open,no-failing" in seen
            finally:
                follower.terminate()
                await follower.wait()
    quiet: list[ServerLog] = []
    async with gateway_process(config, "--http", "127.0.0.1:0", "--quiet") as (_, log):
        quiet.append(log)
        url = (await log.wait_for(r"serving streamable HTTP at (http://\S+/mcp)", seconds=30))[1]
        async with Client(url) as client:
            await client.call_tool("box__echo", {"text": "two"})
    assert "box__echo" not in quiet[0].text


async def test_replay_lists_the_calls_a_policy_change_would_decide_differently(config: Path) -> None:
    async with gateway_client(config) as client:
        for text in ("a", "b"):
            await client.call_tool("box__echo", {"text": text})
        await client.call_tool("box__fail", {})
        await client.call_tool("box__add", {"a": "x", "b": 1})
    unchanged = json.loads(cli(config, "policy", "replay", "--json").stdout)
    assert unchanged["replayed"] == 3 and unchanged["changed"] == [] and unchanged["skipped"] == 1

    write_policy(config.parent / "policies", POLICY.replace('"box__echo", ', ""))
    changed = json.loads(cli(config, "policy", "replay", "--json").stdout)
    assert [(row["tool"], row["recorded"], row["now"]) for row in changed["changed"]] == [
        ("box__echo", "allow", "deny"),
        ("box__echo", "allow", "deny"),
    ]
    table = cli(config, "policy", "replay", "--tool", "box__echo")
    assert "allow -> deny" in table.stdout
    assert "2 recorded calls replayed" in table.stdout

    # Rules for this client only: the replay knows each session's client even when filtering by tool.
    for_client = POLICY + '[[rule]]\nid = "echo-for-mcp"\ntools = ["box__echo"]\nclients = ["mcp*"]\neffect = "allow"\n'
    write_policy(config.parent / "policies", for_client.replace('"box__echo", ', ""))
    filtered = json.loads(cli(config, "policy", "replay", "--tool", "box__echo", "--json").stdout)
    assert filtered["replayed"] == 2 and filtered["changed"] == []

    exported = [json.loads(line) for line in cli(config, "audit", "export", "--format", "jsonl").stdout.splitlines()]
    assert [event["seq"] for event in exported] == list(range(1, len(exported) + 1))
    fixed = ["seq", "ts", "kind", "session_id", "call_id", "upstream", "tool", "arguments", "decision", "rules"]
    fixed += ["reason", "outcome", "duration_ms", "principal", "attributes", "prev_hash", "hash"]
    assert all(set(fixed) <= set(event) for event in exported)
    denied = cli(config, "audit", "export", "--decision", "deny")
    assert {json.loads(line)["tool"] for line in denied.stdout.splitlines()} == {"box__fail", "box__add"}
    shown = cli(config, "audit", "sessions")
    assert shown.stdout.splitlines()[0].split() == [
        "SESSION",
        "CLIENT",
        "PRINCIPAL",
        "TRANSPORT",
        "START",
        "END",
        "CALLS",
        "REFUSED",
    ]


@pytest.mark.parametrize("ended_by", ["cancel", "hang-up"])
async def test_a_call_ended_while_upstreams_are_still_starting_is_recorded(tmp_path: Path, ended_by: str) -> None:
    """The call waits for upstreams that have not answered `initialize` yet; cancelled (or the client
    gone) before they do, it still gets its decision and its outcome, and nothing reached an upstream."""
    mute = tmp_path / "mute.py"
    mute.write_text("import sys\nsys.stdin.buffer.read()\n")  # never answers, ends when its stdin closes
    # Once the client hung up, a call read before is given `call_timeout` to finish, then cancelled.
    config = write_config(tmp_path, {"box": {"command": sys.executable, "args": [str(mute)]}}, call_timeout="1s")
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.initialize()
            await raw.send(raw.call(1, "box__echo", {"text": "too early"}))
            if ended_by == "cancel":
                await raw.send({"method": "notifications/cancelled", "params": {"requestId": 1}})
            assert proc.stdin is not None
            await proc.stdin.aclose()
            assert await proc.wait() == 0
    seen = calls(tmp_path)
    assert list(seen) == ["box__echo"]
    decision, outcome = seen["box__echo"]["decision"], seen["box__echo"]["outcome"]
    assert (decision["decision"], decision["stage"], decision["arguments"]) == (
        "deny",
        "startup",
        {"text": "too early"},
    )
    assert outcome["outcome"] == "cancelled" and "still starting" in outcome["reason"]
