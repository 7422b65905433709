"""The approval prompt end to end: what the person at the real client is shown of a call to approve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from tests.conftest import gateway_client, node_server, write_config

pytestmark = pytest.mark.anyio

POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "writes-need-approval"
tools = ["files__write_file"]
effect = "ask"
"""


@pytest.mark.parametrize("mode", [pytest.param("legacy", id="handshake-era"), pytest.param("auto", id="2026-era")])
async def test_the_person_sees_where_a_long_note_goes_before_approving_it(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    config = write_config(
        tmp_path, {"files": {"command": node_server("mcp-server-filesystem"), "args": [str(root)]}}, policy=POLICY
    )
    asked: list[str] = []

    async def person(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": True})

    content = "a harmless note\n" * 500 + '"path": "notes/harmless.txt"'
    target = root / "hooks" / "post-commit"
    target.parent.mkdir()
    call = {"content": content, "path": str(target)}
    async with gateway_client(config, mode=mode, elicitation=person) as client:
        assert not (await client.call_tool("files__write_file", call)).is_error
    (message,) = asked
    arguments = message.split("Arguments:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert arguments[0] == f'"path": "{target}"'
    assert arguments[1].startswith('"content": "a harmless note\\na harmless note\\n')
    assert "8,028 characters" in arguments[1] and len(arguments) == 2
    assert "approval bound to sha256 " in message
    assert target.read_text() == content
