"""Attacks, each asserting the secure behaviour: a manipulated agent naming the gateway's own files in
spellings the built-in rule may miss, secrets written in ways masking may miss, a client renaming
itself, a lone surrogate in the log, a rewritten chain against its anchors."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.chain import canonical, chain_hash
from gateway.calls import Decision, Effect
from gateway.config.models import load_config
from gateway.core.own_files import GatewayFiles
from gateway.policy.redact import Redactor
from tests.conftest import (
    RawSession,
    answers,
    events,
    fixture_upstream,
    gateway_client,
    gateway_process,
    node_server,
    ready,
    run_cli,
    text_of,
    write_config,
)

pytestmark = pytest.mark.anyio

RULE = "builtin:gateway-files"
EVIL = '[defaults]\neffect = "allow"\n'


def files_project(tmp_path: Path, **gateway: str) -> Path:
    """The README's file server on `.` (the directory holding the configuration), everything allowed."""
    server = {"command": node_server("mcp-server-filesystem"), "args": ["."]}
    return write_config(tmp_path, {"files": server}, **gateway)


def refused(text: str) -> bool:
    return f"(built-in rule '{RULE}')" in text


async def test_a_relative_path_behind_a_made_up_scheme_is_refused(tmp_path: Path) -> None:
    """`zz:/../policies/evil.toml` is no URI to the file server: it is the relative path `zz:/..` (the
    working directory) then `policies/evil.toml`. A value with a non-`file` scheme was not checked at all."""
    config = files_project(tmp_path)
    attempts = [
        ("files__write_file", {"path": "zz:/../policies/evil.toml", "content": EVIL}),
        ("files__read_text_file", {"path": "http:/../.mcp-armor/audit.key"}),
    ]
    async with gateway_client(config) as client:
        for tool, arguments in attempts:
            result = await client.call_tool(tool, arguments)
            assert result.is_error and refused(text_of(result)), (tool, text_of(result))
    assert sorted(path.name for path in (tmp_path / "policies").iterdir()) == ["test.toml"]


async def test_the_audit_logs_key_file_and_leases_outside_the_state_directory_are_refused(tmp_path: Path) -> None:
    """With `[gateway] audit` outside the state directory the log, its WAL and journal were protected, but
    not `audit.key` beside it (the masking key: read it and test guesses against every marker; replace it
    and journals are forged) nor the lease directory (delete a live gateway's lease: its calls are marked
    interrupted)."""
    config = files_project(tmp_path, audit="logs/audit.db")
    async with gateway_client(config) as client:
        warm = await client.call_tool("files__list_directory", {"path": "logs"})
        assert not warm.is_error, text_of(warm)
        assert (tmp_path / "logs" / "audit.key").exists()
        attempts = [
            ("files__read_text_file", {"path": "logs/audit.key"}),
            ("files__write_file", {"path": "logs/audit.key", "content": "{}"}),
            ("files__list_directory", {"path": "logs/audit.leases"}),
        ]
        for tool, arguments in attempts:
            result = await client.call_tool(tool, arguments)
            assert result.is_error and refused(text_of(result)), (tool, text_of(result))


async def test_file_uri_and_path_spellings_are_all_refused(tmp_path: Path) -> None:
    """Held: `file://localhost/`, percent-encoding, `..` through a directory, a symbolic link to the
    policies, a trailing slash, a path in an array and in a nested object under a path-like key."""
    config = files_project(tmp_path)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "policies", tmp_path / "sub" / "link")
    policies = tmp_path / "policies"
    attempts = [
        ("files__read_text_file", {"path": f"file://localhost{policies}/test.toml"}),
        ("files__read_text_file", {"path": f"FILE:{policies}/%74est.toml"}),
        ("files__write_file", {"path": "sub/../policies/evil.toml", "content": EVIL}),
        ("files__write_file", {"path": "sub/link/evil.toml", "content": EVIL}),
        ("files__list_directory", {"path": "policies/"}),
        ("files__read_multiple_files", {"paths": ["README.md", "./policies/./test.toml"]}),
        ("files__edit_file", {"path": "sub/link/test.toml", "edits": [{"oldText": "allow", "newText": "x"}]}),
    ]
    async with gateway_client(config) as client:
        for tool, arguments in attempts:
            result = await client.call_tool(tool, arguments)
            assert result.is_error and refused(text_of(result)), (tool, text_of(result))
    assert sorted(path.name for path in policies.iterdir()) == ["test.toml"]
    decisions = [event for event in events(tmp_path) if event["kind"] == "decision"]
    assert [event["rules"] for event in decisions] == [[RULE]] * len(attempts)


