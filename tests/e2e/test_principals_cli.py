"""The commands that speak of principals, as real processes: `policy explain --principal/--attribute`,
`policy replay` deciding again for each call's recorded principal and attributes, the `--principal`
filter of `audit sessions | show | tail | export`, and `policy check`'s findings on `attributes`."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.store import event
from tests.conftest import REPO, events, fixture_upstream, write_config, write_policy
from tests.e2e.test_audit_cli import cli, record

ALICE, BOB, NOBODY = "a11ce000" * 4, "b0b00000" * 4, "0b0d1000" * 4

POLICY = """
[[rule]]
id = "alice-echoes"
tools = ["box__echo"]
principals = ["alice"]
effect = "allow"

[[rule]]
id = "admins-add"
tools = ["box__add"]
attributes = ["group:admins"]
effect = "allow"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY)


def _session(session: str, principal: str | None, attributes: list[str] | None) -> dict[str, Any]:
    return event(
        "session_start",
        session_id=session,
        client_name="agent",
        transport="streamable-http",
        principal=principal,
        attributes=attributes,
    )


def _decision(session: str, call: str, tool: str, decision: str, who: dict[str, Any]) -> dict[str, Any]:
    return event(
        "decision",
        session_id=session,
        call_id=call,
        upstream="box",
        tool=tool,
        arguments={"text": "hi"} if tool == "box__echo" else {"a": 1, "b": 2},
        decision=decision,
        rules=[],
        stage="policy",
        client="agent",
        **who,
    )


def _history(config: Path) -> None:
    """Alice (an admin) echoed and added, Bob was refused both, a caller no one authenticated too."""
    alice = {"principal": "alice", "attributes": ["group:admins"]}
    bob = {"principal": "bob", "attributes": ["group:users"]}
    nobody = {"principal": None, "attributes": None}
    record(
        config,
        _session(ALICE, "alice", ["group:admins"]),
        _session(BOB, "bob", ["group:users"]),
        _session(NOBODY, None, None),
        _decision(ALICE, "a1", "box__echo", "allow", alice),
        _decision(ALICE, "a2", "box__add", "allow", alice),
        _decision(BOB, "b1", "box__echo", "deny", bob),
        _decision(BOB, "b2", "box__add", "deny", bob),
        _decision(NOBODY, "n1", "box__echo", "deny", nobody),
        event("outcome", session_id=BOB, call_id="b1", principal="bob", outcome="refused"),
    )


def _replayed(config: Path) -> dict[str, Any]:
    done = cli(config, "policy", "replay", "--json")
    assert done.returncode == 0, done.stderr
    replay: dict[str, Any] = json.loads(done.stdout)
    return replay


def test_replay_decides_each_call_again_for_its_recorded_principal_and_attributes(config: Path) -> None:
    _history(config)
    unchanged = _replayed(config)
    assert (unchanged["replayed"], unchanged["changed"]) == (5, [])

    write_policy(config.parent / "policies", POLICY.replace('["alice"]', '["bob"]').replace("group:admins", "group:u*"))
    changed = {(row["call_id"], row["recorded"], row["now"]) for row in _replayed(config)["changed"]}
    assert changed == {
        ("a1", "allow", "deny"),
        ("a2", "allow", "deny"),
        ("b1", "deny", "allow"),
        ("b2", "deny", "allow"),
    }  # n1: no principal, so no `principals` rule concerns it, then or now


def test_replay_reads_the_session_start_for_a_decision_that_names_no_principal(config: Path) -> None:
    """A decision recorded before decisions named their principal: its session's start speaks for it."""
    record(
        config,
        _session(ALICE, "alice", ["group:admins"]),
        {key: value for key, value in _decision(ALICE, "a1", "box__add", "deny", {}).items() if key != "principal"},
    )
    assert [(row["recorded"], row["now"]) for row in _replayed(config)["changed"]] == [("deny", "allow")]


