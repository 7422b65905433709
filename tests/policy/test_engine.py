"""The policy engine from tables: effects, precedence, defaults, monitor mode, clients, rates, results, bypasses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.calls import Effect, Who
from gateway.policy.engine import PolicyEngine, merge_patch
from gateway.policy.files import load_policies
from gateway.policy.rules import Rule
from tests.conftest import REPO

POLICY = r"""
[[rule]]
id = "read"
tools = ["files__read_*", "files__list_directory"]
effect = "allow"
when = { required = ["path"], properties = { path = { "$ref" = "schemas/inside.json" } } }

[[rule]]
id = "no-secrets"
tools = ["files__*"]
effect = "deny"
reason = "secret files stay off-limits"
when = { required = ["path"], properties = { path = { type = "string", pattern = '(^|/)(\.env|\.ssh|id_rsa)' } } }

[[rule]]
id = "writes-need-approval"
tools = ["files__write_file"]
effect = "ask"

[[rule]]
id = "cap-results"
tools = ["search__query"]
effect = "rewrite"
set = { max_results = 20 }
when = { required = ["max_results"], properties = { max_results = { minimum = 21 } } }

[[rule]]
id = "search"
tools = ["search__*"]
effect = "allow"

[[rule]]
id = "fetch-budget"
tools = ["fetch__*"]
effect = "allow"
rate = "3/minute"

[[rule]]
id = "shell-for-claude-code"
tools = ["shell__*"]
clients = ["claude-code*"]
effect = "allow"

[[rule]]
id = "shell-trial-deny"
tools = ["shell__run"]
effect = "deny"
mode = "monitor"
when = { properties = { command = { type = "string", pattern = "^rm " } } }

[[rule]]
id = "counts"
tools = ["stats__*"]
effect = "allow"
when = { properties = { n = { type = "integer", maximum = 100 }, tags = { type = "array", maxItems = 10 } } }

[[rule]]
id = "dates"
tools = ["cal__*"]
effect = "allow"
when = { required = ["day"], properties = { day = { type = "string", format = "date" } } }

[[rule]]
id = "no-echo-secrets"
tools = ["box__echo"]
on = "result"
effect = "deny"
reason = "it carries a private key"
when = { required = ["text"], properties = { text = { pattern = "PRIVATE KEY" } } }

