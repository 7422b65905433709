"""`mcp-armor approvals list | show | approve | deny` against real gateway processes and real MCP clients:
the calls wait in the shared queue, and only the command line (never anything over MCP) decides them."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import pwd
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client

from gateway.audit.approvals import ApprovalQueue, AskedCall, Entry, Status
from gateway.config.models import load_config
from tests.conftest import REPO, events, fixture_upstream, gateway_client, read_records, run_cli, text_of, write_config

pytestmark = pytest.mark.anyio

POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "notes"
tools = ["box__write_note"]
effect = "ask"
reason = "notes are kept"

[[rule]]
id = "echoes"
tools = ["box__echo"]
effect = "ask"
"""
USER = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def config(tmp_path: Path, record: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=POLICY)


async def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mcp-armor approvals ARGS --config CONFIG`, off the event loop (the clients keep being served)."""
    return await anyio.to_thread.run_sync(lambda: run_cli("approvals", *args, "--config", str(config), cwd=REPO))


def queue(config: Path) -> ApprovalQueue:
    return ApprovalQueue(load_config(config).approvals_path)


async def until(config: Path, check: Callable[[list[Entry]], bool], seconds: float = 30) -> list[Entry]:
    """The queue's rows (newest first) once `check` holds of them, looked at until the deadline."""
    with anyio.fail_after(seconds):
        while not check(rows := queue(config).entries()):  # noqa: ASYNC110 - another process writes the file
            await anyio.sleep(0.05)
    return rows


async def pending(config: Path, count: int) -> list[Entry]:
    rows = await until(config, lambda rows: sum(row.status is Status.PENDING for row in rows) >= count)
    return [row for row in rows if row.status is Status.PENDING]


Results = dict[str, types.CallToolResult]


def caller(client: Client, results: Results) -> Callable[[str, str, dict[str, Any]], Awaitable[None]]:
    async def call(key: str, tool: str, arguments: dict[str, Any]) -> None:
        results[key] = await client.call_tool(tool, arguments)

    return call


async def test_two_gateways_share_the_queue_and_the_command_line_decides(
    config: Path, record: Path, tmp_path: Path
) -> None:
    results: Results = {}
    async with gateway_client(config) as first, gateway_client(config) as second, anyio.create_task_group() as tg:
        tg.start_soon(caller(first, results), "first", "box__write_note", {"path": "notes/first", "body": "one"})
        tg.start_soon(caller(second, results), "second", "box__write_note", {"path": "notes/second", "body": "two"})
        await pending(config, 2)
        listed = json.loads((await cli(config, "list", "--json")).stdout)
        by_path = {row["arguments"]["path"]: row for row in listed["pending"]}
        assert set(by_path) == {"notes/first", "notes/second"}
        assert len({row["gateway"] for row in listed["pending"]}) == 2  # held by two processes
        assert {row["status"] for row in listed["pending"]} == {"pending"}
        assert all(row["rules"] == ["notes"] for row in listed["pending"])
        first_id, second_id = by_path["notes/first"]["id"], by_path["notes/second"]["id"]

        approved = await cli(config, "approve", first_id, "--yes")
        assert approved.returncode == 0, approved.stderr
        assert '"path": "notes/first"' in approved.stdout
        assert approved.stdout.splitlines()[-1] == f"approval {first_id}: approved by {USER} (cli)"
        denied = await cli(config, "deny", second_id, "--reason", "not that note")
        assert denied.returncode == 0, denied.stderr
        assert denied.stdout.splitlines()[-1] == f"approval {second_id}: denied by {USER} (cli)"

    assert not results["first"].is_error, text_of(results["first"])
    assert text_of(results["first"]) == "stored notes/first"
    assert results["second"].is_error
    assert f"denied by {USER} (cli): not that note" in text_of(results["second"])
    assert [call["arguments"]["path"] for call in read_records(record)] == ["notes/first"]

    logged = events(tmp_path)
    approvals = {row["entry"]: row for row in logged if row["kind"] == "approval"}
    assert {entry: row["approval"] for entry, row in approvals.items()} == {first_id: "approved", second_id: "denied"}
    assert approvals[second_id]["note"] == "not that note" and approvals[second_id]["by"] == USER
    assert approvals[first_id]["channel"] == "cli" and approvals[first_id]["tool"] == "box__write_note"
    decisions = {row["approval_request"]["entry"]: row for row in logged if row.get("approval_request")}
    for entry, answer in ((first_id, "granted"), (second_id, "declined")):
        request = decisions[entry]["approval_request"]
        assert (request["answer"], request["by"], request["through"]) == (answer, USER, "cli")
        # The approval was recorded before the call it decided went on.
        assert approvals[entry]["seq"] < decisions[entry]["seq"]
        assert approvals[entry]["call_id"] == decisions[entry]["call_id"]
        assert approvals[entry]["session_id"] == decisions[entry]["session_id"]

    shown = run_cli("audit", "tail", "--kind", "approval", "--config", str(config), cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and " approval box__write_note approved " in lines[0] + lines[1]
    session = decisions[first_id]["session_id"]
    timeline = run_cli("audit", "show", session, "--config", str(config), cwd=REPO).stdout
    assert f"granted by {USER} (cli)" in timeline and f"approval {first_id} approved by {USER} (cli)" in timeline
    exported = run_cli("audit", "export", "--config", str(config), cwd=REPO).stdout.splitlines()
    assert sum(json.loads(line)["kind"] == "approval" for line in exported) == 2
    verified = run_cli("audit", "verify", "--config", str(config), cwd=REPO)
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stdout


async def test_approving_needs_a_terminal_or_yes_and_decides_only_once(config: Path, tmp_path: Path) -> None:
    results: Results = {}
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(caller(client, results), "note", "box__write_note", {"path": "notes/a", "body": "b"})
        (entry,) = await pending(config, 1)

        refused = await cli(config, "approve", entry.id)
        assert refused.returncode == 2
        assert refused.stderr.splitlines() == [
            "mcp-armor: error: not on a terminal, so nobody can be asked to confirm: nothing was approved "
            "(give --yes to approve the call shown without being asked)"
        ]
        assert queue(config).get(entry.id).status is Status.PENDING  # type: ignore[union-attr]
        assert not [row for row in events(tmp_path) if row["kind"] == "approval"]

        said_no = await anyio.to_thread.run_sync(on_a_terminal, config, entry.id, "n\n")
        assert '"path": "notes/a"' in "\n".join(said_no)  # the call is shown before the question
        assert said_no[-2:] == ["Approve this call? [y/N] n", f"approval {entry.id}: not approved; nothing changed"]
        assert queue(config).get(entry.id).status is Status.PENDING  # type: ignore[union-attr]

        said_yes = await anyio.to_thread.run_sync(on_a_terminal, config, entry.id, "y\n")
        assert said_yes[-2:] == ["Approve this call? [y/N] y", f"approval {entry.id}: approved by {USER} (cli)"]
    assert text_of(results["note"]) == "stored notes/a"

    await until(config, lambda rows: rows[0].status is Status.USED)
    again = await cli(config, "approve", entry.id, "--yes")
    assert again.returncode == 2
    assert (
        again.stderr.splitlines()[-1]
        == f"mcp-armor: error: approval {entry.id} is used by {USER} (cli): nothing to decide"
    )
    denied_late = await cli(config, "deny", entry.id)
    assert denied_late.stderr.splitlines()[-1].endswith("nothing to decide")
    assert sum(row["kind"] == "approval" for row in events(tmp_path)) == 1

    unknown = await cli(config, "show", "zzzzzzzz")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines() == [
        f"mcp-armor: error: no approval 'zzzzzzzz' in {tmp_path / '.mcp-armor' / 'approvals.db'} "
        "(see `mcp-armor approvals list --all`)"
    ]


def on_a_terminal(config: Path, entry_id: str, answer: str) -> list[str]:
    """`approvals approve ID` with a terminal for its input and output, answering `answer` when asked: the
    lines it wrote there."""
    controller, terminal = pty.openpty()
    written = b""
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "gateway", "approvals", "approve", entry_id, "--config", str(config)],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]},
        ) as process:
            os.close(terminal)
            deadline = time.monotonic() + 60
            answered = False
            while time.monotonic() < deadline:
                if not select.select([controller], [], [], 1)[0]:
                    continue
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the process ended, and its terminal with it
                    break
                written += chunk
                if not answered and b"[y/N] " in written:
                    os.write(controller, answer.encode())
                    answered = True
            process.wait(timeout=10)
    finally:
        os.close(controller)
    return written.decode().replace("\r\n", "\n").splitlines()


async def test_an_expired_approval_cannot_be_approved_and_the_asks_are_counted_per_rule(tmp_path: Path) -> None:
    """One config whose asks expire after a second, and one beside it on the same state directory."""
    box = fixture_upstream("toolbox.py")
    state = str(tmp_path / "state")
    (tmp_path / "hasty").mkdir()
    (tmp_path / "patient").mkdir()
    hasty = write_config(tmp_path / "hasty", {"box": box}, policy=POLICY, ask_timeout="1s", state=state)
    patient = write_config(tmp_path / "patient", {"box": box}, policy=POLICY, state=state)

    async with gateway_client(hasty) as client:
        expired = await client.call_tool("box__write_note", {"path": "notes/late", "body": "b"})
    assert expired.is_error
    (entry,) = await until(hasty, lambda rows: bool(rows) and rows[0].status is Status.EXPIRED)
    shown = await cli(patient, "show", entry.id)
    assert shown.stdout.splitlines()[0] == f"approval {entry.id}: expired"
    late = await cli(patient, "approve", entry.id, "--yes")
    assert late.returncode == 2
    assert late.stderr.splitlines()[-1] == f"mcp-armor: error: approval {entry.id} is expired: nothing to decide"

    results: Results = {}
    async with gateway_client(patient) as client, anyio.create_task_group() as tg:
        call = caller(client, results)
        tg.start_soon(call, "yes", "box__write_note", {"path": "notes/yes", "body": "b"})
        tg.start_soon(call, "no", "box__write_note", {"path": "notes/no", "body": "b"})
        tg.start_soon(call, "echo", "box__echo", {"text": "hi"})
        rows = {row.call.arguments.get("path", "echo"): row for row in await pending(patient, 3)}
        assert (await cli(patient, "approve", rows["notes/yes"].id, "--yes")).returncode == 0
        assert (await cli(patient, "deny", rows["notes/no"].id)).returncode == 0
        assert (await cli(patient, "deny", rows["echo"].id, "--reason", "no echo")).returncode == 0

    listed = json.loads((await cli(patient, "list", "--json", "--all")).stdout)
    assert listed["pending"] == []
    counts = {rule["rule"]: rule for rule in listed["asks"]["rules"]}
    assert {
        rule: (row["asked"], row["approved"], row["denied"], row["unanswered"]) for rule, row in counts.items()
    } == {
        "notes": (3, 1, 1, 1),
        "echoes": (1, 0, 1, 0),
    }
    assert counts["notes"]["per_hour"] == round(3 / 24, 2)
    assert {row["status"] for row in listed["decided"]} == {"used", "denied", "expired"}

    table = (await cli(patient, "list", "--all", "--since", "2h")).stdout.splitlines()
    assert table[0] == "(no approval pending)"
    assert "asks in the last 2h:" in table
    heading = table.index("asks in the last 2h:")
    assert table[heading + 1].split() == ["RULE", "ASKS", "PER", "HOUR", "APPROVED", "DENIED", "UNANSWERED"]
    assert table[heading + 2].split() == ["notes", "3", "1.5", "1", "1", "1"]
    assert any(line.split()[2:5] == ["denied", USER, "cli"] for line in table[:heading])


async def test_show_prints_every_argument_long_ones_shortened_and_secrets_masked(config: Path) -> None:
    text = "x" * 5000
    secret = "ghp_" + "A1b2" * 9
    arguments = {"text": text, "path": "notes/a", "api_key": "hunter2-hunter2", "note": f"use {secret} please"}
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(caller(client, {}), "echo", "box__echo", arguments)
        (entry,) = await pending(config, 1)
        shown = await cli(config, "show", entry.id)
        as_json = json.loads((await cli(config, "show", entry.id, "--json")).stdout)
        await cli(config, "deny", entry.id)

    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"approval {entry.id}: pending, expires in ")
    assert "  tool:       box__echo (tool 'echo' of upstream 'box')" in lines
    assert "  rules:      echoes" in lines
    assert f"  binding:    sha256 {entry.binding}" in lines
    assert f"  session:    {entry.call.session}" in lines
    arguments_at = lines.index("arguments (forwarded as the agent sent them):")
    shown_arguments = [line.strip() for line in lines[arguments_at + 1 :]]
    assert shown_arguments[0] == '"path": "notes/a"'  # path-like first
    assert [line.split(":")[0] for line in shown_arguments] == ['"path"', '"api_key"', '"note"', '"text"']
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    (long,) = [line for line in shown_arguments if line.startswith('"text"')]
    assert long.endswith(f"left out in the middle; sha256 {digest}]") and "[5,000 characters, " in long
    assert secret not in out and "hunter2" not in out and out.count("[masked:") == 2
    assert secret not in json.dumps(as_json) and as_json["arguments"]["path"] == "notes/a"


async def test_nothing_over_mcp_can_decide_an_approval(config: Path, tmp_path: Path) -> None:
    """The agent's side of the gateway offers nothing of the gateway's own: no tool, prompt or resource
    decides (or even lists) an approval; the row stays pending until the command line decides it."""
    results: Results = {}
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(caller(client, results), "note", "box__write_note", {"path": "notes/a", "body": "b"})
        (entry,) = await pending(config, 1)
        tools = (await client.list_tools()).tools
        prompts = (await client.list_prompts()).prompts
        resources = (await client.list_resources()).resources
        templates = (await client.list_resource_templates()).resource_templates
        assert tools and all(tool.name.startswith("box__") for tool in tools)  # the upstream's, none of its own
        names = [item.name for item in [*tools, *prompts, *resources, *templates]]
        assert not [name for name in names if "approv" in name.lower() or "decide" in name.lower()]
        offered = json.dumps([item.model_dump(mode="json") for item in [*tools, *prompts, *resources, *templates]])
        assert entry.id not in offered and "approvals.db" not in offered
        # An agent naming the queue file through an upstream's path argument is refused by the built-in rule.
        reached = await client.call_tool("box__echo", {"text": "x", "path": str(tmp_path / ".mcp-armor/approvals.db")})
        assert reached.is_error and "builtin:gateway-files" in text_of(reached)
        assert queue(config).get(entry.id).status is Status.PENDING  # type: ignore[union-attr]
        assert (await cli(config, "approve", entry.id, "--yes")).returncode == 0
    assert text_of(results["note"]) == "stored notes/a"


async def test_a_queue_file_that_cannot_be_read_is_one_line(config: Path, tmp_path: Path) -> None:
    state = tmp_path / ".mcp-armor"
    state.mkdir(mode=0o700)
    (state / "approvals.db").write_bytes(b"not a database at all" * 100)
    (state / "approvals.db").chmod(0o600)
    listed = await cli(config, "list")
    assert listed.returncode == 2
    (line,) = listed.stderr.splitlines()
    assert line.startswith(f"mcp-armor: error: {state / 'approvals.db'}: the approval queue cannot be read: ")


REWRITTEN = """
[defaults]
effect = "allow"

[[rule]]
id = "notes"
tools = ["box__write_note"]
effect = "ask"

[[rule]]
id = "append"
tools = ["box__write_note"]
effect = "rewrite"
set = { options = { mode = "append" } }
"""


async def test_show_prints_the_agents_arguments_and_the_rewritten_ones(tmp_path: Path, record: Path) -> None:
    config = write_config(
        tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=REWRITTEN
    )
    results: Results = {}
    async with gateway_client(config) as client, anyio.create_task_group() as tg:
        tg.start_soon(caller(client, results), "note", "box__write_note", {"path": "notes/a", "body": "b"})
        (entry,) = await pending(config, 1)
        shown = await cli(config, "approve", entry.id, "--yes")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    sent = lines.index("arguments the agent sent (a rule rewrote them):")
    forwarded = lines.index("arguments the upstream would receive:")
    assert [line.strip() for line in lines[sent + 1 : forwarded]] == ['"path": "notes/a"', '"body": "b"']
    assert [line.strip() for line in lines[forwarded + 1 : -1]] == [
        '"path": "notes/a"',
        '"body": "b"',
        '"options": object of 1 key',
        '"mode": "append"',
    ]
    assert text_of(results["note"]) == "stored notes/a"
    assert read_records(record)[-1]["arguments"]["options"] == {"mode": "append"}


def test_the_decider_is_the_os_user_and_a_client_chosen_name_is_escaped(config: Path, tmp_path: Path) -> None:
    """`by` is the process's user whatever `$USER` claims; who decided first, when that is an agent's
    client (its name its own choice), is written out as escapes."""
    waiting = queue(config)
    call = AskedCall("c1", "s1", "client 1", "", "box__write_note", "box", "write_note", {}, ("notes",), "why", "r")
    first, second = waiting.ask(call, "binding", 600), waiting.ask(call, "binding", 600)
    claimed = {"USER": "mallory", "LOGNAME": "mallory", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    denied = subprocess.run(
        [sys.executable, "-m", "gateway", "approvals", "deny", first.id, "--json", "--config", str(config)],
        env={**claimed, "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert denied.returncode == 0, denied.stderr
    assert json.loads(denied.stdout)["decided_by"] == USER != "mallory"
    assert [row["by"] for row in events(tmp_path) if row["kind"] == "approval"] == [USER]

    waiting.decide(second.id, approve=True, by="agent\x1b[2J (the agent's client)", channel="elicitation")
    late = run_cli("approvals", "approve", second.id, "--yes", "--config", str(config), cwd=REPO)
    assert late.returncode == 2 and "\x1b" not in late.stderr
    assert late.stderr.splitlines()[-1] == (
        f"mcp-armor: error: approval {second.id} is approved by agent\\x1b[2J (the agent's client) "
        "(elicitation): nothing to decide"
    )


def test_a_decision_the_audit_log_cannot_record_is_not_taken(tmp_path: Path) -> None:
    """The audit log is a directory here, so nothing can be appended to it: the row stays pending."""
    (tmp_path / "log-in-the-way").mkdir()
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY, audit="log-in-the-way")
    call = AskedCall("c1", "s1", "client 1", "", "box__write_note", "box", "write_note", {}, ("notes",), "why", "r")
    entry = queue(config).ask(call, "binding", 600)
    for verb in (["approve", "--yes"], ["deny"]):
        refused = run_cli("approvals", *verb, entry.id, "--config", str(config), cwd=REPO)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].startswith(
            "mcp-armor: error: the change cannot be recorded in the audit log, so nothing changed: "
        )
        assert queue(config).get(entry.id).status is Status.PENDING  # type: ignore[union-attr]
