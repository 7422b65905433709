"""The audit log in the shared store end to end: real gateway processes, a real client, a real PostgreSQL
server, and the audit commands reading it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.shared import GONE_AFTER, SharedAuditStore
from gateway.store.postgres import Database
from tests.conftest import REPO, RawSession, fixture_upstream, gateway_client, gateway_process, write_config
from tests.postgres import PASSWORD

pytestmark = pytest.mark.anyio


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def store_events(url: str) -> list[dict[str, Any]]:
    log = SharedAuditStore.open_reader(Database(url))
    try:
        return list(log.events())
    finally:
        log.close()


@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, store=store_url)


async def test_a_gateway_on_the_store_records_every_call_there_and_the_audit_commands_read_it(
    config: Path, store_url: str
) -> None:
    async with gateway_client(config) as client:
        for n in range(5):
            assert not (await client.call_tool("box__echo", {"text": f"hello {n}"})).is_error
        await client.call_tool("box__fail", {})
    events = store_events(store_url)
    per_call = Counter((e["call_id"], e["kind"]) for e in events if e["kind"] in ("decision", "outcome"))
    assert len(per_call) == 12 and set(per_call.values()) == {1}
    assert [e["kind"] for e in events if e["kind"].startswith("session")] == ["session_start", "session_end"]
    assert not (config.parent / ".mcp-armor" / "audit.db").exists()  # nothing recorded beside the config

    verified = cli(config, "audit", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["events"] == len(events)
    sessions = cli(config, "audit", "sessions", "--json")
    assert sessions.returncode == 0 and json.loads(sessions.stdout)[0]["calls"] == 6
    exported = [json.loads(line) for line in cli(config, "audit", "export", "--tool", "box__echo").stdout.splitlines()]
    assert {e["tool"] for e in exported} == {"box__echo"}
    assert [e["kind"] for e in exported if e["kind"] != "catalog"] == ["decision", "outcome"] * 5
    assert PASSWORD not in verified.stdout + verified.stderr + sessions.stderr


async def test_store_migrate_sets_up_the_schema_and_says_when_it_is_current(tmp_path: Path, store_url: str) -> None:
    # The password comes from the environment, as a deployment gives it.
    config = write_config(tmp_path, {}, store=store_url.replace(PASSWORD, "${ARMOR_DB_PASSWORD}"))
    first = cli(config, "store", "migrate", env={"ARMOR_DB_PASSWORD": PASSWORD})
    assert first.returncode == 0 and "now version 1 (was not there)" in first.stdout
    assert PASSWORD not in first.stdout
    unset = cli(config, "store", "migrate")
    assert unset.returncode == 2 and "ARMOR_DB_PASSWORD is not set" in unset.stderr
    second = cli(config, "store", "migrate", env={"ARMOR_DB_PASSWORD": PASSWORD})
    assert "schema is current (version 1)" in second.stdout


def test_an_unreachable_store_is_one_line_for_every_audit_command(tmp_path: Path) -> None:
    from tests.postgres import free_port

    config = write_config(tmp_path, {}, store=f"postgresql://armor:{PASSWORD}@127.0.0.1:{free_port()}/armor")
    for command in (("audit", "verify"), ("audit", "sessions"), ("store", "migrate")):
        result = cli(config, *command)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "cannot connect to the store" in result.stderr, result.stderr
        assert PASSWORD not in result.stderr and "Traceback" not in result.stderr


async def test_a_sqlite_log_migrated_into_the_store_verifies_there_with_the_same_head(
    tmp_path: Path, store_url: str
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_client(config) as client:
        for n in range(3):
            await client.call_tool("box__echo", {"text": f"before the move {n}"})
    before = json.loads(cli(config, "audit", "verify", "--json").stdout)
    moved = cli(config, "audit", "migrate", "--to", store_url)
    assert moved.returncode == 0, moved.stderr
    assert f"copied {before['events']} events" in moved.stdout and PASSWORD not in moved.stdout
    again = cli(config, "audit", "migrate", "--to", store_url)
    assert again.returncode == 2 and "can only be copied into an empty one" in again.stderr

    moved_config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, store=store_url)
    after = json.loads(cli(moved_config, "audit", "verify", "--json").stdout)
    assert (after["ok"], after["head"], after["head_hash"]) == (True, before["head"], before["head_hash"])
    assert after["anchored_seq"] == before["head"]  # the store's anchors start at the file's head
    async with gateway_client(moved_config) as client:  # and the chain goes on from there
        await client.call_tool("box__echo", {"text": "after the move"})
    assert json.loads(cli(moved_config, "audit", "verify", "--json").stdout)["events"] > before["events"]


async def test_a_broken_sqlite_log_is_not_migrated(tmp_path: Path, store_url: str) -> None:
    import sqlite3

    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_client(config) as client:
        await client.call_tool("box__echo", {"text": "one"})
    with sqlite3.connect(tmp_path / ".mcp-armor" / "audit.db") as db:
        changed = db.execute("UPDATE events SET body = replace(body, '\"one\"', '\"two\"') WHERE kind = 'decision'")
        assert changed.rowcount == 1
    moved = cli(config, "audit", "migrate", "--to", store_url)
    assert (
        moved.returncode == 2
        and "does not verify (broken at seq" in moved.stderr
        and "nothing was copied" in moved.stderr
    )
    assert store_events_or_none(store_url) is None


def store_events_or_none(url: str) -> list[dict[str, Any]] | None:
    from gateway.errors import AuditError

    try:
        return store_events(url)
    except AuditError:
        return None


async def test_kill_9_of_a_gateway_mid_call_is_settled_by_the_next_one_as_interrupted(
    config: Path, store_url: str
) -> None:
    async with gateway_process(config) as (proc, _):
        raw = RawSession(proc)
        with anyio.fail_after(30):
            await raw.initialize()
            await raw.send(raw.call(1, "box__echo", {"text": "answered"}))
            while (await raw.receive()).get("id") != 1:
                pass
            await raw.send(raw.call(2, "box__slow", {"steps": 600}))
            while True:  # its decision is in the store before it is forwarded
                if any(e["kind"] == "decision" and e["tool"] == "box__slow" for e in store_events(store_url)):
                    break
                await anyio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    with anyio.fail_after(GONE_AFTER + 30):
        async with gateway_client(config) as client:
            await client.call_tool("box__echo", {"text": "the next gateway"})
            while True:  # the next gateway takes the killed one for gone once its silence is long enough
                ended = [e for e in store_events(store_url) if e.get("outcome") == "interrupted"]
                if ended:
                    break
                await anyio.sleep(0.2)
    events = store_events(store_url)
    slow = next(e for e in events if e["kind"] == "decision" and e["tool"] == "box__slow")
    outcomes = [e for e in events if e["kind"] == "outcome" and e["call_id"] == slow["call_id"]]
    assert [e["outcome"] for e in outcomes] == ["interrupted"]
    assert "ended without recording an outcome" in outcomes[0]["reason"]
    killed_sessions = {e["session_id"] for e in events if e["kind"] == "session_end" and "ended without" in str(e)}
    assert slow["session_id"] in killed_sessions
    assert cli(config, "audit", "verify").returncode == 0
