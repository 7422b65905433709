"""The chain's integrity: canonical bodies, automatic anchors, journal authentication, keys outside the log."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.audit.anchor import Anchoring, read_anchors
from gateway.audit.chain import canonical
from gateway.audit.journal import Journal, journal_directory, open_settled
from gateway.audit.keys import key_path, log_keys, read_keys
from gateway.audit.queries import Filters
from gateway.audit.recorder import Recorder
from gateway.audit.store import AuditStore, event
from gateway.policy.redact import Redactor


def make_log(path: Path, count: int = 4) -> None:
    store = AuditStore.open_writer(path)
    try:
        for index in range(count):
            body = event("decision", session_id="s1", call_id=f"c{index}", tool="box__echo", decision="allow")
            store.append([canonical(body)])
    finally:
        store.close()


def tamper(path: Path, *statements: str) -> None:
    connection = sqlite3.connect(path)
    with connection:
        for statement in statements:
            connection.execute(statement)
    connection.close()


def problem(path: Path) -> tuple[int, str] | None:
    store = AuditStore.open_reader(path)
    try:
        found = store.verify().problem
    finally:
        store.close()
    return (found.seq, found.what) if found is not None else None


def test_a_duplicate_key_that_queries_read_first_breaks_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path)
    # SQLite's json_extract reads the first of two equal keys, Python's parser the last.
    tamper(path, """UPDATE events SET body = '{"tool":"evil__wipe",' || substr(body, 2) WHERE seq = 2""")
    store = AuditStore.open_reader(path)
    assert [row["call_id"] for row in store.events(Filters(tool="evil__*"))] == ["c1"]  # what queries now see
    store.close()
    assert problem(path) == (2, "body has a duplicate key: key 'tool' appears twice (edited)")


def test_a_body_spelled_differently_breaks_verify_though_it_parses_the_same(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    make_log(path)
    spaced = """UPDATE events SET body = replace(body, '"decision":"allow"', '"decision": "allow"') WHERE seq = 3"""
    tamper(path, spaced)
    found = problem(path)
    assert found is not None and found[0] == 3 and "canonical" in found[1]


# -- the journal: only what this gateway wrote is replayed ----------------------------------------


def journal_bodies(*call_ids: str) -> list[str]:
    return [canonical(event("decision", session_id="s1", call_id=call_id, tool="box__echo")) for call_id in call_ids]


def write_journal(path: Path, key: bytes, bodies: list[str]) -> None:
    """A journal as a gateway that then died left it (its lock gone with it)."""
    journal = Journal(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), key)
    journal.write(bodies)
    journal.close(remove=False)


def call_ids(path: Path) -> list[str]:
    store = AuditStore.open_reader(path)
    try:
        return [row["call_id"] for row in store.events()]
    finally:
        store.close()


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda genuine, key: "".join(f"{body}\n" for body in journal_bodies("dropped")), id="plain-lines"),
        pytest.param(lambda genuine, key: genuine.replace("j1", "jX"), id="a-body-altered"),
        pytest.param(lambda genuine, key: "".join(genuine.splitlines(True)[1:]), id="a-line-removed"),
        pytest.param(lambda genuine, key: genuine * 2, id="lines-repeated"),
        pytest.param(
            lambda genuine, key: genuine.replace("\n", '\n0000 {"kind":"decision"}\n', 1), id="a-line-inserted"
        ),
    ],
)
def test_a_journal_this_gateway_did_not_write_is_kept_aside_not_chained(
    tmp_path: Path, forge: Any, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "audit.db"
    make_log(log, 1)
    key = log_keys(log).journal
    directory = journal_directory(log)
    directory.mkdir()
    genuine = directory / "1-genuine.jsonl"
    write_journal(genuine, key, journal_bodies("j0", "j1", "j2"))
    dropped = directory / "2-dropped.jsonl"
    dropped.write_text(forge(genuine.read_text(), key))
    with caplog.at_level(logging.WARNING):
        open_settled(log).close()
    assert call_ids(log) == ["c0", "j0", "j1", "j2"]  # the genuine journal, and nothing else
    assert not genuine.exists() and not dropped.exists()
    aside = dropped.with_name(dropped.name + ".refused")
    assert aside.exists()  # kept for a person to look at
    assert "not a journal this gateway wrote" in caplog.text and str(aside) in caplog.text
    assert problem(log) is None


def test_a_genuine_journal_renamed_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "audit.db"
    make_log(log, 1)
    directory = journal_directory(log)
    directory.mkdir()
    write_journal(directory / "1-a.jsonl", log_keys(log).journal, journal_bodies("j0"))
    open_settled(log).close()
    write_journal(directory / "3-b.jsonl", log_keys(log).journal, journal_bodies("j1"))
    (directory / "3-b.jsonl").rename(directory / "4-renamed.jsonl")  # replayed under a name it was not written for
    open_settled(log).close()
    assert call_ids(log) == ["c0", "j0"]
    assert (directory / "4-renamed.jsonl.refused").exists()


# -- keys live outside the log ---------------------------------------------------------------------


def meta(path: Path) -> dict[str, str]:
    connection = sqlite3.connect(path)
    try:
        return dict(connection.execute("SELECT key, value FROM meta").fetchall())
    finally:
        connection.close()


def test_a_new_log_keeps_no_key_and_its_key_file_is_the_owners_only(tmp_path: Path) -> None:
    log = tmp_path / "audit.db"
    make_log(log, 1)
    assert "mask_key" not in meta(log)
    assert stat.S_IMODE(key_path(log).stat().st_mode) == 0o600


def test_a_key_file_open_to_others_is_made_the_owners_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "audit.db"
    make_log(log, 1)
    key_path(log).chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_keys(log) is not None
    assert stat.S_IMODE(key_path(log).stat().st_mode) == 0o600
    assert "the audit key file was open to others (mode 644)" in caplog.text


@pytest.mark.anyio
async def test_a_log_holding_its_mask_key_gives_it_to_the_key_file_and_still_verifies(tmp_path: Path) -> None:
    log = tmp_path / "audit.db"
    make_log(log, 3)
    old_key = "ab" * 32
    key_path(log).unlink()
    tamper(log, f"INSERT INTO meta VALUES ('mask_key', '{old_key}')", "PRAGMA user_version = 2")  # as schema 2 kept it
    recorder = Recorder(log)
    async with recorder.running():
        marker = recorder.redactor.redact({"password": "hunter2"}).value["password"]
    assert marker == Redactor(bytes.fromhex(old_key)).redact({"password": "hunter2"}).value["password"]
    assert "mask_key" not in meta(log)  # whoever has the log cannot test guesses against its markers
    assert read_keys(log) is not None and read_keys(log).mask == bytes.fromhex(old_key)  # type: ignore[union-attr]
    assert stat.S_IMODE(key_path(log).stat().st_mode) == 0o600
    assert problem(log) is None
    elsewhere = tmp_path / "copy" / "audit.db"
    elsewhere.parent.mkdir()
    shutil.copy(log, elsewhere)  # the log alone, without its key
    assert problem(elsewhere) is None


# -- anchors ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_head_is_anchored_once_what_was_queued_with_a_session_end_is_committed(tmp_path: Path) -> None:
    log, file = tmp_path / "audit.db", tmp_path / "anchors" / "audit.jsonl"
    recorder = Recorder(log, anchoring=Anchoring(log, file, interval=3600))  # no periodic anchor meanwhile
    async with recorder.running():
        await recorder.record(event("session_start", session_id="s1"))
        recorder.queue(event("session_end", session_id="s1"))
        recorder.anchor_soon()
        await recorder.record(event("upstream", upstream="box"))  # committed: the anchor follows
        with anyio.fail_after(20):
            while True:
                if file.exists():
                    break
                await anyio.sleep(0.01)  # a worker thread writes it, under the deadline above
        (first,) = read_anchors(file, log)[0]
        store = AuditStore.open_reader(log)
        assert first == (3, [row["hash"] for row in store.events()][-1])
        store.close()
    assert read_anchors(file, log)[0] == [first]  # the head did not move after: not anchored again
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
