"""The approval queue's file refuses to be trusted when anyone but its owner could have written it, or when
it is not a queue this mcp-armor can use: each one line naming the file, and nothing entered or decided.
And one session cannot fill it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.audit.approvals import ApprovalQueue, AskedCall, Status
from gateway.errors import ApprovalsError
from tests.conftest import held_while_new

CALL = AskedCall("c1", "s1", "agent 1", "", "box__write_note", "box", "write_note", {"path": "a"}, ("r",), "why", "v1")


def made(tmp_path: Path) -> ApprovalQueue:
    queue = ApprovalQueue(tmp_path / "state" / "approvals.db")
    queue.ask(CALL, "binding", 60)
    return queue


def group_writable(queue: ApprovalQueue) -> None:
    os.chmod(queue.path, 0o660)


def world_writable(queue: ApprovalQueue) -> None:
    os.chmod(queue.path, 0o606)


def another_users(queue: ApprovalQueue) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user takes root")
    os.chown(queue.path, 4242, -1)


def a_link(queue: ApprovalQueue) -> None:
    real = queue.path.with_name("elsewhere.db")
    queue.path.rename(real)
    queue.path.symlink_to(real)


def a_planted_journal(queue: ApprovalQueue) -> None:
    """Another user (or anyone, through a group-writable directory) puts a write-ahead log beside the file."""
    journal = queue.path.with_name(queue.path.name + "-wal")
    journal.write_bytes(b"")
    os.chmod(journal, 0o666)


def corrupt(queue: ApprovalQueue) -> None:
    for extra in ("-wal", "-shm"):
        queue.path.with_name(queue.path.name + extra).unlink(missing_ok=True)
    queue.path.write_bytes(b"not a database at all" * 300)


def from_the_future(queue: ApprovalQueue) -> None:
    with sqlite3.connect(queue.path) as db:
        db.execute("PRAGMA user_version = 2")


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        pytest.param(group_writable, "can be written by others", id="group-writable"),
        pytest.param(world_writable, "can be written by others", id="world-writable"),
        pytest.param(another_users, "belongs to another user", id="another-user"),
        pytest.param(a_link, "is a symbolic link", id="symlink"),
        pytest.param(a_planted_journal, "approvals.db-wal can be written by others", id="planted-journal"),
        pytest.param(corrupt, "the approval queue cannot be", id="corrupt"),
        pytest.param(from_the_future, "not an approval queue this mcp-armor can use", id="future-schema"),
    ],
)
def test_a_queue_file_that_cannot_be_trusted_is_refused_for_entering_and_deciding(
    tmp_path: Path, spoil: Callable[[ApprovalQueue], None], said: str
) -> None:
    queue = made(tmp_path)
    (entry,) = queue.entries()
    spoil(queue)
    mode = os.lstat(queue.path).st_mode
    for attempt in (
        lambda: queue.ask(CALL, "binding", 60),
        lambda: queue.decide(entry.id, approve=True, by="alice", channel="cli"),
        lambda: queue.spend(entry.id, "binding"),
        lambda: queue.get(entry.id),
    ):
        with pytest.raises(ApprovalsError, match=said) as refused:
            attempt()
        assert str(queue.path) in str(refused.value) and "\n" not in str(refused.value)
    assert os.lstat(queue.path).st_mode == mode  # left as found: not quietly made private


def test_a_queue_file_readable_by_others_is_made_private_when_next_written(tmp_path: Path) -> None:
    queue = made(tmp_path)
    os.chmod(queue.path, 0o644)
    (entry,) = queue.entries()
    assert queue.decide(entry.id, approve=False, by="alice", channel="cli").status is Status.DENIED
    assert os.stat(queue.path).st_mode & 0o777 == 0o600


def test_a_session_has_at_most_most_approvals_waiting_and_others_are_not_held_back(tmp_path: Path) -> None:
    now = [1000.0]
    queue = ApprovalQueue(tmp_path / "approvals.db", clock=lambda: now[0])
    first = queue.ask(CALL, "b", 60, most=2)
    queue.ask(CALL, "b", 60, most=2)
    with pytest.raises(ApprovalsError, match="session s1 already has 2 approvals waiting; box__write_note not entered"):
        queue.ask(CALL, "b", 60, most=2)
    queue.ask(replace(CALL, session="s2"), "b", 60, most=2)  # another session's count is its own
    queue.decide(first.id, approve=False, by="alice", channel="cli")
    queue.ask(CALL, "b", 60, most=2)  # a decided one no longer waits
    now[0] += 61
    queue.ask(CALL, "b", 60, most=2)  # nor does an expired one
    assert len(queue.entries(pending_only=True)) == 1


def test_a_waiting_gateway_keeps_seeing_decisions_another_process_makes_after_it_wrote(tmp_path: Path) -> None:
    """A gateway watches the file through one reader (`version`) while it writes (enters, spends); a
    decision made by another process (`mcp-armor approvals`) must change what the reader sees, each time.
    Were a write to open and close the file itself, the reader's locks would go with it, and the other
    process would remove the journal under it: the reader then sees no decision again (or fails)."""
    queue = made(tmp_path)
    for _ in range(3):
        entry = queue.ask(CALL, "binding", 60)
        before = queue.version()
        decide = (
            "import sys; from pathlib import Path; from gateway.audit.approvals import ApprovalQueue; "
            "ApprovalQueue(Path(sys.argv[1])).decide(sys.argv[2], approve=False, by='alice', channel='cli')"
        )
        subprocess.run([sys.executable, "-c", decide, str(queue.path), entry.id], check=True, timeout=60)
        assert queue.version() != before
        assert queue.get(entry.id).status is Status.DENIED  # type: ignore[union-attr]
    queue.close()


def test_a_new_queue_file_another_process_is_still_making_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process has just made the file and holds it; switching a file to WAL needs it alone, and
    # SQLite answers "locked" at once rather than wait. The queue waits (its pause lets the other go).
    path = tmp_path / "state" / "approvals.db"
    path.parent.mkdir(mode=0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    with held_while_new(path, monkeypatch) as pauses:
        entry = ApprovalQueue(path).ask(CALL, "binding", 60)
    assert pauses
    assert ApprovalQueue(path).get(entry.id) == entry
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
