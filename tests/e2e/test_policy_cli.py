"""`mcp-armor policy check | explain` and the policy column of `mcp-armor tools`, run as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, fixture_upstream, write_config

POLICY = """
[[rule]]
id = "echo"
tools = ["box__echo"]
effect = "allow"
when = { properties = { txt = { type = "string" } } }

[[rule]]
id = "typo"
tools = ["box__ech0", "box__add"]
effect = "allow"

[[rule]]
id = "notes"
tools = ["box__write_note"]
effect = "ask"
"""


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=cwd, timeout=90, check=False
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY)


def test_check_the_shipped_configuration() -> None:
    done = run("policy", "check", "--config", str(REPO / "upstreams.toml"))
    assert done.returncode == 0, done.stderr
    # The git server is given the repository holding the policies, and the time server works in it (by
    # default: the configuration's directory), beside the state directory: two warnings, by design.
    (time_server, warning, summary) = done.stdout.splitlines()
    assert time_server.startswith(
        f"warning: upstream 'time': its working directory '{REPO}' (the configuration's, as it sets no other) "
        "holds the gateway's state directory, "
    )
    assert warning.startswith("warning: upstream 'git': its argument '.' gives it access to the gateway's ")
    assert summary.startswith("ok: ") and summary.endswith("(2 warnings)")


def test_check_warns_about_globs_and_arguments_that_match_nothing(config: Path) -> None:
    done = run("policy", "check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    revision = json.loads(run("policy", "check", "--offline", "--json", "--config", str(config)).stdout)["revision"]
    assert done.stdout.splitlines() == [
        "warning: test.toml: rule 'echo': when: names argument 'txt', which tool 'box__echo' does not have",
        "warning: test.toml: rule 'typo': tools: 'box__ech0' matches no exposed tool",
        STATE_IN_REACH.format(upstream="box", directory=config.parent),
        f"ok: 3 rules in 1 files, default deny, revision {revision} (3 warnings)",
    ]


STATE_IN_REACH = (
    "warning: upstream '{upstream}': its working directory '{directory}' (the configuration's, as it sets no "
    "other) holds the gateway's state directory, audit log, audit journal directory, audit key file, audit lease "
    "directory: an agent that can use it could reach the approval queue and the audit log there; give it a cwd "
    "that does not hold them, or move [gateway] state out of that directory"
)


def test_check_warns_about_upstreams_that_can_reach_the_state_directory(tmp_path: Path) -> None:
    """The approval queue and the audit log are in the state directory: an upstream working there (as one
    without a `cwd` does, in the configuration's directory) or given it as an argument is named."""
    box = fixture_upstream("toolbox.py")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    upstreams = {
        "plain": box,  # no cwd: the configuration's directory, which holds .mcp-armor/
        "moved": {**box, "cwd": str(elsewhere)},
        "rooted": {**box, "cwd": str(elsewhere), "args": [*box["args"], f"--root={tmp_path / '.mcp-armor'}"]},
    }
    config = write_config(tmp_path, upstreams, policy=POLICY)
    (tmp_path / ".mcp-armor").mkdir()
    warnings = json.loads(run("policy", "check", "--offline", "--json", "--config", str(config)).stdout)["warnings"]
    assert warnings[0] == STATE_IN_REACH.format(upstream="plain", directory=tmp_path).removeprefix("warning: ")
    assert warnings[1].startswith(f"upstream 'rooted': its argument '--root={tmp_path / '.mcp-armor'}' gives it ")
    assert "state directory" in warnings[1] and len(warnings) == 2

    # With the state kept elsewhere, an upstream working in the configuration's directory is not named.
    write_config(tmp_path, upstreams, policy=POLICY, state=str(tmp_path.parent / f"{tmp_path.name}-state"))
    warnings = json.loads(run("policy", "check", "--offline", "--json", "--config", str(config)).stdout)["warnings"]
    assert not [warning for warning in warnings if "'plain'" in warning or "'moved'" in warning]


HIDING = """
[[rule]]
id = "echo-for-claude"
tools = ["box__echo"]
clients = ["claude*"]
effect = "allow"

[[rule]]
id = "no-other"
tools = ["other__*"]
effect = "deny"
"""


def test_check_warns_about_an_upstream_whose_every_tool_is_hidden(tmp_path: Path) -> None:
    box = fixture_upstream("toolbox.py")
    config = write_config(tmp_path, {"box": box, "other": box, "third": box}, policy=HIDING)
    listed = json.loads(run("tools", "--json", "--config", str(config)).stdout)["tools"]
    count = sum(1 for row in listed if row["upstream"] == "third")
    warnings = json.loads(run("policy", "check", "--json", "--config", str(config)).stdout)["warnings"]
    hidden = [warning for warning in warnings if " hidden: " in warning]
    assert hidden == [  # box: one tool can be called by some client, so it is not named
        f"all {count} tools of 'other' are hidden: no rule allows, asks or rewrites a call to it",
        f"all {count} tools of 'third' are hidden: no rule allows, asks or rewrites a call to it",
    ]
    (tmp_path / "policies" / "test.toml").write_text(HIDING.replace('"deny"', '"allow"'))
    warnings = json.loads(run("policy", "check", "--json", "--config", str(config)).stdout)["warnings"]
    assert [warning for warning in warnings if " hidden: " in warning] == [hidden[1]]


def test_explain_names_every_rule_and_why(config: Path) -> None:
    done = run(
        "policy", "explain", "box__write_note", "--args", '{"path": "notes/a", "body": "b"}', "--config", str(config)
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "decision: ask"
    assert lines[1] == "reason:   rule 'notes' needs a person's approval"
    assert "  echo   tools ['box__echo'] do not match 'box__write_note'" in lines
    assert "  notes  matches: ask" in lines

    schema = run("policy", "explain", "box__add", "--args", '{"a": "1", "b": 2}', "--config", str(config), "--json")
    record = json.loads(schema.stdout)
    assert record["decision"] == "deny"
    assert record["reason"] == "arguments do not match the tool's input schema: at 'a': \"1\" is not of type 'integer'"

    hidden = run("policy", "explain", "box__pid", "--config", str(config), "--offline")
    assert "note: no rule can ever allow it for this caller: it is hidden from tools/list" in hidden.stdout


def test_explain_offline_says_the_input_schema_was_not_checked(config: Path) -> None:
    args = ("policy", "explain", "box__write_note", "--args", '{"path": 3}', "--config", str(config))
    live = json.loads(run(*args, "--json").stdout)
    assert live["decision"] == "deny" and live["input_schema_checked"] is True
    offline = json.loads(run(*args, "--json", "--offline").stdout)
    assert offline["decision"] == "ask" and offline["input_schema_checked"] is False
    human = run(*args, "--offline").stdout.splitlines()
    assert human[0] == "decision: ask"
    assert (
        "note: offline: the arguments were not checked against the tool's input schema, "
        "which a live call must pass first (it may be refused there)"
    ) in human


def test_tools_shows_what_policy_does(config: Path) -> None:
    done = run("tools", "--json", "--config", str(config))
    policy = {row["name"]: row["policy"] for row in json.loads(done.stdout)["tools"]}
    assert policy["box__echo"] == "allow (conditional)"
    assert policy["box__add"] == "allow"
    assert policy["box__write_note"] == "ask"
    assert policy["box__pid"] == "hidden (no rule allows it)"


def test_tools_tells_a_tool_hidden_from_everyone_from_one_only_some_callers_reach(tmp_path: Path) -> None:
    policy = '[[rule]]\nid = "admins"\ntools = ["box__slow"]\nattributes = ["group:admins"]\neffect = "allow"\n'
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=policy)
    done = run("tools", "--json", "--config", str(config))
    policy_of = {row["name"]: row["policy"] for row in json.loads(done.stdout)["tools"]}
    assert policy_of["box__slow"] == "hidden (but from callers some rule names)"
    assert policy_of["box__pid"] == "hidden (no rule allows it)"


ERRORS = [
    pytest.param(
        ["policy", "check", "--offline"],
        {"bad.toml": "[[rule]]\nid = 'x'\ntools = ['a']\neffect = 'allow'\nrate = 'often'\n"},
        "policies/bad.toml: rule 'x': rate: expected a rate such as \"30/minute\" or \"10/30s\", got 'often'",
        id="check-bad-rate",
    ),
    pytest.param(
        ["policy", "explain", "box__echo", "--offline"],
        {"bad.toml": "[[rule]]\nid = 'x'\ntools = ['a']\neffect = 'allow'\nwhen = { type = 3 }\n"},
        "policies/bad.toml: rule 'x': when: not a valid JSON Schema: at 'type': 3 is not valid under any of the given",
        id="explain-bad-schema",
    ),
    pytest.param(
        ["policy", "explain", "box__echo", "--offline", "--args", "{nope"],
        {},
        "--args: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        id="explain-bad-json",
    ),
    pytest.param(
        ["policy", "explain", "box__echo", "--offline", "--args", "[]"],
        {},
        "--args: must be a JSON object, got list",
        id="explain-not-an-object",
    ),
    pytest.param(["tools"], {"a.toml": "x = 1\n"}, "policies/a.toml: x: unknown key", id="tools-bad-policy"),
    pytest.param(
        ["serve"], {"a.toml": "[defaults]\neffect = 'ask'\n[defaults]\n"}, "policies/a.toml: not valid TOML", id="serve"
    ),
]


@pytest.mark.parametrize(("command", "files", "message"), ERRORS)
def test_error_lines(tmp_path: Path, command: list[str], files: dict[str, str], message: str) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=None)
    (tmp_path / "policies").mkdir()
    for name, text in files.items():
        (tmp_path / "policies" / name).write_text(text)
    done = run(*command, "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mcp-armor: error: ")
    assert message in lines[0]


def test_missing_policies_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=None)
    done = run("policy", "check", "--offline", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"mcp-armor: error: {tmp_path / 'policies'}: policies directory not found "
        "(create it and put policy files in it, or point [gateway] policies elsewhere)"
    )


def test_check_warns_of_a_package_fetched_with_its_version_open(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"everything": {"command": "npx", "args": ["-y", "@example/server"]}}, policy=POLICY
    )
    done = run("policy", "check", "--offline", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (
        "warning: upstream 'everything' runs package '@example/server' with no exact version: its code can change "
        "under the pins without any definition changing; name it as @example/server@X.Y.Z"
    ) in done.stdout.splitlines()


REWRITING = """
[[rule]]
id = "quiet-echo"
tools = ["box__echo"]
effect = "rewrite"
set = { text = "quiet" }
"""


def test_explain_shows_the_arguments_as_they_would_be_forwarded(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=REWRITING)
    done = run("policy", "explain", "box__echo", "--args", '{"text": "loud"}', "--offline", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert 'forwarded as: {"text": "quiet"} (paths normalised, then rewritten)' in done.stdout.splitlines(), done.stdout
