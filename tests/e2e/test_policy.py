"""Policy end to end: a real client drives the real gateway process in front of the real fixture upstream.

The fixture records every call it receives, so each test proves what did, and did not, reach it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import (
    REPO,
    calls,
    client_over,
    events,
    fixture_upstream,
    gateway_client,
    gateway_command,
    gateway_process,
    node_server,
    read_records,
    text_of,
    write_config,
    write_policy,
)

pytestmark = pytest.mark.anyio

ERAS = [pytest.param("legacy", id="handshake-era"), pytest.param("auto", id="2026-era")]
AWS_KEY = "AKIA" + "Z" * 16

POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "echo"
tools = ["box__echo"]
effect = "allow"

[[rule]]
id = "echo-rewrite"
tools = ["box__echo"]
effect = "rewrite"
set = { text = "rewritten by the gateway" }
when = { required = ["text"], properties = { text = { pattern = "^rewrite me" } } }

[[rule]]
id = "no-big-sums"
tools = ["box__add"]
effect = "deny"
reason = "sums of 100 or more are not allowed"
when = { properties = { a = { minimum = 100 } } }

[[rule]]
id = "add-budget"
tools = ["box__add"]
effect = "allow"
rate = "3/minute"

[[rule]]
id = "add-breaks-schema"
tools = ["box__add"]
effect = "rewrite"
set = { a = "seven" }
when = { required = ["b"], properties = { b = { const = 7 } } }

[[rule]]
id = "notes-need-approval"
tools = ["box__write_note"]
effect = "ask"
reason = "notes are written to disk"

[[rule]]
id = "pid-never"
tools = ["box__pid"]
effect = "deny"

[[rule]]
id = "mask-keys"
tools = ["box__*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']

[[rule]]
id = "withhold-private-keys"
tools = ["box__echo"]
on = "result"
effect = "deny"
reason = "it holds a private key"
when = { required = ["text"], properties = { text = { pattern = "PRIVATE KEY" } } }
"""


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def config(tmp_path: Path, record: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=POLICY)


def received(record: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(entry["tool"], entry["arguments"]) for entry in read_records(record)]


@pytest.mark.parametrize("mode", ERAS)
async def test_policy_in_the_call_path(config: Path, record: Path, mode: str) -> None:
    async with gateway_client(config, mode=mode) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"box__echo", "box__add", "box__write_note"} <= names
        assert not names & {"box__pid", "box__crash", "box__fail", "box__slow"}  # hidden: nothing allows them

        denied = await client.call_tool("box__add", {"a": 500, "b": 1})
        assert denied.is_error
        assert text_of(denied).startswith(
            "Refused by the mcp-armor gateway: denied by rule 'no-big-sums': sums of 100 or more are not allowed (call "
        )

        with pytest.raises(MCPError, match="Unknown tool: box__pid"):
            await client.call_tool("box__pid", {})

        rewritten = await client.call_tool("box__echo", {"text": "rewrite me please"})
        assert text_of(rewritten) == "rewritten by the gateway"

        broken = await client.call_tool("box__add", {"a": 1, "b": 7})
        assert broken.is_error
        assert "rewritten arguments do not match the tool's input schema: at 'a'" in text_of(broken)

        masked = await client.call_tool("box__echo", {"text": f"key {AWS_KEY} end"})
        assert text_of(masked) == "key [redacted by mcp-armor rule 'mask-keys'] end"

        withheld = await client.call_tool("box__echo", {"text": "-----BEGIN PRIVATE KEY----- abc"})
        assert withheld.is_error
        assert "withheld the result of this call: result withheld by rule 'withhold-private-keys'" in text_of(withheld)

        # The rate counts only calls that went ahead: the refused ones above did not use the budget.
        for a in (1, 2, 3):
            assert (await client.call_tool("box__add", {"a": a, "b": 1})).structured_content == {"sum": a + 1}
        limited = await client.call_tool("box__add", {"a": 4, "b": 1})
        assert limited.is_error
        assert "rule 'add-budget' allows 3 calls per minute per session and that limit is reached" in text_of(limited)

    assert received(record) == [
        ("echo", {"text": "rewritten by the gateway"}),
        ("echo", {"text": f"key {AWS_KEY} end"}),
        ("echo", {"text": "-----BEGIN PRIVATE KEY----- abc"}),
        ("add", {"a": 1, "b": 1}),
        ("add", {"a": 2, "b": 1}),
        ("add", {"a": 3, "b": 1}),
    ]


