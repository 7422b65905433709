"""The audit commands as real processes, on logs written through the store API: piped into a reader that
stops early, catalogue changes folded, `--kind`, following a log that does not exist yet, approvals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import event
from gateway.audit_store import AuditStore, canonical
from tests.conftest import REPO, fixture_upstream, write_config

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
