"""`mcp-armor wrap -- CMD ARGS...`: one server guarded in place, its names unchanged, over stdio."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

from gateway.audit.store import AuditStore
from gateway.cli.wrap import wrapped
from gateway.config.models import load_config
from tests.conftest import REPO, read_records, write_config, write_policy

pytestmark = pytest.mark.anyio

ALLOW_ECHO = '[defaults]\neffect = "deny"\n\n[[rule]]\nid = "echo"\ntools = ["echo"]\neffect = "allow"\n'


def wrap_params(home: Path, record: Path, *options: str) -> StdioServerParameters:
    """`mcp-armor wrap OPTIONS -- python tests/fixtures/toolbox.py`, as a client lists a server: run from the
    checkout (the relative script path resolves there), with the client's variables for the server."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "gateway", "wrap", *options, "--", sys.executable, "tests/fixtures/toolbox.py"],
        env={
            "PYTHONPATH": str(REPO),
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(home),
            "TOOLBOX_RECORD": str(record),
        },
        cwd=REPO,
    )


def audit(path: Path) -> list[dict[str, Any]]:
    store = AuditStore.open_reader(path)
    try:
        return list(store.events())
    finally:
        store.close()


async def test_wrap_without_a_config_denies_everything_until_a_policy_allows(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    async with Client(wrap_params(tmp_path, record), mode="legacy", read_timeout_seconds=60) as client:
        assert (await client.list_tools()).tools == []
        with pytest.raises(MCPError, match="Unknown tool: echo"):
            await client.call_tool("echo", {"text": "hi"})
    home = tmp_path / ".mcp-armor" / "wrap"
    assert 'effect = "deny"' in (home / "policies" / "defaults.toml").read_text()
    assert load_config(home / "upstreams.toml").upstreams == {}
    assert read_records(record) == []
    decisions = [e for e in audit(home / "audit.db") if e["kind"] == "decision"]
    assert [(e["tool"], e["decision"]) for e in decisions] == [("echo", "deny")]


async def test_wrap_exposes_names_unchanged_under_policy_and_audit(tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    policies = write_policy(tmp_path / "mine", ALLOW_ECHO).parent
    params = wrap_params(tmp_path, record, "--policies", str(policies), "--name", "box")
    async with Client(params, mode="legacy", read_timeout_seconds=60) as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == {"echo"}
        answer = await client.call_tool("echo", {"text": "hi"})
        assert not answer.is_error
        assert answer.content[0].text == "hi"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="Unknown tool: add"):
            await client.call_tool("add", {"a": 1, "b": 2})
    assert [(entry["tool"], entry["arguments"]) for entry in read_records(record)] == [("echo", {"text": "hi"})]
    events = audit(tmp_path / ".mcp-armor" / "wrap" / "audit.db")
    decisions = [(e["upstream"], e["tool"], e["decision"]) for e in events if e["kind"] == "decision"]
    assert ("box", "echo", "allow") in decisions
    assert any(tool == "add" and decision == "deny" for _, tool, decision in decisions)


async def test_wrap_takes_its_settings_from_a_config_and_starts_none_of_its_upstreams(tmp_path: Path) -> None:
    record, other = tmp_path / "calls.jsonl", tmp_path / "other.jsonl"
    (tmp_path / "conf").mkdir()
    config = write_config(
        tmp_path / "conf",
        {
            "other": {
                "command": sys.executable,
                "args": ["tests/fixtures/toolbox.py"],
                "env": {"TOOLBOX_RECORD": str(other)},
            }
        },
        policy=ALLOW_ECHO,
    )
    async with Client(wrap_params(tmp_path, record, "--config", str(config)), mode="legacy") as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == {"echo"}
        assert not (await client.call_tool("echo", {"text": "x"})).is_error
    assert len(read_records(record)) == 1 and read_records(other) == []
    assert audit(tmp_path / "conf" / ".mcp-armor" / "audit.db")
    assert not (tmp_path / ".mcp-armor").exists()


def test_the_wrapped_server_is_the_one_unprefixed_upstream(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"a": {"command": "a"}}))
    here = Path.cwd()
    result = wrapped(config, ["bin/My Server.py", "--flag"], None, str(tmp_path / "p"))
    [(name, spec)] = result.upstreams.items()
    assert (name, spec.prefix, spec.command, spec.args, spec.cwd) == (
        "my-server-py",
        "",
        str(here / "bin/My Server.py"),
        ("--flag",),
        here,
    )
    assert result.prefixes == {"my-server-py": ""}
    assert result.policy_dir == tmp_path / "p"
