"""Policy patterns cannot stall the gateway: `when` patterns and `redact` patterns run in linear time on
whatever text a caller or an upstream sends, and a pattern that would need backtracking is refused at load
with one line naming the file, the rule and the pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.calls import Effect
from gateway.errors import PolicyError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies

HOSTILE = "a" * 40 + "!"
"""A backtracking engine takes 2^40 steps to find that `^(a|a)+$` or `(a|a)+b` does not match this."""
RULE = '[[rule]]\nid = "r"\ntools = ["*"]\n'

REFUSED = [
    pytest.param(
        RULE + "effect = \"deny\"\nwhen = { properties = { p = { pattern = '^(?!/ws)' } } }\n",
        "p.toml: rule 'r': when: pattern '^(?!/ws)': needs backtracking",
        id="when-lookahead",
    ),
    pytest.param(
        RULE + "effect = \"deny\"\nwhen = { patternProperties = { '(?<=x)y' = false } }\n",
        "p.toml: rule 'r': when: pattern '(?<=x)y': needs backtracking",
        id="when-lookbehind-property-name",
    ),
    pytest.param(
        RULE + 'effect = "deny"\nwhen = { "$ref" = "schemas/twice.json" }\n',
        "p.toml: rule 'r': when: $ref 'schemas/twice.json': pattern '^(\\\\w+)\\\\1$': needs backtracking",
        id="when-ref-backreference",
    ),
    pytest.param(
        RULE + "on = \"result\"\nredact = ['(?<=key=)\\w+']\n",
        "p.toml: rule 'r': redact[0]: invalid regular expression (RE2 syntax, run in linear time",
        id="redact-lookbehind",
    ),
    pytest.param(
        RULE + "on = \"result\"\nredact = ['x', '(a)\\1']\n",
        "p.toml: rule 'r': redact[1]: invalid regular expression",
        id="redact-backreference",
    ),
]


@pytest.mark.parametrize(("policy", "message"), REFUSED)
def test_a_pattern_that_needs_backtracking_is_refused_at_load(tmp_path: Path, policy: str, message: str) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "twice.json").write_text(json.dumps({"type": "string", "pattern": "^(\\w+)\\1$"}))
    (tmp_path / "p.toml").write_text(policy, encoding="utf-8")
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    text = str(raised.value)
    assert "\n" not in text
    assert message in text, text


POLICY = """
[defaults]
effect = "allow"

[[rule]]
id = "no-runs"
tools = ["box__*"]
effect = "deny"
when = { properties = { text = { pattern = "^(a|a)+$" } }, required = ["text"] }

[[rule]]
id = "only-runs"
tools = ["box__keyed"]
effect = "allow"
when = { properties = { map = { patternProperties = { "^(a|a)+$" = {} }, additionalProperties = false } } }

[[rule]]
id = "withhold-runs"
tools = ["box__*"]
on = "result"
effect = "deny"
when = { properties = { text = { pattern = "^(a|a)+$" } } }

[[rule]]
id = "mask-runs"
tools = ["box__*"]
on = "result"
redact = ["(a|a)+b"]
"""


@pytest.mark.timeout(20)
def test_hostile_text_is_decided_and_screened_in_linear_time(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(POLICY, encoding="utf-8")
    engine = PolicyEngine(load_policies(tmp_path))
    assert engine.evaluate("box__echo", {"text": HOSTILE}, now=0).effect is Effect.ALLOW
    assert engine.evaluate("box__echo", {"text": "aaaa"}, now=0).effect is Effect.DENY
    assert engine.evaluate("box__keyed", {"map": {HOSTILE: 1}}, now=0).rules == ()
    assert engine.evaluate("box__keyed", {"map": {"aa": 1}}, now=0).rules == ("only-runs",)
    screened = engine.screen_result("box__echo", {"content": [{"type": "text", "text": HOSTILE}]})
    assert screened.withheld_by is None and screened.redacted_by == ()
    masked = engine.screen_result("box__echo", {"content": [{"type": "text", "text": HOSTILE + " aab"}]})
    assert masked.result["content"][0]["text"] == HOSTILE + " [redacted by mcp-armor rule 'mask-runs']"
    withheld = engine.screen_result("box__echo", {"content": [{"type": "text", "text": "aaaa"}]})
    assert withheld.withheld_by == "withhold-runs"
