"""The audit commands as real processes, on logs written through the store API: piped into a reader that
stops early, catalogue changes folded, `--kind`, following a log that does not exist yet, approvals."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import mcp_types as types
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from gateway.audit.chain import canonical
from gateway.audit.journal import SUFFIX, journal_directory
from gateway.audit.store import KINDS, AuditStore, event
from tests.conftest import REPO, fixture_upstream, gateway_client, write_config

SESSION = "5e5510a0" * 4


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})


def record(config: Path, *events: dict[str, Any]) -> None:
    """Append `events` to the configuration's audit log, as a gateway would have recorded them."""
    store = AuditStore.open_writer(config.parent / ".mcp-armor" / "audit.db")
    try:
        store.append([canonical(body) for body in events])
    finally:
        store.close()


def command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args, "--config", str(config)]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(config, *args), capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def calls(count: int) -> list[dict[str, Any]]:
    arguments = {"text": "x" * 200}
    return [
        event("decision", session_id=SESSION, call_id=f"c{index}", tool="box__echo", arguments=arguments)
        for index in range(count)
    ]


@pytest.mark.parametrize(
    "args", [["audit", "export"], ["audit", "tail", "-n", "5000"], ["audit", "show", SESSION[:8]]], ids=str
)
def test_output_cut_short_by_its_reader_ends_quietly(config: Path, args: list[str]) -> None:
    record(config, event("session_start", session_id=SESSION), *calls(5000))  # far more than a pipe holds
    with subprocess.Popen(command(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `head -1` does
        _, stderr = proc.communicate(timeout=60)
    assert first.strip()
    assert stderr == b""
    assert proc.returncode == 141


def catalog(upstream: str, change: str, count: int) -> list[dict[str, Any]]:
    digest = "ab" * 32
    return [
        event("catalog", upstream=upstream, tool=f"{upstream}__t{index}", change=change, tool_digest=digest)
        for index in range(count)
    ]


STARTUP = [
    event("upstream", upstream="git", outcome="up", reason="started"),
    *catalog("git", "added", 26),
    *catalog("time", "added", 2),
    event("session_start", session_id=SESSION, client_name="claude-code", transport="stdio"),
    *catalog("git", "removed", 3),
    *catalog("git", "changed", 2),
    event("decision", session_id=SESSION, call_id="c1", tool="git__t9", decision="allow"),
]
STAMP = r"\S+Z"


def lines_of(text: str) -> list[str]:
    """Output lines with the timestamps taken out and runs of spaces made one."""
    return [" ".join(re.sub(STAMP, "TS", line).split()) for line in text.splitlines()]


def test_tail_folds_each_upstream_catalogue_change_into_one_line(config: Path) -> None:
    record(config, *STARTUP)
    folded = cli(config, "audit", "tail")
    assert folded.returncode == 0, folded.stderr
    assert lines_of(folded.stdout) == [
        "1 TS - upstream git up started",
        "2-27 TS - catalog: git +26 tools",
        "28-29 TS - catalog: time +2 tools (time__t0, time__t1)",
        f"30 TS {SESSION[:8]} session_start claude-code over stdio",
        "31-35 TS - catalog: git -3 tools, ~2 changed",
        f"36 TS {SESSION[:8]} decision git__t9 allow",
    ]
    assert lines_of(cli(config, "audit", "tail", "-n", "2").stdout) == lines_of(folded.stdout)[-2:]
    assert lines_of(cli(config, "audit", "tail", "-n", "5").stdout) == lines_of(folded.stdout)[-5:]


def test_tail_kind_selects_kinds_and_shows_them_one_by_one(config: Path) -> None:
    record(config, *STARTUP)
    chosen = cli(config, "audit", "tail", "--kind", "upstream,decision", "--kind", "session_start")
    assert [line.split()[0] for line in chosen.stdout.splitlines()] == ["1", "30", "36"]
    catalogue = cli(config, "audit", "tail", "-n", "40", "--kind", "catalog").stdout.splitlines()
    assert len(catalogue) == 33
    assert lines_of(catalogue[0]) == ["2 TS - catalog git__t0 added abababababab"]
    wrong = cli(config, "audit", "tail", "--kind", "catalogue")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("mcp-armor: error: --kind: unknown kind 'catalogue' (one of: session_start, ")


def test_every_kind_the_gateway_records_is_known_to_the_kind_filter() -> None:
    sources = "".join(path.read_text() for path in (REPO / "gateway").rglob("*.py"))
    recorded = set(re.findall(r"\bevent\(\s*\"([a-z_]+)\"", sources))
    assert recorded and recorded <= set(KINDS)


class Follower:
    """`audit tail -f` as a process: its output read line by line, under deadlines."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout = BufferedByteReceiveStream(proc.stdout)
        self.stderr = BufferedByteReceiveStream(proc.stderr)

    async def line(self, stream: BufferedByteReceiveStream | None = None) -> str:
        """The next line (without its newline), of stdout unless `stream` says otherwise."""
        with anyio.fail_after(20):
            raw = await (stream or self.stdout).receive_until(b"\n", 65536)
        return raw.decode()


@asynccontextmanager
async def following(config: Path, *args: str) -> AsyncIterator[Follower]:
    proc = await anyio.open_process(command(config, "audit", "tail", "-f", *args), cwd=REPO)
    try:
        yield Follower(proc)
    finally:
        proc.terminate()
        with anyio.fail_after(20):
            await proc.wait()
        await proc.aclose()


@pytest.mark.anyio
async def test_tail_follow_folds_catalogue_changes_as_they_come(config: Path) -> None:
    record(config, event("upstream", upstream="git", outcome="up", reason="started"))
    async with following(config, "-n", "1") as tail:
        assert (await tail.line()).startswith("1 ")
        record(config, *catalog("git", "added", 26), event("upstream", upstream="time", outcome="up", reason="x"))
        assert re.fullmatch(r"2-27 \S+ - catalog: git \+26 tools", (await tail.line()).rstrip())
        assert (await tail.line()).startswith("28 ")
        record(config, *catalog("time", "removed", 4))  # nothing after it: printed once the log is quiet
        assert re.fullmatch(r"29-32 \S+ - catalog: time -4 tools", (await tail.line()).rstrip())


@pytest.mark.anyio
async def test_tail_follow_waits_for_a_log_that_does_not_exist_yet(config: Path) -> None:
    log = config.parent / ".mcp-armor" / "audit.db"
    missing = cli(config, "audit", "tail")
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"mcp-armor: error: {log}: no audit log here (it is created when the gateway first serves)"
    )
    async with following(config) as tail:
        assert await tail.line(tail.stderr) == f"mcp-armor: waiting for {log} (there is no audit log yet)"
        record(config, event("upstream", upstream="git", outcome="up", reason="started"))
        assert (await tail.line()).startswith("1 ")
        record(config, event("upstream", upstream="git", outcome="down", reason="stopped"))
        assert (await tail.line()).startswith("2 ")


class Answer:
    """A person answering the gateway's approval request in the client."""

    def __init__(self, action: str) -> None:
        self.action = action

    async def __call__(self, context: Any, params: Any) -> types.ElicitResult:
        return types.ElicitResult(action=self.action, content={"approve": True} if self.action == "accept" else None)


ASKING = """
[defaults]
effect = "allow"

[[rule]]
id = "notes-asked"
tools = ["box__write_note"]
effect = "ask"
"""


def approvals_shown(config: Path, session: str) -> list[str]:
    header, *lines = cli(config, "audit", "show", session).stdout.splitlines()
    start, end = header.index("APPROVAL"), header.index("RULES")
    return [line[start:end].strip() for line in lines if line[start:end].strip()]


@pytest.mark.anyio
async def test_show_says_what_became_of_each_approval_and_where_it_was_asked(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=ASKING)
    note = {"path": "notes/a", "body": "x"}
    async with gateway_client(config, elicitation=Answer("accept")) as client:
        assert not (await client.call_tool("box__write_note", note)).is_error
        assert not (await client.call_tool("box__echo", {"text": "x"})).is_error
    async with gateway_client(config, elicitation=Answer("decline")) as client:
        assert (await client.call_tool("box__write_note", note)).is_error
    async with gateway_client(config, mode="auto", elicitation=Answer("accept")) as client:
        assert not (await client.call_tool("box__write_note", note)).is_error  # a round trip, then the retry
    sessions = json.loads(cli(config, "audit", "sessions", "--json").stdout)
    client = sessions[0]["client"]
    assert client and len(sessions) == 3
    approvals = [approvals_shown(config, row["session_id"]) for row in sessions]
    assert approvals == [
        [f"granted by a person at {client}"],
        ["refused: the person declined it"],
        [f"asked a person at {client}", f"granted by a person at {client}"],
    ]


def test_verify_says_an_emptied_audit_log_is_empty_not_absent(config: Path) -> None:
    record(config, *calls(3))
    log = config.parent / ".mcp-armor" / "audit.db"
    for leftover in (log.with_name("audit.db-wal"), log.with_name("audit.db-shm")):
        leftover.unlink(missing_ok=True)
    log.write_bytes(b"")
    result = cli(config, "audit", "verify")
    assert result.returncode != 0
    assert "no audit log here" not in result.stderr and "created when the gateway first serves" not in result.stderr
    assert result.stderr == f"mcp-armor: error: {log} is empty: it holds no audit log (was it emptied?)\n"


def emptied(config: Path) -> Path:
    """Empty the configuration's audit log as `: > audit.db` would (its WAL checkpointed into it first)."""
    log = config.parent / ".mcp-armor" / "audit.db"
    for leftover in (log.with_name("audit.db-wal"), log.with_name("audit.db-shm")):
        leftover.unlink(missing_ok=True)
    log.write_bytes(b"")
    return log


def test_an_emptied_log_is_not_filled_anew_from_the_journals_a_stopped_gateway_left(config: Path) -> None:
    record(config, *calls(3))
    log = emptied(config)
    journal = journal_directory(log) / f"{'0' * 32}{SUFFIX}"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(canonical(event("upstream", upstream="git", outcome="up", reason="started")) + "\n")
    for args in (["verify"], ["export"], ["sessions"], ["show", SESSION[:8]], ["tail"]):
        result = cli(config, "audit", *args)
        assert (result.returncode, result.stdout) == (2, ""), args
        assert "is empty: it holds no audit log (was it emptied?)" in result.stderr, args
    assert log.read_bytes() == b""  # no reader made a fresh log of it
    assert journal.exists()


@pytest.mark.anyio
async def test_tail_follow_reports_an_emptied_log_instead_of_waiting_for_it(config: Path) -> None:
    record(config, *calls(3))
    log = emptied(config)
    with anyio.fail_after(30):
        result = await anyio.run_process(command(config, "audit", "tail", "-f"), cwd=REPO, check=False)
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr.decode() == f"mcp-armor: error: {log} is empty: it holds no audit log (was it emptied?)\n"


@pytest.mark.anyio
async def test_tail_follow_waits_for_the_schema_of_a_log_file_just_created(config: Path) -> None:
    log = config.parent / ".mcp-armor" / "audit.db"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")  # as a gateway's connection leaves it until its first transaction commits
    async with following(config) as tail:
        record(config, event("upstream", upstream="git", outcome="up", reason="started"))
        assert (await tail.line()).startswith("1 ")


def test_tail_refuses_an_empty_kind(config: Path) -> None:
    record(config, *STARTUP)
    for kinds in ([""], ["decision,"], ["decision", " "]):
        result = cli(config, "audit", "tail", *(arg for kind in kinds for arg in ("--kind", kind)))
        assert (result.returncode, result.stdout) == (2, ""), kinds
        assert result.stderr == "mcp-armor: error: --kind: empty kind (one of: " + ", ".join(KINDS) + ")\n"


LIMITED = (
    ASKING
    + """reason = "notes are kept; a person reads them"
rate = "1/minute"
"""
)


class Together:
    """A person who answers only once `count` approval requests are open, accepting or declining each."""

    def __init__(self, count: int, action: str) -> None:
        self.count, self.action = count, action
        self.asked = 0
        self.all_asked = anyio.Event()

    async def __call__(self, context: Any, params: Any) -> types.ElicitResult:
        self.asked += 1
        if self.asked == self.count:
            self.all_asked.set()
        with anyio.fail_after(30):
            await self.all_asked.wait()
        return types.ElicitResult(action=self.action, content={"approve": True} if self.action == "accept" else None)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    """What the person answered, how they were asked, and why (without the queue's bookkeeping)."""
    return {key: request[key] for key in ("answer", "via", "reason")}


@pytest.mark.anyio
async def test_show_tells_an_approval_granted_from_a_call_then_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=LIMITED)
    person = Together(2, "accept")
    async with gateway_client(config, elicitation=person) as client, anyio.create_task_group() as group:
        results: list[bool] = []

        async def write(path: str) -> None:
            results.append((await client.call_tool("box__write_note", {"path": path, "body": "x"})).is_error)

        group.start_soon(write, "notes/a")
        group.start_soon(write, "notes/b")
    assert sorted(results) == [False, True]  # both approved; the rate (1/minute) lets one go ahead
    async with gateway_client(config, elicitation=Answer("decline")) as client:
        assert (await client.call_tool("box__write_note", {"path": "notes/c", "body": "x"})).is_error
    sessions = json.loads(cli(config, "audit", "sessions", "--json").stdout)
    client_name = sessions[0]["client"]
    decisions = [
        record
        for record in map(json.loads, cli(config, "audit", "export").stdout.splitlines())
        if record["kind"] == "decision"
    ]
    requests = [(record["approval"], _answer(record["approval_request"])) for record in decisions]
    granted = {"answer": "granted", "via": "elicitation", "reason": "approved by a person"}
    # each answer was also entered in the approval queue, under its id, as the client's
    assert {record["approval_request"]["through"] for record in decisions} == {"elicitation"}
    assert len({record["approval_request"]["entry"] for record in decisions}) == 3
    assert sorted(requests[:2], key=str) == [("granted", granted), ("not granted", granted)]
    declined = {"answer": "declined", "via": "elicitation", "reason": "the person declined it"}
    assert requests[2] == ("not granted", declined)
    assert approvals_shown(config, sessions[0]["session_id"]) == [f"granted by a person at {client_name}"] * 2
    assert approvals_shown(config, sessions[1]["session_id"]) == ["refused: the person declined it"]


@pytest.mark.anyio
async def test_show_records_a_refused_round_trip_retry_whole(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=ASKING)
    async with gateway_client(config, mode="auto", elicitation=Answer("accept")) as client:
        assert not (await client.call_tool("box__write_note", {"path": "notes/a", "body": "x"})).is_error
    (session,) = json.loads(cli(config, "audit", "sessions", "--json").stdout)
    requests = [
        record["approval_request"]
        for record in map(json.loads, cli(config, "audit", "export").stdout.splitlines())
        if record["kind"] == "decision"
    ]
    assert [(request["answer"], request["via"]) for request in requests] == [
        ("pending", "input_required"),
        ("granted", "input_required"),
    ]
    # A reason with "; " in it is shown whole.
    expired = {"answer": "invalid", "via": "input_required", "reason": "the approval expired; call again to ask anew"}
    record(
        config,
        event(
            "decision",
            session_id=session["session_id"],
            call_id="c-late",
            tool="box__write_note",
            decision="ask",
            reason="rule 'notes-asked' needs a person's approval; the approval expired; call again to ask anew",
            approval="not granted",
            approval_request=expired,
        ),
    )
    assert approvals_shown(config, session["session_id"])[-1] == "refused: the approval expired; call again to ask anew"


def test_show_reads_approvals_recorded_before_their_answer_was(config: Path) -> None:
    asked = {"session_id": SESSION, "tool": "box__write_note", "decision": "ask"}
    record(
        config,
        event("session_start", session_id=SESSION, client_name="claude-code", transport="stdio"),
        event("decision", **asked, call_id="c1", approval="granted", reason="rule 'w' needs a person's approval"),
        event(
            "decision",
            **asked,
            call_id="c2",
            approval="not granted",
            reason="rule 'w' needs...; the person declined it",
        ),
    )
    assert approvals_shown(config, SESSION[:8]) == [
        "granted by a person at claude-code",
        "refused: the person declined it",
    ]


@pytest.mark.parametrize("args", [["audit", "tail"], ["audit", "show", SESSION[:8]], ["audit", "sessions"]], ids=str)
def test_what_an_agent_or_upstream_wrote_cannot_drive_the_terminal(config: Path, args: list[str]) -> None:
    """Tool names, reasons and client names come from agents and upstreams: escape sequences, line
    breaks and bidi overrides in them are written out, never sent to the terminal as they are."""
    hostile = "box__echo\x1b[2J\x1b]0;owned\x07\nforged line\u202etxt.exe"
    start = event("session_start", session_id=SESSION, client_name="claude\x1b[31m", transport="stdio")
    decision = event("decision", session_id=SESSION, call_id="c1", tool=hostile, decision="deny", reason="no\r\x1b[K")
    record(config, start, decision)
    result = cli(config, *args)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\u202e" not in result.stdout
    assert "\\x1b" in result.stdout  # written out, so a reader still sees it was there
