"""`mcp-armor approvals` with `[gateway] store` set: the command line lists and decides the approvals
every replica shares in PostgreSQL, and a store it cannot reach is one line and a failed command.

Deciding records the decision first (`record_first`): to the audit log the config names, which is the
shared store's once the audit log lives there."""

from __future__ import annotations

from pathlib import Path

from gateway.audit.approvals import AskedCall, Status
from gateway.audit.shared_approvals import SharedApprovalQueue
from gateway.config.models import load_config
from gateway.store.postgres import Database
from tests.conftest import REPO, run_cli, write_config
from tests.postgres import PASSWORD, free_port

CALL = AskedCall(
    "c1", "s1", "client 1", "", "box__write", "box", "write", {"path": "notes/a"}, ("r",), "why", "rev", gateway="h:1"
)


def test_the_command_line_decides_an_approval_another_replica_holds(tmp_path: Path, store_url: str) -> None:
    store = Database(store_url)
    store.migrate()
    replica = SharedApprovalQueue(store)
    asked = replica.ask(CALL, "binding", 600)
    config = write_config(tmp_path, {}, store=store_url)
    listed = run_cli("approvals", "list", "--config", str(config), cwd=REPO)
    assert listed.returncode == 0 and asked.id in listed.stdout and "box__write" in listed.stdout
    approved = run_cli("approvals", "approve", asked.id, "--yes", "--config", str(config), cwd=REPO)
    assert approved.returncode == 0, approved.stderr
    assert f"approval {asked.id}: approved by" in approved.stdout
    decided = replica.get(asked.id)
    assert decided is not None and decided.status is Status.APPROVED and decided.channel == "cli"
    assert not load_config(config).approvals_path.exists()  # the queue lives only in the store
    replica.close()


def test_deciding_with_the_store_down_is_one_line_naming_it_and_fails(tmp_path: Path) -> None:
    url = f"postgresql://armor:{PASSWORD}@127.0.0.1:{free_port()}/armor"
    config = write_config(tmp_path, {}, store=url)
    refused = run_cli("approvals", "approve", "abcdefgh", "--yes", "--config", str(config), cwd=REPO)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and Database(url).shown in lines[0] and "cannot connect" in lines[0], lines
    assert PASSWORD not in refused.stderr + refused.stdout
