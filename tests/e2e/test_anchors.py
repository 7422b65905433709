"""The gateway anchors the audit log's head outside its state directory, and `audit verify` holds the log to
those anchors by default: a log cut short and re-headed after the gateway anchored it is caught."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.audit.anchor import default_anchor_file
from gateway.config.models import load_config
from gateway.errors import ConfigError
from tests.conftest import REPO, fixture_upstream, gateway_client, write_config

pytestmark = pytest.mark.anyio


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


async def serve_two_calls(config: Path) -> None:
    async with gateway_client(config) as client:
        for text in ("one", "two"):
            await client.call_tool("box__echo", {"text": text})


def cut_short(log: Path, keep: int) -> None:
    """Remove every event after `keep` and rewrite the head to match: the chain alone cannot tell."""
    connection = sqlite3.connect(log)
    with connection:
        connection.execute("DELETE FROM events WHERE seq > ?", (keep,))
        connection.execute("UPDATE head SET seq = ?, hash = (SELECT hash FROM events WHERE seq = ?)", (keep, keep))
    connection.close()


async def test_a_log_cut_short_after_the_gateway_anchored_it_fails_verify_without_being_told(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    await serve_two_calls(config)
    log = tmp_path / ".mcp-armor" / "audit.db"
    anchors = default_anchor_file(log)
    assert anchors is not None and not anchors.is_relative_to(tmp_path)  # outside the state directory (and the project)
    written = [json.loads(line) for line in anchors.read_text().splitlines()]
    head = written[-1]  # at shutdown; the ones before it when the session ended
    verified = cli(config, "audit", "verify")
    assert verified.returncode == 0, verified.stdout
    assert f"head {head['seq']}:{head['hash']}" in verified.stdout
    assert f"anchored up to seq {head['seq']}" in verified.stdout
    cut_short(log, 3)
    broken = cli(config, "audit", "verify")
    assert broken.returncode == 1
    first_lost = min(anchor["seq"] for anchor in written)
    assert broken.stdout.startswith(f"broken at seq {first_lost}: anchored event missing")


async def test_each_anchor_is_also_handed_to_the_anchor_command(tmp_path: Path) -> None:
    shipped = tmp_path / "elsewhere" / "shipped.jsonl"
    shipped.parent.mkdir()
    ship = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write(sys.stdin.read())", str(shipped)]
    anchor = tmp_path / "anchors" / "audit.jsonl"
    config = write_config(
        tmp_path, {"box": fixture_upstream("toolbox.py")}, audit_anchor=str(anchor), audit_anchor_command=ship
    )
    await serve_two_calls(config)
    assert shipped.read_text() == anchor.read_text() != ""
    default = default_anchor_file(tmp_path / ".mcp-armor" / "audit.db")
    assert default is not None and not default.exists()  # the file configured instead


@pytest.mark.parametrize("setting", [".mcp-armor/anchors.jsonl", ".mcp-armor", ".mcp-armor/audit.db"])
def test_an_anchor_inside_the_state_directory_is_refused(tmp_path: Path, setting: str) -> None:
    config = write_config(tmp_path, {}, audit_anchor=setting)
    with pytest.raises(ConfigError, match=r"\[gateway\] audit_anchor: .* is inside the state directory"):
        load_config(config)