[[rule]]
id = "mask-keys"
tools = ["box__*"]
on = "result"
redact = ['AKIA[0-9A-Z]{16}']
"""

INSIDE = {"type": "string", "pattern": "^/srv/project/", "not": {"$ref": "escape.json"}}
ESCAPE = {"type": "string", "pattern": "(^|/)\\.\\.(/|$)|%2[eEfF]|\\\\"}


def make_engine(directory: Path, text: str = POLICY, *, monitor_mode: bool = False) -> PolicyEngine:
    (directory / "schemas").mkdir(parents=True, exist_ok=True)
    (directory / "schemas" / "inside.json").write_text(json.dumps(INSIDE))
    (directory / "schemas" / "escape.json").write_text(json.dumps(ESCAPE))
    (directory / "main.toml").write_text(text)
    engine = PolicyEngine(load_policies(directory), monitor_mode=monitor_mode)
    engine.index_tools(["files__read_file", "files__write_file", "search__query", "fetch__get", "shell__run"])
    return engine


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    return make_engine(tmp_path)


DECISIONS = [
    pytest.param("files__read_file", {"path": "/srv/project/a.txt"}, "", Effect.ALLOW, ("read",), id="allow"),
    pytest.param(
        "files__read_file",
        {"path": "/srv/project/.env"},
        "",
        Effect.DENY,
        ("read", "no-secrets"),
        id="deny-beats-allow",
    ),
    pytest.param("files__write_file", {"path": "/srv/project/a"}, "", Effect.ASK, ("writes-need-approval",), id="ask"),
    pytest.param(
        "files__write_file",
        {"path": "/srv/project/.ssh/config"},
        "",
        Effect.DENY,
        ("no-secrets", "writes-need-approval"),
        id="deny-beats-ask",
    ),
    pytest.param("search__query", {"max_results": 5}, "", Effect.ALLOW, ("search",), id="rewrite-when-not-met"),
    pytest.param("search__query", {"max_results": 500}, "", Effect.REWRITE, ("cap-results", "search"), id="rewrite"),
    pytest.param("files__delete", {"path": "/srv/project/a"}, "", Effect.DENY, (), id="default-deny"),
    pytest.param("unknown__tool", {}, "", Effect.DENY, (), id="no-rule-at-all"),
    pytest.param("shell__run", {"command": "ls"}, "claude-code", Effect.ALLOW, ("shell-for-claude-code",), id="client"),
    pytest.param("shell__run", {"command": "ls"}, "claude-code-2", Effect.ALLOW, ("shell-for-claude-code",), id="glob"),
    pytest.param("shell__run", {"command": "ls"}, "cursor", Effect.DENY, (), id="other-client"),
    pytest.param("shell__run", {"command": "ls"}, "", Effect.DENY, (), id="anonymous-client"),
    pytest.param("cal__add", {"day": "2026-11-23"}, "", Effect.ALLOW, ("dates",), id="format-date-ok"),
    pytest.param("cal__add", {"day": "2026-13-45"}, "", Effect.DENY, (), id="format-is-asserted"),
]


@pytest.mark.parametrize(("tool", "arguments", "client", "effect", "rules"), DECISIONS)
def test_decisions(
    engine: PolicyEngine, tool: str, arguments: dict[str, Any], client: str, effect: Effect, rules: tuple[str, ...]
) -> None:
    decision = engine.evaluate(tool, arguments, now=0.0, who=Who(client, session="s"))
    assert decision.effect is effect
    assert decision.rules == rules
    assert decision.revision == engine.policies.revision
    assert decision.reason


def test_reasons_name_the_rule_and_say_why(engine: PolicyEngine) -> None:
    denied = engine.evaluate("files__read_file", {"path": "/srv/project/.env"}, now=0)
    assert denied.reason == "denied by rule 'no-secrets': secret files stay off-limits"
    default = engine.evaluate("files__read_file", {"path": "/etc/passwd"}, now=0)
    assert "default is deny" in default.reason and "'read'" in default.reason


def test_rewrite_is_a_merge_patch(engine: PolicyEngine) -> None:
    decision = engine.evaluate("search__query", {"q": "x", "max_results": 500}, now=0)
    assert decision.effect is Effect.REWRITE
    assert decision.arguments == {"q": "x", "max_results": 20}
    assert merge_patch({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"b": None}, "d": [1]}) == {"a": {"c": 2}, "d": [1]}


def test_default_can_be_set(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, POLICY + '\n[defaults]\neffect = "allow"\n')
    assert engine.evaluate("anything__else", {}, now=0).effect is Effect.ALLOW
    assert engine.evaluate("files__read_file", {"path": "/srv/project/.env"}, now=0).effect is Effect.DENY


def test_monitor_rules_record_but_never_change_the_outcome(engine: PolicyEngine) -> None:
    decision = engine.evaluate("shell__run", {"command": "rm -rf /"}, now=0, who=Who("claude-code"))
    assert decision.effect is Effect.ALLOW
    assert decision.would is Effect.DENY
    assert decision.monitored == ("shell-trial-deny",)
    calm = engine.evaluate("shell__run", {"command": "ls"}, now=0, who=Who("claude-code"))
    assert calm.would is None and calm.monitored == ()


def test_monitor_mode_refuses_nothing_and_records_what_it_would(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, monitor_mode=True)
    decision = engine.evaluate("files__read_file", {"path": "/srv/project/.env"}, now=0)
    assert decision.effect is Effect.ALLOW
    assert decision.would is Effect.DENY
    assert decision.reason.startswith("monitor mode, would deny: denied by rule 'no-secrets'")
    assert engine.visible("files__delete")


def test_rate_limit_per_session_and_rule_with_a_fake_clock(engine: PolicyEngine) -> None:
    def call(session: str, now: float) -> Effect:
        decision = engine.evaluate("fetch__get", {}, now=now, who=Who(session=session))
        if decision.proceeds:
            assert engine.charge(decision, Who(session=session), now)
        return decision.effect

    assert [call("a", t) for t in (0, 1, 2)] == [Effect.ALLOW] * 3
    limited = engine.evaluate("fetch__get", {}, now=3, who=Who(session="a"))
    assert limited.effect is Effect.DENY
    assert "allows 3 calls per minute" in limited.reason and "try again in 57s" in limited.reason
    assert call("b", 3) is Effect.ALLOW  # another session has its own budget
    assert call("a", 60.5) is Effect.ALLOW  # the first call left the window


def test_refused_calls_do_not_consume_the_rate(engine: PolicyEngine) -> None:
    for now in range(10):
        decision = engine.evaluate("fetch__get", {}, now=now, who=Who(session="s"))
        assert decision.effect is Effect.ALLOW
        assert engine.charge(decision, Who(session="s"), now)
        engine.refund(decision, Who(session="s"), now)  # refused later on (e.g. by an approval that never came)


def test_hidden_tools(engine: PolicyEngine) -> None:
    assert engine.visible("files__read_file")
    assert engine.visible("files__write_file")  # ask can allow
    assert not engine.visible("files__delete")  # default deny, no allowing rule
    assert not engine.visible("shell__run", Who("cursor"))
    assert engine.visible("shell__run", Who("claude-code"))


def test_unconditional_deny_hides(tmp_path: Path) -> None:
    engine = make_engine(
        tmp_path, '[defaults]\neffect = "allow"\n[[rule]]\nid = "x"\ntools = ["a__*"]\neffect = "deny"\n'
    )
    assert not engine.visible("a__b")
    assert engine.visible("b__c")


def test_an_error_while_evaluating_denies(engine: PolicyEngine) -> None:
    class Broken:
        def is_valid(self, instance: object) -> bool:
            raise RecursionError("maximum recursion depth exceeded")

    rule = Rule(
        id="broken",
        source="x.toml",
        tools=("box__*",),
        tools_pattern=__import__("re").compile("box__.*"),
        effect=Effect.ALLOW,
        when=Broken(),  # type: ignore[arg-type]
    )
    engine.replace_policies(type(engine.policies)(rules=(rule,), default=Effect.ALLOW, revision="r"))
    decision = engine.evaluate("box__echo", {"text": "x"}, now=0)
    assert decision.effect is Effect.DENY
    assert decision.rules == ("broken",)
    assert "could not be evaluated (RecursionError)" in decision.reason


def test_result_rules(engine: PolicyEngine) -> None:
    key = "AKIA" + "A" * 16
    result = {"content": [{"type": "text", "text": f"the key is {key}."}], "isError": False}
    masked = engine.screen_result("box__echo", result)
    assert masked.redacted_by == ("mask-keys",)
    assert masked.result["content"][0]["text"] == "the key is [redacted by mcp-armor rule 'mask-keys']."
    assert result["content"][0]["text"].endswith(f"{key}.")  # the original is not mutated

    structured = {"content": [], "structuredContent": {"nested": [key]}}
    assert engine.screen_result("box__echo", structured).result["structuredContent"] == {
        "nested": ["[redacted by mcp-armor rule 'mask-keys']"]
    }

    secret = {"content": [{"type": "text", "text": "-----BEGIN PRIVATE KEY-----"}]}
    withheld = engine.screen_result("box__echo", secret)
    assert withheld.withheld_by == "no-echo-secrets"
    assert withheld.reason == "result withheld by rule 'no-echo-secrets': it carries a private key"
    assert engine.screen_result("other__tool", secret).withheld_by is None


def test_explain_says_why_for_every_rule(engine: PolicyEngine) -> None:
    decision, trace = engine.explain("files__read_file", {"path": "/srv/project/.env"}, now=0)
    verdicts = dict(trace)
    assert decision.effect is Effect.DENY
    assert verdicts["read"] == "matches: allow"
    assert verdicts["no-secrets"] == "matches: deny"
    assert verdicts["writes-need-approval"].startswith("tools ['files__write_file'] do not match")
    assert verdicts["mask-keys"].startswith("result rule")
    assert [rule_id for rule_id, _ in trace] == [rule.id for rule in engine.policies.rules]


def test_rules_that_do_not_concern_a_tool_are_not_looked_at(tmp_path: Path) -> None:
    many = "".join(f'[[rule]]\nid = "r{i}"\ntools = ["other{i}__*"]\neffect = "deny"\n' for i in range(200))
    engine = make_engine(tmp_path, POLICY + many)
    assert len(engine.rules_for("files__read_file").call) == 2
    assert len(engine.rules_for("files__read_file").result) == 0


BYPASSES = [
    pytest.param("FILES__read_file", {"path": "/srv/project/a"}, Effect.DENY, id="case-changed-tool"),
    pytest.param("files__re\u0430d_file", {"path": "/srv/project/a"}, Effect.DENY, id="cyrillic-a-in-tool"),
    pytest.param("files__list_directory\u200b", {"path": "/srv/project/a"}, Effect.DENY, id="zero-width-in-tool"),
    pytest.param("files__read_file", {"path": "/srv/project/../../etc/passwd"}, Effect.DENY, id="dot-dot"),
    pytest.param("files__read_file", {"path": "/srv/project/%2e%2e/%2e%2e/etc"}, Effect.DENY, id="url-encoded"),
    pytest.param("files__read_file", {"path": "/srv/project/%2E%2E%2Fetc"}, Effect.DENY, id="url-encoded-upper"),
    pytest.param("files__read_file", {"path": "/srv/project/..\\..\\etc"}, Effect.DENY, id="backslashes"),
    pytest.param("files__read_file", {"path": ["/srv/project/a"]}, Effect.DENY, id="array-for-string"),
    pytest.param("files__read_file", {"path": {"$ref": "/srv/project/a"}}, Effect.DENY, id="object-for-string"),
    pytest.param("files__read_file", {"path": "/srv/project/.env", "x": 1}, Effect.DENY, id="extra-property"),
    pytest.param("files__read_file", {"path": "/srv/project/" + "a" * 1_000_000}, Effect.ALLOW, id="huge-string"),
    pytest.param("files__read_file", {"path": "/srv/project/" + "a" * 500_000 + "/.env"}, Effect.DENY, id="huge-tail"),
    pytest.param("stats__sum", {"n": "10"}, Effect.DENY, id="string-for-integer"),
    pytest.param("stats__sum", {"n": 10.5}, Effect.DENY, id="float-for-integer"),
    pytest.param("stats__sum", {"n": True}, Effect.DENY, id="boolean-for-integer"),
    pytest.param("stats__sum", {"n": 10}, Effect.ALLOW, id="integer"),
    pytest.param("stats__sum", {"tags": list(range(100_000))}, Effect.DENY, id="huge-array"),
]


@pytest.mark.parametrize(("tool", "arguments", "effect"), BYPASSES)
def test_bypass_attempts(engine: PolicyEngine, tool: str, arguments: dict[str, Any], effect: Effect) -> None:
    assert engine.evaluate(tool, arguments, now=0).effect is effect


def test_the_engine_does_no_io() -> None:
    code = (
        "import sys, gateway.policy.engine, gateway.policy.files\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'mcp_types', 'anyio', 'asyncio'))\n"
        "print(','.join(bad))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert found.stdout.strip() == ""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_result_rules_see_and_mask_every_channel_of_a_result(engine: PolicyEngine) -> None:
    key = "AKIA" + "B" * 16
    binary = base64.b64encode(b"\x89PNG\r\n\x1a\n\xff\xfe").decode()
    result = {
        "content": [
            {"type": "resource", "resource": {"uri": "file:///ws/.env", "mimeType": "text/plain", "blob": _b64(key)}},
            {"type": "resource", "resource": {"uri": "file:///ws/k", "blob": _b64(f"k={key}")}},  # no MIME type
            {"type": "resource", "resource": {"uri": "file:///ws/a", "text": f"inline {key}"}},
            {"type": "image", "mimeType": "image/png", "data": _b64(f"png? {key}")},
            {"type": "image", "mimeType": "image/png", "data": binary},
        ]
    }
    screened = engine.screen_result("box__echo", result)
    assert screened.redacted_by == ("mask-keys",)
    mask = "[redacted by mcp-armor rule 'mask-keys']"
    blocks = screened.result["content"]
    assert base64.b64decode(blocks[0]["resource"]["blob"]).decode() == mask
    assert base64.b64decode(blocks[1]["resource"]["blob"]).decode() == f"k={mask}"
    assert blocks[2]["resource"]["text"] == f"inline {mask}"
    assert base64.b64decode(blocks[3]["data"]).decode() == f"png? {mask}"
    assert blocks[4]["data"] == binary  # bytes that are not text are left as they are
    assert blocks[0]["resource"]["mimeType"] == "text/plain" and blocks[0]["resource"]["uri"] == "file:///ws/.env"


def test_a_text_rule_sees_the_text_beside_structured_content_and_blobs(engine: PolicyEngine) -> None:
    private = "-----BEGIN PRIVATE KEY-----"
    beside = {"content": [{"type": "text", "text": private}], "structuredContent": {"ok": True}}
    assert engine.screen_result("box__echo", beside).withheld_by == "no-echo-secrets"
    as_blob = {"content": [{"type": "resource", "resource": {"uri": "file:///k", "blob": _b64(private)}}]}
    assert engine.screen_result("box__echo", as_blob).withheld_by == "no-echo-secrets"
    in_structure = {"content": [], "structuredContent": {"text": private, "n": 1}}
    assert engine.screen_result("box__echo", in_structure).withheld_by == "no-echo-secrets"
    assert engine.screen_result("box__echo", {"content": [], "structuredContent": {"ok": True}}).withheld_by is None


def test_blobs_are_read_however_they_are_encoded_and_odd_structures_are_seen(engine: PolicyEngine) -> None:
    key = "AKIA" + "C" * 16
    spellings = {
        "wrapped": base64.encodebytes(f"k={key}\n".encode() * 8).decode(),
        "urlsafe": base64.urlsafe_b64encode(f"\xff\xfe?>k={key}".encode()).decode(),
        "unpadded": base64.b64encode(f"k={key}!".encode()).decode().rstrip("="),
        "utf16": base64.b64encode(f"k={key}".encode("utf-16")).decode(),
        "bad-byte": base64.b64encode(b"\xff" + f"k={key}".encode()).decode(),
    }
    for name, blob in spellings.items():
        result = {"content": [{"type": "resource", "resource": {"uri": "file:///k", "blob": blob}}]}
        screened = engine.screen_result("box__echo", result)
        assert screened.redacted_by == ("mask-keys",), name
        assert key not in json.dumps(screened.result), name
    private = "-----BEGIN PRIVATE KEY-----"
    for odd in (
        {"content": [], "structuredContent": [private]},
        {"content": [{"type": "resource_link", "uri": "file:///k", "name": "k", "description": private}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": private}]}]},
    ):
        assert engine.screen_result("box__echo", odd).withheld_by == "no-echo-secrets", odd


ITEMS_POLICY = """
[defaults]
effect = "deny"

