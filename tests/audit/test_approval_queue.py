"""The approval queue file as several processes share it: a decision taken in another process is seen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.audit.approvals import ApprovalQueue, AskedCall, Status
from tests.conftest import REPO

CALL = AskedCall("c1", "s1", "client 1", "", "box__write", "box", "write", {"path": "notes/a"}, ("r",), "why", "rev")


def decide_elsewhere(path: Path, entry_id: str, approve: bool) -> None:
    """Decide in another process, as `mcp-armor approvals` or the console does."""
    code = (
        "import sys; from pathlib import Path; from gateway.audit.approvals import ApprovalQueue; "
        "ApprovalQueue(Path(sys.argv[1])).decide(sys.argv[2], approve=sys.argv[3] == 'yes', by='x', channel='cli')"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), entry_id, "yes" if approve else "no"], cwd=REPO, check=True, timeout=60
    )


def test_a_waiting_process_sees_every_decision_taken_elsewhere(tmp_path: Path) -> None:
    """The waiting process writes too (spending an approval) between decisions taken in other processes:
    its own writes must not cost its reader the file's shared memory, or it would stop seeing changes."""
    queue = ApprovalQueue(tmp_path / "approvals.db")
    entries = [queue.ask(CALL, "binding", 600) for _ in range(3)]
    seen = queue.version()
    for entry, approve in zip(entries, (True, False, False), strict=True):
        decide_elsewhere(queue.path, entry.id, approve)
        assert queue.version() != seen, f"the decision on {entry.id} was not seen"
        seen = queue.version()
        if approve:
            assert queue.spend(entry.id, "binding")
            seen = queue.version()
    assert [row.status for row in queue.entries()][::-1] == [Status.USED, Status.DENIED, Status.DENIED]
    queue.close()


def test_a_file_still_being_made_reads_as_an_empty_queue(tmp_path: Path) -> None:
    path = tmp_path / "approvals.db"
    path.touch(mode=0o600)
    queue = ApprovalQueue(path)
    assert queue.entries() == [] and queue.get("abcdefgh") is None and queue.stats(0) == []