class Person:
    """Answers the gateway's approval requests like a person at the client would, and remembers them."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[types.ElicitRequestFormParams] = []

    async def __call__(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        self.asked.append(params)
        answer = self.answers.pop(0)
        if answer == "approve":
            return types.ElicitResult(action="accept", content={"approve": True})
        if answer == "unticked":
            return types.ElicitResult(action="accept", content={"approve": False})
        return types.ElicitResult(action="decline")


NOTE = {"path": "notes/a.txt", "body": "hello"}


@pytest.mark.parametrize("mode", ERAS)
async def test_an_asked_call_is_forwarded_only_after_approval(config: Path, record: Path, mode: str) -> None:
    person = Person("decline", "unticked", "approve")
    async with gateway_client(config, mode=mode, elicitation=person) as client:
        declined = await client.call_tool("box__write_note", NOTE)
        assert declined.is_error
        assert "rule 'notes-need-approval' needs a person's approval: notes are written to disk" in text_of(declined)
        assert "the person declined it" in text_of(declined)
        assert received(record) == []

        unticked = await client.call_tool("box__write_note", NOTE)
        assert "the person did not tick 'Allow this call'" in text_of(unticked)
        assert received(record) == []

        approved = await client.call_tool("box__write_note", {**NOTE, "body": "approved"})
        assert not approved.is_error
    assert received(record) == [("write_note", {**NOTE, "body": "approved"})]
    assert len(person.asked) == 3
    message = person.asked[-1].message
    assert "'box__write_note'" in message and '"body": "approved"' in message
    assert person.asked[-1].requested_schema["required"] == ["approve"]


async def test_a_client_that_cannot_ask_is_refused(tmp_path: Path, record: Path) -> None:
    """With the client as the only channel (`via = ["client"]`), a client without elicitation is refused."""
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))
    config = write_config(tmp_path, {"box": box}, policy=POLICY, approvals={"via": ["client"]})
    async with gateway_client(config) as client:
        refused = await client.call_tool("box__write_note", NOTE)
        assert refused.is_error
        assert "this client cannot ask a person (it does not support elicitation)" in text_of(refused)
    assert received(record) == []


async def test_an_approval_is_bound_to_its_call(config: Path, record: Path) -> None:
    """2026-07-28: the sealed state of one call's approval does not approve another, nor twice."""
    person = Person("approve", "approve", "approve")
    async with gateway_client(config, mode="auto", elicitation=person) as client:
        first = await client.session.call_tool("box__write_note", NOTE, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        assert first.request_state is not None and first.input_requests is not None
        (key,) = first.input_requests
        yes = {key: types.ElicitResult(action="accept", content={"approve": True})}

        other = {**NOTE, "body": "something else"}
        swapped = await client.session.call_tool(
            "box__write_note", other, input_responses=yes, request_state=first.request_state, allow_input_required=True
        )
        assert isinstance(swapped, types.CallToolResult) and swapped.is_error
        assert "the approval was given for a different call" in text_of(swapped)

        forged = await client.session.call_tool(
            "box__write_note", NOTE, input_responses=yes, request_state=first.request_state + "0"
        )
        assert isinstance(forged, types.CallToolResult) and forged.is_error
        assert "was not issued by this gateway" in text_of(forged)

        done = await client.session.call_tool(
            "box__write_note", NOTE, input_responses=yes, request_state=first.request_state
        )
        assert isinstance(done, types.CallToolResult) and not done.is_error

        again = await client.session.call_tool(
            "box__write_note", NOTE, input_responses=yes, request_state=first.request_state
        )
        assert isinstance(again, types.CallToolResult) and again.is_error
        assert "already used" in text_of(again)
    assert received(record) == [("write_note", NOTE)]


async def test_reload_on_change_and_sighup_keeps_the_old_set_when_broken(tmp_path: Path, record: Path) -> None:
    allow = '[[rule]]\nid = "echo"\ntools = ["box__echo"]\neffect = "allow"\n'
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=allow)
    policies = tmp_path / "policies"
    async with gateway_process(config, "--http", "127.0.0.1:0") as (proc, log):
        url = (await log.wait_for(r"serving streamable HTTP at (http://\S+/mcp)", seconds=30))[1]
        async with (
            httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=60)) as http,
            Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
        ):
            assert text_of(await client.call_tool("box__echo", {"text": "one"})) == "one"

            mark = len(log.text)
            no_two = (
                '[[rule]]\nid = "no-two"\ntools = ["box__echo"]\neffect = "deny"\n'
                'when = { properties = { text = { const = "two" } } }\n'
            )
            write_policy(policies, allow + no_two)
            await log.wait_for(r"policies reloaded \(a policy file changed\)", after=mark)
            refused = await client.call_tool("box__echo", {"text": "two"})
            assert "denied by rule 'no-two'" in text_of(refused)

            mark = len(log.text)
            write_policy(policies, "[[rule]]\nid = 'broken'\n", name="zz-broken.toml")
            failed = await log.wait_for(
                r"policy reload \(a policy file changed\) failed; revision (\w+) .*", after=mark
            )
            assert "zz-broken.toml: rule 'broken': tools: required key is missing" in failed[0]
            still = await client.call_tool("box__echo", {"text": "two"})
            assert "denied by rule 'no-two'" in text_of(still)

            (policies / "zz-broken.toml").unlink()
            (policies / "test.toml").write_text(allow)
            mark = len(log.text)
            os.kill(proc.pid, signal.SIGHUP)
            await log.wait_for(r"policies reloaded \((SIGHUP|a policy file changed)\)", after=mark)
            assert text_of(await client.call_tool("box__echo", {"text": "two"})) == "two"
    assert received(record) == [("echo", {"text": "one"}), ("echo", {"text": "two"})]