@pytest.mark.xfail(
    strict=True,
    reason="a directory holding the gateway's files is not itself protected: moving it away is allowed",
)
async def test_moving_the_directory_that_holds_the_configuration_is_refused(tmp_path: Path) -> None:
    """The file server on the parent of the project: `move_file` on the project directory names none of
    the protected files, yet takes them all (a fresh `policies/` can then be written in its place)."""
    project = tmp_path / "project"
    project.mkdir()
    config = write_config(project, {"files": {"command": node_server("mcp-server-filesystem"), "args": [".."]}})
    async with gateway_client(config) as client:
        result = await client.call_tool(
            "files__move_file", {"source": str(project), "destination": str(tmp_path / "moved")}
        )
        assert result.is_error and refused(text_of(result)), text_of(result)
    assert (project / "policies" / "test.toml").exists()


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('password="hunter2pw"', "hunter2pw"),
        ("db_password: 'hunter2pw'", "hunter2pw"),
        ('{"password": "hunter2pw", "user": "bob"}', "hunter2pw"),
        ('{"api_key":"hunter2pw"}', "hunter2pw"),
        ("cmd --password 'correct horse battery'", "horse battery"),
        ('mysql -u root -p"two words" db', "words"),
        ("curl -vu admin:hunter2pw https://example.com", "hunter2pw"),
        ("curl -sSu admin:hunter2pw https://example.com", "hunter2pw"),
    ],
)
def test_quoted_and_combined_option_passwords_are_masked(text: str, secret: str) -> None:
    """A quoted password (`password="..."`, a JSON or YAML document written by a tool, a quoted option
    value with spaces) and curl's `-u` among combined short options were kept in clear, in full or in part."""
    redacted = Redactor(b"k" * 32).redact({"content": text})
    stored = json.dumps(redacted.value)
    assert secret not in stored, stored
    assert redacted.masked


def test_command_line_and_url_passwords_are_masked() -> None:
    """Held: the claimed spellings."""
    texts = [
        "mysql -uroot -phunter2pw db",
        "mysql --password hunter2pw",
        "sshpass -p hunter2pw ssh host",
        "curl -u admin:hunter2pw https://example.com",
        "curl --user=admin:hunter2pw https://example.com",
        "git clone https://bob:hunter2pw@example.com/r.git",
    ]
    redactor = Redactor(b"k" * 32)
    for text in texts:
        stored = json.dumps(redactor.redact({"command": text}).value)
        assert "hunter2pw" not in stored, stored


async def test_a_lone_surrogate_in_a_calls_arguments_is_recorded_and_the_log_goes_on(tmp_path: Path) -> None:
    """JSON may carry `\\ud800` (no character, not UTF-8): its decision was never committed (SQLite took the
    text as UTF-8 and raised), and neither was anything batched with it. Now it is recorded escaped, and
    the calls after it too. (The SDK's upstream cannot read it, and leaves the call unanswered.)"""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        assert proc.stdin is not None
        await proc.stdin.send(
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
            b'"params": {"name": "box__echo", "arguments": {"text": "a\\ud800b", "\\udfff": "y"}}}\n'
        )
        await raw.send(raw.call(2, "box__echo", {"text": "after"}))
        assert "result" in (await answers(raw, {2}))[2]
    decisions = [event for event in events(tmp_path) if event["kind"] == "decision"]
    assert [event["call_id"] is not None for event in decisions] == [True, True], decisions
    assert decisions[0]["arguments"] == {"text": "a\ud800b", "\udfff": "y"}
    assert run_cli("audit", "verify", "--config", str(config), cwd=tmp_path).returncode == 0