[[rule]]
id = "inside-ws"
tools = ["files__read"]
effect = "allow"
when = { properties = { path = { pattern = "^/ws/" } } }

[[rule]]
id = "no-env"
tools = ["files__read"]
effect = "deny"
when = { required = ["path"], properties = { path = { type = "string", pattern = '\\.env$' } } }

[[rule]]
id = "move-inside-ws"
tools = ["files__move"]
effect = "allow"
when = { properties = { source = { pattern = "^/ws/" }, target = { pattern = "^/ws/" } } }

[[rule]]
id = "no-move-onto-env"
tools = ["files__move"]
effect = "deny"
when = { required = ["source", "target"], properties = { source = { type = "string" }, target = { pattern = 'env$' } } }

[[rule]]
id = "batch-inside-ws"
tools = ["files__batch"]
effect = "allow"
when = { properties = { paths = { type = "array", items = { pattern = "^/ws/" } } } }
"""


def test_an_argument_given_as_an_array_stands_for_each_of_its_items(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, ITEMS_POLICY)

    def effect(tool: str, **arguments: Any) -> str:
        return engine.evaluate(tool, arguments, now=0).effect.value

    assert effect("files__read", path="/ws/a") == "allow"
    assert effect("files__read", path="/ws/.env") == "deny"
    assert effect("files__read", path=["/ws/a", "/ws/.env"]) == "deny"  # the deny holds for one item
    assert effect("files__read", path=["/ws/a", "/etc/passwd"]) == "deny"  # the allow fails for one item
    assert effect("files__read", path=["/ws/a", "/ws/b"]) == "allow"
    assert effect("files__read", path=["/ws/a"] * 300) == "deny"  # too many to look at: no permission
    assert effect("files__batch", paths=["/ws/a", "/ws/b"]) == "allow"  # a rule written for the array
    assert effect("files__batch", paths=["/ws/a", "/etc/passwd"]) == "deny"
    assert effect("files__read", path=[["/ws/.env"]]) == "deny"  # arrays in the array are opened too
    assert effect("files__read", path=["/ws/a", ["/etc/passwd"]]) == "deny"
    assert effect("files__move", source=["/ws/a"], target=["/ws/.env"]) == "deny"  # every combination
    assert effect("files__move", source=["/ws/a"], target=["/ws/b"]) == "allow"


PEOPLE = """
[[rule]]
id = "alice-reads"
tools = ["files__read_file"]
principals = ["alice"]
effect = "allow"