def test_audit_filters_by_principal(config: Path) -> None:
    _history(config)
    sessions = json.loads(cli(config, "audit", "sessions", "--principal", "a*", "--json").stdout)
    assert [(row["session_id"], row["principal"], row["attributes"]) for row in sessions] == [
        (ALICE, "alice", ["group:admins"])
    ]
    table = cli(config, "audit", "sessions").stdout.splitlines()
    assert table[0].split()[:3] == ["SESSION", "CLIENT", "PRINCIPAL"]
    assert [line.split()[2] for line in table[1:]] == ["alice", "bob", "-"]

    exported = [json.loads(line) for line in cli(config, "audit", "export", "--principal", "bob").stdout.splitlines()]
    assert [(item["kind"], item.get("call_id")) for item in exported] == [
        ("session_start", None),
        ("decision", "b1"),
        ("decision", "b2"),
        ("outcome", "b1"),
    ]
    assert {item["principal"] for item in exported} == {"bob"}
    tail = cli(config, "audit", "tail", "--principal", "alice", "--json").stdout.splitlines()
    assert [json.loads(line)["session_id"] for line in tail] == [ALICE] * 3
    shown = cli(config, "audit", "show", ALICE[:8]).stdout
    assert "as principal alice" in shown
    assert cli(config, "audit", "show", ALICE[:8], "--principal", "bob", "--json").stdout == ""
    replayed = json.loads(cli(config, "policy", "replay", "--principal", "nobody", "--json").stdout)
    assert replayed["replayed"] == 0


def test_explain_decides_for_the_principal_and_attributes_given(config: Path) -> None:
    def explained(tool: str, *who: str) -> dict[str, Any]:
        done = cli(config, "policy", "explain", tool, "--args", '{"a": 1, "b": 2}', "--offline", "--json", *who)
        assert done.returncode == 0, done.stderr
        decided: dict[str, Any] = json.loads(done.stdout)
        return decided

    assert explained("box__echo", "--principal", "alice")["decision"] == "allow"
    hidden = explained("box__echo", "--client", "alice")  # a client calling itself alice is not alice
    assert hidden["decision"] == "deny"
    assert "no rule can ever allow it for this caller: it is hidden from tools/list" in hidden["notes"]
    considered = {item["rule"]: item["verdict"] for item in hidden["considered"]}
    assert considered["alice-echoes"] == "principals ['alice'] do not match no principal (none authenticated)"
    assert explained("box__add", "--principal", "bob", "--attribute", "group:admins")["rules"] == ["admins-add"]
    assert explained("box__add", "--principal", "bob", "--attribute", "group:users")["decision"] == "deny"

    lone = cli(config, "policy", "explain", "box__add", "--attribute", "group:admins", "--offline")
    assert lone.returncode != 0
    assert lone.stderr.strip().splitlines() == [
        "mcp-armor: error: --attribute: attributes are a principal's; give --principal NAME too"
    ]


def test_check_warns_of_an_attribute_glob_of_no_kind_and_not_of_an_unknown_principal(config: Path) -> None:
    write_policy(
        config.parent / "policies",
        POLICY
        + '\n[[rule]]\nid = "loose"\ntools = ["box__pid"]\nattributes = ["admins", "role:*"]\neffect = "allow"\n',
    )
    done = cli(config, "policy", "check", "--offline")
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("warning:") and "upstream" not in line] == [
        "warning: test.toml: rule 'loose': attributes: 'admins' does not begin with scope:, group:, role: "
        "(every attribute of a principal does)"
    ]


def test_a_principal_change_is_recorded_as_by_the_processs_user_whatever_user_claims(
    config: Path, tmp_path: Path
) -> None:
    environment = {
        "USER": "mallory",
        "LOGNAME": "mallory",
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    added = subprocess.run(
        [sys.executable, "-m", "gateway", "principal", "add", "alice", "--config", str(config)],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    (change,) = [row for row in events(tmp_path) if row["kind"] == "principal"]
    assert f"by {pwd.getpwuid(os.geteuid()).pw_name} " in change["reason"] and "mallory" not in change["reason"]
