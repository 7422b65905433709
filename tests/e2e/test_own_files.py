"""The gateway's own files end to end: the README's file server on `.` behind the real gateway, with a
policy that allows everything, still cannot change the policies, the lock or the audit state."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import events, gateway_client, gateway_process, node_server, run_cli, text_of, write_config

pytestmark = pytest.mark.anyio

RULE = "builtin:gateway-files"
POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "redirect"
tools = ["files__write_file"]
effect = "rewrite"
set = {{ path = "{planted}" }}
when = {{ required = ["path"], properties = {{ path = {{ const = "{redirected}" }} }} }}
"""
EVIL = '[defaults]\neffect = "allow"\n'


def project(tmp_path: Path) -> Path:
    """upstreams.toml with the README's file server on `.`, and a policy allowing everything."""
    planted, redirected = tmp_path / ".mcp-armor" / "planted", tmp_path / "redirect.txt"
    return write_config(
        tmp_path,
        {"files": {"command": node_server("mcp-server-filesystem"), "args": ["."]}},
        policy=POLICY.format(planted=planted, redirected=redirected),
    )


async def test_an_allowed_write_into_the_gateways_files_is_refused_and_recorded(tmp_path: Path) -> None:
    config = project(tmp_path)
    state = tmp_path / ".mcp-armor"
    attempts = [
        ("files__write_file", {"path": str(tmp_path / "policies" / "evil.toml"), "content": EVIL}),
        ("files__write_file", {"path": str(tmp_path / "upstreams.lock"), "content": "{}"}),
        ("files__write_file", {"path": str(state / "audit.journal" / "1-forged.jsonl"), "content": "{}\n"}),
        ("files__read_text_file", {"path": str(state / "audit.db")}),
        ("files__move_file", {"source": str(tmp_path / "notes.txt"), "destination": str(tmp_path / "policies/x.toml")}),
        ("files__write_file", {"path": str(tmp_path / "redirect.txt"), "content": "planted"}),
    ]
    async with gateway_client(config) as client:
        written = await client.call_tool("files__write_file", {"path": str(tmp_path / "notes.txt"), "content": "hi"})
        assert not written.is_error, text_of(written)
        for tool, arguments in attempts:
            result = await client.call_tool(tool, arguments)
            assert result.is_error and f"(built-in rule '{RULE}')" in text_of(result), (tool, text_of(result))
    assert sorted(path.name for path in (tmp_path / "policies").iterdir()) == ["test.toml"]
    assert not (tmp_path / "upstreams.lock").exists() and not (state / "planted").exists()
    assert not (state / "audit.journal" / "1-forged.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "hi"
    decisions = [event for event in events(tmp_path) if event["kind"] == "decision"]
    assert [(event["decision"], event["rules"]) for event in decisions] == [("allow", [])] + [("deny", [RULE])] * 6
    assert "names the gateway's policies directory" in decisions[1]["reason"]
    assert "names the gateway's state directory" in decisions[-1]["reason"]  # the rewrite's path, not the agent's
    assert all(event["stage"] == "policy" for event in decisions)


async def test_start_up_and_policy_check_say_which_upstream_can_reach_the_gateways_files(tmp_path: Path) -> None:
    config = project(tmp_path)
    line = (
        "upstream 'files': its argument '.' gives it access to the gateway's configuration file, policies "
        f"directory, lock file, state directory, audit log, audit journal directory, audit key file, "
        f"audit lease directory; calls naming them are refused "
        f"(built-in rule '{RULE}'), but the server itself can reach them: give it a directory that does not hold them"
    )
    async with gateway_process(config) as (_, log):
        await log.wait_for(r"upstream 'files': its argument '\.' gives it access")
    assert line in log.text
    checked = run_cli("policy", "check", "--offline", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0 and f"warning: {line}\n" in checked.stdout
