"""The built-in rule over the gateway's own files: every spelling of a path into them is refused, whatever
the policy, a rewrite or a person say; other paths are left to the policy."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.calls import Answer, Approval, Channel, Decision, Effect, Outcome, OutcomeKind, SessionInfo, ToolCall
from gateway.catalog.listing import Catalog, normalise_listing
from gateway.config.models import load_config
from gateway.core.own_files import RULE, GatewayFiles, Protected
from gateway.core.pipeline import EnforcePolicy
from gateway.core.targets import resource_target, subscription_target
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from tests.conftest import write_config

ALLOWED = Decision(Effect.ALLOW, "allowed by rule 'all'", "rev", ("all",))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The README's layout: upstreams.toml, policies/, .mcp-armor/ and a file server on `.`."""
    served = {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."]}
    write_config(tmp_path, {"files": served})
    (tmp_path / ".mcp-armor" / "audit.journal").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    return tmp_path


@pytest.fixture
def files(project: Path) -> GatewayFiles:
    return GatewayFiles.of(load_config(project / "upstreams.toml"))


def refused(files: GatewayFiles, arguments: dict[str, Any], declared: set[str] | None = None) -> str | None:
    decision = files.decide(ALLOWED, "files", arguments, declared or set())
    if decision.effect is Effect.DENY:
        assert decision.rules == (RULE,) and RULE in decision.reason
        return decision.reason
    assert decision is ALLOWED
    return None


@pytest.mark.parametrize(
    ("arguments", "what"),
    [
        ({"path": "policies/allow-all.toml", "content": "x"}, "policies directory"),
        ({"path": "./notes/../policies//new.toml"}, "policies directory"),
        ({"path": "notes/../../{name}/policies/x.toml"}, "policies directory"),
        ({"path": "{root}/upstreams.toml"}, "configuration file"),
        ({"path": "upstreams.lock"}, "lock file"),
        ({"path": ".mcp-armor/audit.journal/99-forged.jsonl"}, "state directory"),
        ({"path": ".mcp-armor"}, "state directory"),
        ({"source": "notes/a", "destination": "policies/a.toml"}, "policies directory"),
        ({"paths": ["notes/a", ".mcp-armor/audit.db"]}, "state directory"),
        ({"path": ".mcp-armor/principals.db"}, "state directory"),
        ({"path": "notes/../.mcp-armor/principals.db-journal"}, "state directory"),
        ({"options": {"target": {"filePath": "policies/a.toml"}}}, "policies directory"),
        ({"path": "policies\\a.toml"}, "policies directory"),
        ({"path": "policies/a.toml\0.txt"}, "policies directory"),
        ({"uri": "file://{root}/.mcp-armor/audit.db"}, "state directory"),
        ({"uri": "file://localhost{root}/policies/a%2Etoml"}, "policies directory"),
        ({"where": "policies/a.toml"}, "policies directory"),
    ],
)
def test_every_spelling_of_the_gateways_files_is_refused(
    files: GatewayFiles, project: Path, arguments: dict[str, Any], what: str
) -> None:
    spelled = {
        key: value.format(root=project, name=project.name) if isinstance(value, str) else value
        for key, value in arguments.items()
    }
    reason = refused(files, spelled, {"where"})
    assert reason is not None and f"names the gateway's {what}" in reason


@pytest.mark.parametrize(
    "arguments",
    [
        {"path": "notes/a.txt", "content": "policies/allow-all.toml"},
        {"path": "notes/policies/a.toml"},
        {"uri": "https://example.com/policies/a.toml"},
        {"path": "policies-old/a.toml"},
        {"text": ".mcp-armor/audit.db"},
    ],
)
def test_other_paths_and_arguments_are_left_to_the_policy(files: GatewayFiles, arguments: dict[str, Any]) -> None:
    assert refused(files, arguments) is None


def test_the_principals_store_is_one_of_the_gateways_files(project: Path) -> None:
    config = load_config(write_config(project, {}, state="elsewhere/state"))
    reason = refused(GatewayFiles.of(config), {"path": str(config.principals_path)})
    assert reason is not None and "names the gateway's state directory" in reason


def test_symbolic_links_are_followed(files: GatewayFiles, project: Path) -> None:
    (project / "notes" / "state").symlink_to(project / ".mcp-armor")
    (project / "notes" / "dangling").symlink_to(project / "policies" / "not-yet.toml")
    assert refused(files, {"path": "notes/state/audit.db"}) is not None
    assert refused(files, {"path": "notes/dangling"}) is not None
    (project / "notes" / "journal").symlink_to(project / ".mcp-armor" / "audit.journal")
    # `..` after a link climbs from the link's target: lexically notes/keys, physically .mcp-armor/keys.
    assert refused(files, {"path": "notes/journal/../keys"}) is not None


def test_a_relative_path_resolves_against_the_upstreams_working_directory(project: Path) -> None:
    elsewhere = project / "notes"
    config = write_config(project, {"files": {"command": "server", "cwd": str(elsewhere)}}, policy=None)
    files = GatewayFiles.of(load_config(config))
    assert refused(files, {"path": "policies/a.toml"}) is None  # notes/policies: not the gateway's
    assert refused(files, {"path": "../policies/a.toml"}) is not None


def test_a_case_insensitive_file_system_is_compared_caselessly() -> None:
    entry = Protected("policies directory", ("/srv/project/policies",), tree=True, folded=True)
    files = GatewayFiles([entry], {}, "/srv/project")
    assert refused(files, {"path": "POLICIES/Allow.toml"}) is not None
    sensitive = GatewayFiles([replace(entry, folded=False)], {}, "/srv/project")
    assert refused(sensitive, {"path": "POLICIES/Allow.toml"}) is None


def test_a_rewrite_into_the_state_directory_is_refused(files: GatewayFiles, project: Path) -> None:
    rewritten = replace(ALLOWED, effect=Effect.REWRITE, arguments={"path": str(project / ".mcp-armor" / "keys")})
    decision = files.decide(rewritten, "files", {"path": "notes/a.txt"}, set())
    assert decision.effect is Effect.DENY and "state directory" in decision.reason and decision.arguments is None


def test_the_upstreams_that_can_reach_the_gateways_files_are_named(project: Path) -> None:
    outside = project / "notes"
    config = load_config(
        write_config(
            project,
            {
                "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."]},
                "state": {"command": "server", "args": [f"--root={project / '.mcp-armor'}"]},
                "elsewhere": {"command": "server", "args": [str(outside)], "cwd": str(outside)},
                "above": {"command": "server", "cwd": str(project.parent)},
            },
            policy=None,
        )
    )
    lines = GatewayFiles.of(config).exposures(config)
    assert lines == [
        "upstream 'files': its argument '.' gives it access to the gateway's configuration file, policies "
        f"directory, lock file, state directory, audit log, audit journal directory, audit key file, "
        f"audit lease directory; calls naming them are refused "
        f"(built-in rule '{RULE}'), but the server itself can reach them: give it a directory that does not hold them",
        f"upstream 'state': its argument '--root={project / '.mcp-armor'}' gives it access to the gateway's state "
        f"directory, audit log, audit journal directory, audit key file, "
        f"audit lease directory; calls naming them are refused (built-in rule '{RULE}'), "
        "but the server itself can reach them: give it a directory that does not hold them",
        f"upstream 'above': its working directory '{project.parent}' gives it access to the gateway's configuration "
        f"file, policies directory, lock file, state directory, audit log, audit journal directory, audit key file, "
        f"audit lease directory, audit anchor file; calls naming "
        f"them are refused (built-in rule '{RULE}'), but the server itself can reach them: give it a directory "
        "that does not hold them",
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["enforce", "monitor"])
async def test_no_policy_rewrite_or_approval_lifts_the_rule(project: Path, mode: str) -> None:
    (project / "policies" / "test.toml").write_text(
        '[defaults]\neffect = "allow"\n\n[[rule]]\nid = "asked"\ntools = ["files__write_file"]\neffect = "ask"\n'
    )
    engine = PolicyEngine(load_policies(project / "policies"), monitor_mode=mode == "monitor")
    listing = normalise_listing("files", [{"name": "write_file", "inputSchema": {"type": "object"}}])
    tool = Catalog.build([listing], "__").tools["files__write_file"]
    engine.index_tools([tool.name])
    asked: list[str] = []

    async def approve(call: ToolCall, decision: Decision) -> Approval:
        asked.append(call.id)
        return Approval(Answer.GRANTED, "approved by a person", Channel.ELICITATION)

    async def forward(call: ToolCall) -> Outcome:
        raise AssertionError("a call naming the gateway's files was forwarded")

    files = GatewayFiles.of(load_config(project / "upstreams.toml"))
    policy = EnforcePolicy(engine, ask_timeout=10, own_files=files)
    call = ToolCall(SessionInfo("s1", "stdio", "2025-11-25"), tool, {"path": os.path.join("policies", "all.toml")})
    outcome = await policy(replace(call, approver=approve), forward)
    assert outcome.kind is OutcomeKind.REFUSED and f"built-in rule '{RULE}'" in outcome.reason
    assert outcome.call is not None and outcome.call.decision is not None
    assert outcome.call.decision.rules == (RULE,) and asked == []


@pytest.mark.anyio
@pytest.mark.parametrize("target", [resource_target, subscription_target], ids=["read", "subscribe"])
async def test_a_file_resource_inside_the_gateways_files_is_refused(project: Path, target: Any) -> None:
    engine = PolicyEngine(load_policies(project / "policies"))  # allows everything
    files = GatewayFiles.of(load_config(project / "upstreams.toml"))
    policy = EnforcePolicy(engine, ask_timeout=10, own_files=files)
    session = SessionInfo("s1", "stdio", "2025-11-25")

    async def forward(call: ToolCall) -> Outcome:
        return Outcome.completed({"contents": []})

    for uri, kept in ((f"file://{project}/.mcp-armor/audit.db", False), (f"file://{project}/notes/a.txt", True)):
        tool = target("files", uri, {"uri": uri, "name": "a"})
        outcome = await policy(ToolCall(session, tool, {"uri": uri}), forward)
        assert (outcome.kind is OutcomeKind.OK) is kept, (uri, outcome.reason)