[[rule]]
id = "ci-searches"
tools = ["search__query"]
principals = ["ci-*"]
effect = "allow"

[[rule]]
id = "admins-write"
tools = ["files__write_file"]
attributes = ["group:admins", "scope:files.write"]
effect = "allow"

[[rule]]
id = "ops-admins-shell"
tools = ["shell__run"]
principals = ["ops-*"]
attributes = ["role:admin"]
effect = "allow"

[[rule]]
id = "by-client-name"
tools = ["fetch__get"]
clients = ["alice"]
effect = "allow"
"""


def _people(directory: Path) -> PolicyEngine:
    return make_engine(directory, PEOPLE)


WHO_DECISIONS = [
    pytest.param("files__read_file", Who(principal="alice"), Effect.ALLOW, id="named-principal"),
    pytest.param("files__read_file", Who(principal="alice2"), Effect.DENY, id="glob-is-whole-name"),
    pytest.param("files__read_file", Who(principal="Alice"), Effect.DENY, id="case-sensitive"),
    pytest.param("files__read_file", Who(client="alice"), Effect.DENY, id="client-named-alice-is-not-alice"),
    pytest.param("search__query", Who(principal="ci-nightly"), Effect.ALLOW, id="principal-glob"),
    pytest.param("search__query", Who(session="ci-nightly"), Effect.DENY, id="no-principal"),
    pytest.param("files__write_file", Who(principal="bob", attributes=frozenset({"group:admins"})), Effect.ALLOW),
    pytest.param(
        "files__write_file", Who(principal="bob", attributes=frozenset({"scope:files.write", "x:y"})), Effect.ALLOW
    ),
    pytest.param("files__write_file", Who(principal="bob", attributes=frozenset({"group:admin"})), Effect.DENY),
    pytest.param("files__write_file", Who(client="group:admins"), Effect.DENY, id="client-named-an-attribute"),
    pytest.param("shell__run", Who(principal="ops-1", attributes=frozenset({"role:admin"})), Effect.ALLOW, id="both"),
    pytest.param("shell__run", Who(principal="ops-1"), Effect.DENY, id="principal-without-attribute"),
    pytest.param("shell__run", Who(principal="dev", attributes=frozenset({"role:admin"})), Effect.DENY),
    pytest.param("fetch__get", Who(client="alice"), Effect.ALLOW, id="clients-matches-the-client"),
    pytest.param("fetch__get", Who(client="cursor", principal="alice"), Effect.DENY, id="clients-never-the-principal"),
]


@pytest.mark.parametrize(("tool", "who", "effect"), WHO_DECISIONS)
def test_principals_and_attributes_concern_only_the_callers_they_match(
    tmp_path: Path, tool: str, who: Who, effect: Effect
) -> None:
    """`principals` globs the authenticated name, `attributes` any one attribute (both given: both must
    match), `clients` only what the client says it is; a caller no one authenticated matches no `principals`."""
    engine = _people(tmp_path)
    assert engine.evaluate(tool, {"path": "/srv/project/a", "q": "x", "command": "ls"}, now=0, who=who).effect is effect


def test_a_principals_glob_of_everyone_still_needs_someone_authenticated(tmp_path: Path) -> None:
    engine = make_engine(
        tmp_path, '[[rule]]\nid = "anyone"\ntools = ["fetch__get"]\nprincipals = ["*"]\neffect = "allow"\n'
    )
    assert engine.evaluate("fetch__get", {}, now=0, who=Who(principal="x")).effect is Effect.ALLOW
    assert engine.evaluate("fetch__get", {}, now=0, who=Who(client="x", session="s")).effect is Effect.DENY
    assert engine.visible("fetch__get", Who(principal="x")) and not engine.visible("fetch__get", Who(client="x"))


def test_each_principal_sees_only_what_some_rule_could_allow_it(tmp_path: Path) -> None:
    engine = _people(tmp_path)
    tools = ["files__read_file", "files__write_file", "search__query", "shell__run", "fetch__get"]

    def listed(who: Who) -> list[str]:
        return [tool for tool in tools if engine.visible(tool, who)]

    assert listed(Who(principal="alice")) == ["files__read_file"]
    assert listed(Who(principal="ci-7")) == ["search__query"]
    assert listed(Who(principal="ops-2", attributes=frozenset({"role:admin", "group:admins"}))) == [
        "files__write_file",
        "shell__run",
    ]
    assert listed(Who(client="alice")) == ["fetch__get"]
    assert listed(Who()) == []
    assert all(engine.reachable(tool) for tool in tools)  # someone can call each


def test_a_deny_for_some_principals_hides_the_tool_from_them_only(tmp_path: Path) -> None:
    engine = make_engine(
        tmp_path,
        '[defaults]\neffect = "allow"\n[[rule]]\nid = "not-interns"\ntools = ["shell__run"]\n'
        'attributes = ["group:interns"]\neffect = "deny"\n',
    )
    assert not engine.visible("shell__run", Who(principal="i", attributes=frozenset({"group:interns"})))
    assert engine.visible("shell__run", Who(principal="alice"))
    assert engine.reachable("shell__run")


def test_explain_says_which_caller_key_a_rule_does_not_match(tmp_path: Path) -> None:
    engine = _people(tmp_path)
    _, anonymous = engine.explain("files__read_file", {"path": "/srv/project/a"}, now=0, who=Who(client="alice"))
    assert dict(anonymous)["alice-reads"] == "principals ['alice'] do not match no principal (none authenticated)"
    _, bob = engine.explain("files__write_file", {}, now=0, who=Who(principal="bob", attributes=frozenset({"role:x"})))
    assert (
        dict(bob)["admins-write"]
        == "attributes ['group:admins', 'scope:files.write'] match none of the caller's ['role:x']"
    )
    _, cursor = engine.explain("fetch__get", {}, now=0, who=Who(client="cursor", principal="alice"))
    assert dict(cursor)["by-client-name"] == "clients ['alice'] do not match 'cursor'"


def test_result_rules_for_a_principal_screen_only_its_results(tmp_path: Path) -> None:
    engine = make_engine(
        tmp_path,
        '[[rule]]\nid = "mask-for-contractors"\ntools = ["search__query"]\non = "result"\n'
        'attributes = ["group:contractors"]\nredact = ["secret"]\n',
    )
    result = {"content": [{"type": "text", "text": "a secret"}]}
    contractor = Who(principal="c", attributes=frozenset({"group:contractors"}))
    assert engine.screen_result("search__query", result, contractor).redacted_by == ("mask-for-contractors",)
    assert engine.screen_result("search__query", result, Who(principal="e")).redacted_by == ()


RATED = '[[rule]]\nid = "fetch-budget"\ntools = ["fetch__get"]\neffect = "allow"\nrate = "2/minute"\n'


def test_a_principal_has_one_rate_budget_across_its_sessions(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RATED)

    def call(who: Who, now: float) -> Effect:
        decision = engine.evaluate("fetch__get", {}, now=now, who=who)
        if decision.proceeds:
            assert engine.charge(decision, who, now)
        return decision.effect

    assert call(Who(principal="alice", session="s1"), 0) is Effect.ALLOW
    assert call(Who(principal="alice", session="s2"), 1) is Effect.ALLOW
    refused = engine.evaluate("fetch__get", {}, now=2, who=Who(principal="alice", session="s3"))
    assert refused.effect is Effect.DENY and "2 calls per minute per principal" in refused.reason
    assert call(Who(principal="bob", session="s1"), 2) is Effect.ALLOW  # another principal: its own budget
    assert call(Who(session="s4"), 2) is Effect.ALLOW  # no principal: the session's
    assert call(Who(session="alice"), 2) is Effect.ALLOW  # a session id is never a principal's budget


def test_a_principal_that_reconnects_does_not_get_a_fresh_budget(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RATED)
    first = Who(principal="alice", session="s1")
    for now in (0, 1):
        assert engine.charge(engine.evaluate("fetch__get", {}, now=now, who=first), first, now)
    anonymous = Who(session="s1")
    assert engine.charge(engine.evaluate("fetch__get", {}, now=1, who=anonymous), anonymous, 1)
    engine.limiter.forget("s1")  # the session ended
    again = Who(principal="alice", session="s2")
    assert engine.evaluate("fetch__get", {}, now=2, who=again).effect is Effect.DENY
    assert engine.evaluate("fetch__get", {}, now=2, who=Who(session="s1")).effect is Effect.ALLOW  # its own: forgotten
    assert engine.evaluate("fetch__get", {}, now=60.5, who=again).effect is Effect.ALLOW  # the window moved on


def test_a_refund_gives_back_the_principals_charge(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RATED)
    for now in range(5):
        who = Who(principal="alice", session=f"s{now}")
        decision = engine.evaluate("fetch__get", {}, now=now, who=who)
        assert decision.effect is Effect.ALLOW
        assert engine.charge(decision, who, now)
        engine.refund(decision, Who(principal="alice", session="another"), now)  # the principal's count, any session
