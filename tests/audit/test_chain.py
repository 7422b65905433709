"""The chain's integrity: canonical bodies, automatic anchors, journal authentication, keys outside the log."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.audit.chain import canonical
from gateway.audit.events import event
from gateway.audit.queries import Filters
from gateway.audit.store import AuditStore


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
