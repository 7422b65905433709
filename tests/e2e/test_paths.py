"""Declared path arguments end to end: the real filesystem server behind the real gateway, and every
spelling of a secret file refused while a plain file's content arrives."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, calls, events, gateway_client, node_server, text_of, write_config

pytestmark = pytest.mark.anyio

POLICY = """
[defaults]
effect = "deny"

[[paths]]
tools = ["files__*"]
arguments = ["path", "paths", "source", "destination"]
root = "{root}"

[[rule]]
id = "inside-root"
tools = ["files__read_text_file", "files__read_file", "files__read_multiple_files"]
effect = "allow"
when = {{ properties = {{ path = {{ pattern = '{inside}' }}, paths = {{ pattern = '{inside}' }} }} }}

[[rule]]
id = "no-secrets"
tools = ["files__*"]
effect = "deny"
reason = "secret files stay off-limits"
when = {{ anyOf = [
    {{ required = ["path"], properties = {{ path = {{ "$ref" = "schemas/secret-file.json" }} }} }},
    {{ required = ["paths"], properties = {{ paths = {{ "$ref" = "schemas/secret-file.json" }} }} }},
] }}
"""


async def test_every_spelling_of_a_secret_file_is_refused_and_the_upstream_gets_the_normalised_path(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / ".env").write_text("TOKEN=do-not-leak\n")
    (root / "hello.txt").write_text("hello from the root\n")
    config = write_config(
        tmp_path,
        {"files": {"command": node_server("mcp-server-filesystem"), "args": [str(root)]}},
        policy=POLICY.format(root=root, inside=f"^{re.escape(str(root))}(/|$)"),
    )
    (tmp_path / "policies" / "schemas").mkdir()
    shutil.copy(REPO / "policies" / "schemas" / "secret-file.json", tmp_path / "policies" / "schemas")
    secret = [f"{root}/.env/", f"{root}/./.env", f"{root}//.env", f"{root}/sub/../.env", ".env"]
    async with gateway_client(config, mode="auto") as client:
        for tool in ("files__read_text_file", "files__read_file"):
            for spelling in secret:
                refused = await client.call_tool(tool, {"path": spelling})
                assert refused.is_error, (tool, spelling)
                assert "denied by rule 'no-secrets'" in text_of(refused), (tool, spelling)
        several = await client.call_tool("files__read_multiple_files", {"paths": ["hello.txt", "sub/../.env"]})
        assert several.is_error and "denied by rule 'no-secrets'" in text_of(several)
        outside = await client.call_tool("files__read_text_file", {"path": "../../etc/hostname"})
        assert outside.is_error and "no policy rule decides this call" in text_of(outside)
        read = await client.call_tool("files__read_text_file", {"path": "sub//../hello.txt"})
        assert not read.is_error and "hello from the root" in text_of(read)
        both = await client.call_tool("files__read_multiple_files", {"paths": ["./hello.txt", f"{root}/hello.txt/"]})
        assert not both.is_error and text_of(both).count("hello from the root") == 2
    logged = events(tmp_path)
    assert not any("do-not-leak" in str(event) for event in logged)
    decisions = [event for event in logged if event["kind"] == "decision"]
    assert [event["decision"] for event in decisions] == ["deny"] * 12 + ["allow"] * 2
    assert decisions[0]["arguments"] == {"path": f"{root}/.env/"}  # what the agent sent, for the record
    last = calls(tmp_path)
    assert last["files__read_text_file"]["decision"]["rewritten_arguments"] == {"path": f"{root}/hello.txt"}
    assert last["files__read_text_file"]["outcome"]["outcome"] == "ok"
    assert last["files__read_multiple_files"]["decision"]["rewritten_arguments"] == {
        "paths": [f"{root}/hello.txt", f"{root}/hello.txt"]
    }
