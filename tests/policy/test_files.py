"""Loading policy files: every mistake is refused at load with one line naming file, rule id and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.calls import Effect
from gateway.errors import PolicyError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies, parse_rate
from tests.conftest import REPO

RULE = '[[rule]]\nid = "r"\ntools = ["a__*"]\n'

CASES = [
    pytest.param({"p.toml": "[[rule]\n"}, "p.toml: not valid TOML", id="toml-syntax"),
    pytest.param({"p.toml": "[rules]\n"}, "p.toml: rules: unknown key", id="unknown-top-level-key"),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\ncolour = 1\n'}, "p.toml: rule 'r': colour: unknown key", id="key"
    ),
    pytest.param(
        {"p.toml": '[[rule]]\ntools = ["a"]\neffect = "allow"\n'}, "p.toml: rule #1: id: required", id="no-id"
    ),
    pytest.param({"p.toml": RULE}, "p.toml: rule 'r': effect: required key is missing", id="no-effect"),
    pytest.param({"p.toml": RULE + 'effect = "permit"\n'}, "p.toml: rule 'r': effect: Input should be", id="effect"),
    pytest.param(
        {"p.toml": '[[rule]]\nid = "r"\ntools = []\neffect = "allow"\n'}, "p.toml: rule 'r': tools: ", id="no-tools"
    ),
    pytest.param(
        {"p.toml": '[[rule]]\nid = "bad id"\ntools = ["a"]\neffect = "allow"\n'}, "rule 'bad id': id:", id="id"
    ),
    pytest.param(
        {"a.toml": RULE + 'effect = "allow"\n', "b.toml": RULE + 'effect = "deny"\n'},
        "b.toml: rule 'r': id: duplicate (first defined in a.toml)",
        id="duplicate-id-across-files",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { type = "strin" }\n'},
        "p.toml: rule 'r': when: not a valid JSON Schema",
        id="bad-schema",
    ),
    pytest.param(
        {"p.toml": RULE + "effect = \"allow\"\nwhen = { properties = { p = { pattern = '([' } } }\n"},
        "p.toml: rule 'r': when: not a valid JSON Schema: at 'properties/p/pattern'",
        id="bad-schema-regex",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { format = "iri-reference" }\n'},
        "p.toml: rule 'r': when: format 'iri-reference' cannot be checked by the gateway",
        id="unsupported-format",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "schemas/none.json" }\n'},
        "p.toml: rule 'r': when: $ref 'schemas/none.json': file",
        id="missing-ref-file",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "../outside.json" }\n'},
        "points outside the policies directory",
        id="ref-escapes",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "https://example.com/s.json" }\n'},
        "only files inside the policies directory can be referenced",
        id="remote-ref",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "s.json" }\n', "s.json": '{"type": "nope"}'},
        "p.toml: rule 'r': when: $ref 's.json': ",
        id="bad-ref-schema",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "s.json" }\n', "s.json": "{not json"},
        "is not readable JSON",
        id="ref-not-json",
    ),
    pytest.param({"p.toml": RULE + 'effect = "allow"\nrate = "lots"\n'}, "p.toml: rule 'r': rate: expected", id="rate"),
    pytest.param({"p.toml": RULE + 'effect = "allow"\nrate = "0/minute"\n'}, "rule 'r': rate: the limit", id="rate-0"),
    pytest.param(
        {"p.toml": RULE + 'effect = "deny"\nrate = "3/minute"\n'}, "rule 'r': rate: a deny rule", id="deny-rate"
    ),
    pytest.param({"p.toml": RULE + 'effect = "rewrite"\n'}, "p.toml: rule 'r': set: a rewrite rule needs", id="no-set"),
    pytest.param({"p.toml": RULE + 'mask = ["a..b"]\n'}, "mask[0]: expected a dotted argument path", id="mask"),
    pytest.param({"p.toml": RULE + "mask = []\n"}, "mask: Tuple should have at least 1 item", id="mask-empty"),
    pytest.param(
        {"p.toml": RULE + 'mask = ["a"]\nwhen = { type = "object" }\n'},
        "rule 'r': when: a rule with only 'mask' decides nothing",
        id="mask-only-when",
    ),
    pytest.param(
        {"p.toml": RULE + 'on = "result"\neffect = "deny"\nmask = ["a"]\n'},
        "rule 'r': mask: applies to call rules",
        id="mask-result",
    ),
    pytest.param({"p.toml": RULE + 'effect = "allow"\nset = { a = 1 }\n'}, "rule 'r': set: applies to", id="set-allow"),
    pytest.param(
        {"p.toml": RULE + "on = \"result\"\nredact = ['(']\n"},
        "p.toml: rule 'r': redact[0]: invalid regular expression",
        id="bad-redact-regex",
    ),
    pytest.param(
        {"p.toml": RULE + 'on = "result"\neffect = "allow"\n'}, "rule 'r': on: a result rule either", id="result-allow"
    ),
    pytest.param({"p.toml": RULE + 'on = "result"\n'}, "rule 'r': on: a result rule either", id="result-nothing"),
    pytest.param(
        {"p.toml": RULE + "effect = \"allow\"\nredact = ['x']\n"}, "rule 'r': redact: applies to", id="redact-on-call"
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nmode = "audit"\n'}, "p.toml: rule 'r': mode: Input should be", id="mode"
    ),
    pytest.param({"p.toml": '[defaults]\neffect = "maybe"\n'}, "p.toml: [defaults] effect: Input should be", id="dflt"),
    pytest.param(
        {"a.toml": '[defaults]\neffect = "deny"\n', "b.toml": '[defaults]\neffect = "allow"\n'},
        "b.toml: [defaults] already set in a.toml",
        id="defaults-twice",
    ),
    pytest.param({"p.toml": "rule = 3\n"}, "p.toml: rule: must be an array of tables", id="rule-not-tables"),
    pytest.param({"p.toml": RULE + 'effect = "allow"\nclients = [""]\n'}, "rule 'r': clients: empty glob", id="glob"),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nprincipals = []\n'},
        "p.toml: rule 'r': principals: Tuple should have at least 1 item",
        id="no-principals",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nattributes = []\n'},
        "p.toml: rule 'r': attributes: Tuple should have at least 1 item",
        id="no-attributes",
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nprincipals = [" "]\n'}, "rule 'r': principals: empty glob", id="blank"
    ),
    pytest.param(
        {"p.toml": RULE + 'effect = "allow"\nattributes = "group:x"\n'},
        "p.toml: rule 'r': attributes: Input should be a valid tuple",
        id="attributes-not-a-list",
    ),
]


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(("files", "message"), CASES)
def test_policy_errors(tmp_path: Path, files: dict[str, str], message: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    write(policies, files)
    with pytest.raises(PolicyError) as raised:
        load_policies(policies)
    text = str(raised.value)
    assert "\n" not in text
    assert message in text
    assert text.startswith(str(policies))


def test_a_mask_only_rule_masks_and_decides_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(RULE + 'mask = ["token", "items.*.key"]\n[defaults]\neffect = "allow"\n')
    engine = PolicyEngine(load_policies(tmp_path))
    assert engine.rules_for("a__x").mask == (("token",), ("items", "*", "key"))
    assert engine.rules_for("a__x").call == ()
    assert engine.evaluate("a__x", {"token": "t"}, now=0).effect is Effect.ALLOW


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policies directory not found"):
        load_policies(tmp_path / "nowhere")


def test_empty_directory_denies_everything(tmp_path: Path) -> None:
    policies = load_policies(tmp_path)
    assert policies.rules == () and policies.default is Effect.DENY


def test_revision_covers_every_file_and_referenced_schema(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    write(tmp_path, {"p.toml": RULE + 'effect = "allow"\nwhen = { "$ref" = "schemas/s.json" }\n'})
    (tmp_path / "schemas" / "s.json").write_text('{"type": "object"}')
    first = load_policies(tmp_path).revision
    assert load_policies(tmp_path).revision == first
    (tmp_path / "schemas" / "s.json").write_text('{"type": "object", "required": ["a"]}')
    second = load_policies(tmp_path).revision
    assert second != first
    write(tmp_path, {"q.toml": "# a comment\n"})
    assert load_policies(tmp_path).revision not in (first, second)


def test_the_shipped_policies_load() -> None:
    shipped = load_policies(REPO / "policies")
    assert shipped.default is Effect.DENY
    assert {"ask", "deny", "allow", "rewrite"} <= {rule.effect.value for rule in shipped.rules if rule.effect}
    assert any(rule.rate for rule in shipped.rules) and any(rule.on_result for rule in shipped.rules)


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [
        ("30/minute", 30, 60.0),
        ("5/second", 5, 1.0),
        ("100/hour", 100, 3600.0),
        ("2/day", 2, 86400.0),
        ("10/30s", 10, 30.0),
    ],
)
def test_rates(text: str, limit: int, period: float) -> None:
    rate = parse_rate(text)
    assert (rate.limit, rate.period) == (limit, period)


def test_the_shipped_secret_file_schema_matches_every_spelling_a_server_resolves() -> None:
    shipped = {rule.id: rule for rule in load_policies(REPO / "policies").rules}
    when = shipped["git-show-no-secret-files"].when
    assert when is not None
    for revision in ("HEAD:.env", "HEAD:.env/", "HEAD:.env/.", "HEAD:.env//", "HEAD:app/.env/./", "HEAD:.env.local"):
        assert when.is_valid({"revision": revision}), revision
    for revision in ("HEAD:README.md", "HEAD:.environment", "HEAD:.env/../README.md", "main"):
        assert not when.is_valid({"revision": revision}), revision
    cap = shipped["git-log-cap"].when
    assert cap is not None
    assert [count for count in (-1, 0, 1, 50, 51, 10**6) if cap.is_valid({"max_count": count})] == [-1, 0, 51, 10**6]


def test_rules_name_tools_resources_and_prompts_apart(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.toml").write_text(
        '[[rule]]\nid = "every-tool"\ntools = ["*"]\neffect = "allow"\n\n'
        '[[rule]]\nid = "docs"\nresources = ["docs://*"]\nprompts = ["box__*"]\neffect = "allow"\n'
    )
    every_tool, docs = load_policies(policies).rules
    assert every_tool.concerns("box__echo") and not every_tool.concerns("resource:docs://a")
    assert not every_tool.concerns("prompt:box__greet")
    assert docs.concerns("resource:docs://a/b") and docs.concerns("prompt:box__greet")
    assert not docs.concerns("resource:file:///etc/passwd") and not docs.concerns("box__echo")
    (policies / "p.toml").write_text('[[rule]]\nid = "nothing"\neffect = "allow"\n')
    with pytest.raises(PolicyError, match="rule 'nothing': tools: required key is missing"):
        load_policies(policies)


def test_a_rewrite_cannot_name_resources(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.toml").write_text(
        '[[rule]]\nid = "redirect"\nresources = ["docs://*"]\neffect = "rewrite"\nset = { uri = "docs://x" }\n'
    )
    with pytest.raises(PolicyError, match="rule 'redirect': resources: a rewrite changes arguments"):
        load_policies(policies)


def test_a_rule_can_name_an_upstreams_requests_but_not_rewrite_them(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.toml").write_text(
        '[[rule]]\nid = "quiet"\nsampling = ["git"]\nelicitation = ["*"]\neffect = "deny"\n'
    )
    [quiet] = load_policies(policies).rules
    assert quiet.concerns("sampling:git") and quiet.concerns("elicitation:time") and not quiet.concerns("sampling:time")
    assert not quiet.concerns("git__git_log")
    (policies / "p.toml").write_text(
        '[[rule]]\nid = "odd"\nsampling = ["*"]\neffect = "rewrite"\nset = { maxTokens = 1 }\n'
    )
    with pytest.raises(PolicyError, match="rule 'odd': sampling: a rewrite changes arguments"):
        load_policies(policies)