async def test_a_second_initialize_naming_another_client_is_refused(tmp_path: Path) -> None:
    """Handshake era: the connection's client is the one `initialize` named; a second `initialize` naming
    another is refused (as a 2026 request naming another client is), and calls stay recorded for the first."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        again = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "someone-else", "version": "9"},
        }
        await raw.send({"id": 1, "method": "initialize", "params": again})
        await raw.send(raw.call(2, "box__echo", {"text": "hi"}))
        found = await answers(raw, {1, 2})
        assert "error" in found[1], found[1]
    decisions = [event for event in events(tmp_path) if event["kind"] == "decision"]
    assert [event["client"] for event in decisions] == ["raw"], decisions


@pytest.mark.parametrize(
    "arguments",
    [
        {"files": {"policies/evil.toml": EVIL}},  # a tool writing several files: each key a path
        {"files": [{"name": "upstreams.lock", "content": "{}"}]},
        {"target": {"location": ".mcp-armor/audit.key"}},
    ],
)
def test_a_path_in_an_object_under_a_path_like_argument_is_refused(tmp_path: Path, arguments: dict[str, Any]) -> None:
    """Arrays under a path-like argument were checked item by item, but an object under one was not: not
    its keys (a multi-file write keyed by path) nor the values of its members with other names."""
    config = load_config(files_project(tmp_path))
    allowed = Decision(Effect.ALLOW, "allowed", "rev", ("all",))
    decision = GatewayFiles.of(config).decide(allowed, "files", arguments, set())
    assert decision.effect is Effect.DENY and decision.rules == (RULE,), decision


def test_a_secret_cut_short_in_a_gateway_files_refusal_is_not_stored(tmp_path: Path) -> None:
    """A path argument holding a token, placed where a quote cut at 200 characters would split it: the
    refusal quotes no value (and no key below the argument), so no part of the token is in the reason."""
    config = load_config(files_project(tmp_path))
    token = "Zq8Xv2Lm9Kp4Rt7Wn3Bc6Yh1Jd5Fg0Ts8Qe2Ua4Vx"
    start = f"{tmp_path}/policies/notes "
    arguments = {"path": start + "a" * (200 - len(start) - 19) + " " + token}
    redactor = Redactor(b"k" * 32)
    redaction = redactor.redact(arguments)
    assert token not in json.dumps(redaction.value)
    reason = GatewayFiles.of(config).refusal("files", arguments, set())
    assert reason is not None
    assert token[:12] not in redaction.scrub(reason, redactor) and token[:12] not in reason
    keyed = GatewayFiles.of(config).refusal("files", {"files": {f"{tmp_path}/policies/{token}": "x"}}, set())
    assert keyed is not None and token[:12] not in keyed and "argument 'files'" in keyed


async def test_a_log_rewritten_with_its_chain_recomputed_fails_verify_by_the_anchors(tmp_path: Path) -> None:
    """Held: a call's decision edited from allow to deny and every hash after it recomputed (the chain needs
    no key) passes the chain, and is caught by the anchor the gateway wrote when it stopped."""
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_client(config) as client:
        result = await client.call_tool("box__echo", {"text": "hi"})
        assert not result.is_error
    log = tmp_path / ".mcp-armor" / "audit.db"
    with contextlib.closing(sqlite3.connect(log)) as db, db:
        rows = db.execute("SELECT seq, body FROM events ORDER BY seq").fetchall()
        prev = db.execute("SELECT prev_hash FROM events WHERE seq = ?", (rows[0][0],)).fetchone()[0]
        for seq, body in rows:
            event = json.loads(body)
            if event["kind"] == "decision":
                event["decision"] = "deny"
            body = canonical(event)
            digest = chain_hash(prev, body)
            db.execute("UPDATE events SET prev_hash = ?, hash = ?, body = ? WHERE seq = ?", (prev, digest, body, seq))
            prev = digest
        db.execute("UPDATE head SET hash = ? WHERE id = 1", (prev,))
    command = [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(config)]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}  # the anchors' XDG_STATE_HOME
    with anyio.fail_after(120):
        verified = await anyio.run_process(command, env=environment, check=False)
    said = (verified.stdout + verified.stderr).decode()
    assert verified.returncode == 1 and "anchor" in said, said