async def test_monitor_mode_lets_everything_through(tmp_path: Path, record: Path) -> None:
    deny = '[[rule]]\nid = "no-echo"\ntools = ["box__echo"]\neffect = "deny"\n'
    config = write_config(
        tmp_path, {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))}, policy=deny, mode="monitor"
    )
    async with gateway_client(config) as client:
        assert "box__echo" in {tool.name for tool in (await client.list_tools()).tools}
        assert text_of(await client.call_tool("box__echo", {"text": "still"})) == "still"
    assert received(record) == [("echo", {"text": "still"})]


async def test_a_broken_policy_stops_startup_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy='[[rule]]\nid = "x"\n')
    with anyio.fail_after(30):
        done = await anyio.run_process(gateway_command(config), check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert lines == [
        f"mcp-armor: error: {tmp_path / 'policies' / 'test.toml'}: rule 'x': tools: required key is missing"
    ]


LEAKY_POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "mask-keys"
tools = ["*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']

[[rule]]
id = "no-private-keys"
tools = ["*"]
on = "result"
effect = "deny"
reason = "it carries a private key"
when = { required = ["text"], properties = { text = { pattern = "PRIVATE KEY" } } }
"""
LEAKED_KEY = "AKIAABCDEFGHIJKLMNOP"  # what tests/fixtures/leaky.py puts in every channel


@pytest.mark.parametrize("mode", ERAS)
async def test_every_channel_of_a_result_is_screened(tmp_path: Path, mode: str) -> None:
    config = write_config(tmp_path, {"leak": fixture_upstream("leaky.py")}, policy=LEAKY_POLICY)
    updates: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, message))

    async with gateway_client(config, mode=mode) as client:
        done = await client.call_tool("leak__progress_leak", {}, progress_callback=on_progress)
        blobs = await client.call_tool("leak__blob_leak", {})
        beside = await client.call_tool("leak__structured_leak", {})
    assert text_of(done) == "done"
    # The key is masked in the message that carried it; the message carrying a private key is not relayed.
    assert sorted(updates) == [(1.0, "key [redacted by mcp-armor rule 'mask-keys']"), (3.0, "nearly done")]
    decoded = []
    for block in blobs.content:
        if isinstance(block, types.EmbeddedResource):
            resource = block.resource
            decoded.append(
                resource.text if isinstance(resource, types.TextResourceContents) else b64decode(resource.blob)
            )
        elif isinstance(block, types.ImageContent):
            decoded.append(b64decode(block.data))
    assert len(decoded) == 5 and not any(LEAKED_KEY in str(part) for part in decoded)
    assert "[redacted by mcp-armor rule 'mask-keys']" in str(decoded[0])
    assert beside.is_error and "result withheld by rule 'no-private-keys'" in text_of(beside)
    recorded = calls(tmp_path)
    assert recorded["leak__progress_leak"]["outcome"]["rules"] == ["mask-keys", "no-private-keys"]
    assert recorded["leak__blob_leak"]["outcome"]["rules"] == ["mask-keys"]
    assert recorded["leak__structured_leak"]["outcome"]["outcome"] == "refused"


def b64decode(data: str) -> str:
    return base64.b64decode(data).decode("utf-8", errors="replace")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


async def test_the_shipped_git_policies_hold_against_the_real_server(tmp_path: Path) -> None:
    """Secret files by any spelling, by sha and by diff; option-like arguments; counts git reads as "all"."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "dev@example.com")
    _git(repo, "config", "user.name", "Dev")
    (repo / "README.md").write_text("hello\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-qm", "readme")
    plain = _git(repo, "rev-parse", "HEAD")
    (repo / ".env").write_text(f"AWS_SECRET={AWS_KEY}\n")
    _git(repo, "add", ".env")
    _git(repo, "commit", "-qm", "settings")
    secret = _git(repo, "rev-parse", "HEAD")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    git = {"command": shutil.which("mcp-server-git") or "mcp-server-git", "args": ["--repository", str(repo)]}
    config = write_config(tmp_path, {"git": git}, policy=None)
    shown: dict[str, types.CallToolResult] = {}
    async with gateway_client(config) as client:
        for name, revision in [
            ("plain", plain),
            ("by-sha", secret),
            ("by-path", "HEAD:.env/"),
            ("option", "--output=x"),
        ]:
            shown[name] = await client.call_tool("git__git_show", {"repo_path": str(repo), "revision": revision})
        diff = await client.call_tool("git__git_diff", {"repo_path": str(repo), "target": plain})
        await client.call_tool("git__git_log", {"repo_path": str(repo), "max_count": -1})
    assert not shown["plain"].is_error and "README.md" in text_of(shown["plain"])
    for name in ("by-path", "option"):
        assert shown[name].is_error and "Refused by the mcp-armor gateway" in text_of(shown[name]), name
    for withheld in (shown["by-sha"], diff):  # the commit and the diff that show the file: withheld
        assert withheld.is_error and "it shows the contents of a secret file" in text_of(withheld)
    assert not any(AWS_KEY in text_of(result) for result in [*shown.values(), diff])
    recorded = calls(tmp_path)
    assert recorded["git__git_diff"]["outcome"]["rules"] == ["git-no-secret-diffs"]
    log = recorded["git__git_log"]["decision"]
    assert log["decision"] == "rewrite" and log["rewritten_arguments"]["max_count"] == 50


MEDIATION_POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "tools"
tools = ["box__*"]
effect = "allow"

[[rule]]
id = "notes"
resources = ["toolbox://readme", "toolbox://notes/*"]
effect = "allow"

[[rule]]
id = "no-secret-notes"
resources = ["toolbox://notes/*"]
effect = "deny"
reason = "secret notes stay private"
when = { properties = { uri = { pattern = "/secret" } } }

[[rule]]
id = "no-private-notes"
resources = ["toolbox://notes/*"]
effect = "deny"
reason = "private notes stay private"
when = { required = ["name"], properties = { name = { pattern = "^private " } } }

[[rule]]
id = "greet"
prompts = ["box__greet"]
effect = "allow"
when = { required = ["who"], properties = { who = { not = { const = "Mallory" } } } }

[[rule]]
id = "mask-keys"
tools = ["*"]
resources = ["*"]
prompts = ["*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']
"""
MASKED = "[redacted by mcp-armor rule 'mask-keys']"


async def _refusal(pending: Any) -> str:
    with pytest.raises(MCPError) as caught:
        await pending
    return caught.value.error.message


@pytest.mark.parametrize("transport", ["stdio", "http"])
@pytest.mark.parametrize("mode", ERAS)
async def test_resources_and_prompts_are_decided_recorded_and_screened(
    tmp_path: Path, mode: str, transport: str
) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=MEDIATION_POLICY)
    async with client_over(transport, config, mode) as client:
        listed = [str(resource.uri) for resource in (await client.list_resources()).resources]
        templates = (await client.list_resource_templates()).resource_templates
        prompts = [prompt.name for prompt in (await client.list_prompts()).prompts]
        readme = await client.read_resource("toolbox://readme")
        keyed = await client.read_resource(f"toolbox://notes/{AWS_KEY}")
        secret = await _refusal(client.read_resource("toolbox://notes/secret-plans"))
        for spelling in (
            "toolbox://notes/%73ecret-plans",
            "TOOLBOX://notes/./secret-plans",
            "toolbox://notes/x/../secret",
        ):
            assert "denied by rule 'no-secret-notes'" in await _refusal(client.read_resource(spelling)), spelling
        # Decoded before it is split, an encoded slash makes it two segments: no template's, so unknown.
        private = await _refusal(client.read_resource("toolbox://notes/private%20diary"))  # its template's name
        assert "denied by rule 'no-private-notes'" in private
        split = await _refusal(client.read_resource("toolbox://notes/%2Fsecret"))
        assert split == "Unknown resource: toolbox://notes//secret"
        decoded = await client.read_resource("toolbox://notes/%41bc")  # the upstream reads what was decided
        unknown = await _refusal(client.read_resource("elsewhere://x"))
        hello = await client.get_prompt("box__greet", {"who": "Ann"})
        masked = await client.get_prompt("box__greet", {"who": AWS_KEY})
        mallory = await _refusal(client.get_prompt("box__greet", {"who": "Mallory"}))
    assert listed == ["toolbox://readme"] and [t.uri_template for t in templates] == ["toolbox://notes/{name}"]
    assert prompts == ["box__greet"]
    assert readme.contents[0].text == "contents of toolbox://readme"  # type: ignore[union-attr]
    assert decoded.contents[0].text == "contents of toolbox://notes/Abc"  # type: ignore[union-attr]
    assert keyed.contents[0].text == f"contents of toolbox://notes/{MASKED}"  # type: ignore[union-attr]
    assert "Refused by the mcp-armor gateway: denied by rule 'no-secret-notes': secret notes stay private" in secret
    assert unknown == "Unknown resource: elsewhere://x"
    assert hello.messages[0].content.text == "Hello, Ann!"  # type: ignore[union-attr]
    assert masked.messages[0].content.text == f"Hello, {MASKED}!"  # type: ignore[union-attr]
    assert mallory.startswith("Refused by the mcp-armor gateway")
    decisions = [event for event in events(tmp_path) if event["kind"] == "decision"]
    by_target = {(event["tool"], json.dumps(event["arguments"])): event for event in decisions}
    assert by_target[("resource:toolbox://readme", '{"uri": "toolbox://readme"}')]["decision"] == "allow"
    secret_args = json.dumps({"name": "secret-plans", "uri": "toolbox://notes/secret-plans"})  # its variable too
    secret_read = by_target[("resource:toolbox://notes/secret-plans", secret_args)]
    assert secret_read["decision"] == "deny" and secret_read["rules"] == ["notes", "no-secret-notes"]
    assert by_target[("prompt:box__greet", '{"who": "Mallory"}')]["decision"] == "deny"
    assert by_target[("resource:elsewhere://x", '{"uri": "elsewhere://x"}')]["stage"] == "unknown-tool"
    outcomes = {event["call_id"]: event for event in events(tmp_path) if event["kind"] == "outcome"}
    assert all(event["call_id"] in outcomes for event in decisions)  # every decision has its outcome
    greeted = [outcomes[event["call_id"]] for event in decisions if event["tool"] == "prompt:box__greet"]
    assert [outcome["rules"] for outcome in greeted] == [[], ["mask-keys"], []]  # Ann, the key (masked), Mallory
    assert AWS_KEY not in json.dumps(events(tmp_path))  # the audit masks it in what it stores, too


async def test_with_no_rule_naming_them_resources_and_prompts_are_hidden_and_refused(tmp_path: Path) -> None:
    policy = '[defaults]\neffect = "deny"\n\n[[rule]]\nid = "tools"\ntools = ["box__*"]\neffect = "allow"\n'
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=policy)
    async with gateway_client(config) as client:
        assert (await client.list_resources()).resources == []
        assert (await client.list_resource_templates()).resource_templates == []
        assert (await client.list_prompts()).prompts == []
        assert await _refusal(client.read_resource("toolbox://readme")) == "Unknown resource: toolbox://readme"
        assert await _refusal(client.get_prompt("box__greet", {"who": "Ann"})) == "Unknown prompt: box__greet"
        assert not (await client.call_tool("box__echo", {"text": "tools still work"})).is_error
    refused = {
        event["tool"] for event in events(tmp_path) if event["kind"] == "decision" and event["decision"] == "deny"
    }
    assert refused == {"resource:toolbox://readme", "prompt:box__greet"}


ASK_POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "a-person-approves"
resources = ["toolbox://notes/*"]
prompts = ["box__greet"]
effect = "ask"
reason = "a person approves each read"
"""


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_person_approves_a_resource_read_and_a_prompt_in_both_eras(tmp_path: Path, transport: str) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=ASK_POLICY)
    async with client_over(transport, config, "auto", elicitation_callback=Person()) as client:  # 2026: round trips
        first = await client.session.read_resource("toolbox://notes/a", allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult) and first.input_requests is not None
        (key,) = first.input_requests
        yes = {key: types.ElicitResult(action="accept", content={"approve": True})}
        state = first.request_state
        read = await client.session.read_resource("toolbox://notes/a", input_responses=yes, request_state=state)
        assert read.contents[0].text == "contents of toolbox://notes/a"  # type: ignore[union-attr]
        elsewhere = await _refusal(
            client.session.read_resource("toolbox://notes/b", input_responses=yes, request_state=state)
        )
        assert "the approval was given for a different call" in elsewhere
        asked = await client.session.get_prompt("box__greet", {"who": "Ann"}, allow_input_required=True)
        assert isinstance(asked, types.InputRequiredResult)
        greeted = await client.session.get_prompt(
            "box__greet", {"who": "Ann"}, input_responses=yes, request_state=asked.request_state
        )
        assert greeted.messages[0].content.text == "Hello, Ann!"  # type: ignore[union-attr]
    person = Person("approve", "decline")
    async with client_over(transport, config, "legacy", elicitation_callback=person) as client:  # elicitation
        read = await client.read_resource("toolbox://notes/a")
        assert read.contents[0].text == "contents of toolbox://notes/a"  # type: ignore[union-attr]
        assert "the person declined" in await _refusal(client.get_prompt("box__greet", {"who": "Ann"}))
    assert len(person.asked) == 2 and "resource:toolbox://notes/a" in person.asked[0].message


BINARY_POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "no-images"
tools = ["ev__*", "resource:*"]
on = "result"
effect = "deny"
reason = "images stay out of the conversation"
when = { properties = { binary = { contains = { pattern = "^image/" } } }, required = ["binary"] }

[[rule]]
id = "no-binary-reads"
tools = ["resource:*"]
on = "result"
effect = "deny"
when = { required = ["binary"] }
"""


async def test_a_result_rule_withholds_binary_content_from_the_real_everything_server(tmp_path: Path) -> None:
    everything = {"command": node_server("mcp-server-everything"), "args": ["stdio"]}
    config = write_config(tmp_path, {"ev": everything}, policy=BINARY_POLICY)
    gzip_input = {"name": "a.gz", "data": "data:text/plain;base64,aGVsbG8=", "outputType": "resource"}
    async with gateway_client(config) as client:
        image = await client.call_tool("ev__get-tiny-image", {})
        echoed = await client.call_tool("ev__echo", {"message": "plain words"})
        gzipped = await client.call_tool("ev__gzip-file-as-resource", gzip_input)  # binary, not an image
        blob = await client.read_resource("demo://resource/dynamic/blob/1")  # text/plain, as a blob
    assert image.is_error and "result withheld by rule 'no-images': images stay out" in text_of(image)
    assert not any(isinstance(block, types.ImageContent) for block in image.content)
    assert not echoed.is_error and "plain words" in text_of(echoed)
    assert not gzipped.is_error and any(isinstance(block, types.EmbeddedResource) for block in gzipped.content)
    [contents] = blob.contents
    assert isinstance(contents, types.BlobResourceContents) and b"Resource 1" in base64.b64decode(contents.blob)
    recorded = calls(tmp_path)
    withheld = recorded["ev__get-tiny-image"]["outcome"]
    assert withheld["outcome"] == "refused" and withheld["rules"] == ["no-images"]
    assert recorded["ev__echo"]["outcome"]["outcome"] == "ok" and not recorded["ev__echo"]["outcome"]["rules"]
    assert recorded["resource:demo://resource/dynamic/blob/1"]["outcome"]["outcome"] == "ok"
