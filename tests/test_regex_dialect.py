"""One regex dialect for every check: JSON Schema's (ECMA-262, as jsonschema-rs reads it), run in linear time.

Each pair below is one where Python's `re` and ECMA-262 disagree. Every path that checks a pattern gives
the ECMA-262 verdict: the engine itself, the per-call check of an upstream's input schema and of a policy's
`when` (as a `pattern` and as a `patternProperties` name), the wording of a refusal, a call rule and a
result rule. A pattern only Python reads is refused where a pattern is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema.exceptions import SchemaError, best_match

from gateway.calls import Effect
from gateway.catalog.listing import normalise_listing
from gateway.errors import PolicyError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from gateway.schema import compile_checker, compile_schema, search

DIFFERENCES = [
    pytest.param("^abc$", "abc\n", False, id="dollar-before-final-newline"),
    pytest.param("^a$", "a\n", False, id="dollar-anchors-the-end"),
    pytest.param("^\\d+$", "\u0661\u0662", False, id="digit-is-ascii"),
    pytest.param("^\\w+$", "h\u00e9llo", False, id="word-is-ascii"),
    pytest.param("^[\\w-]+$", "na\u00efve", False, id="word-in-a-class"),
    pytest.param("^\\s$", "\ufeff", True, id="space-includes-bom"),
    pytest.param("^\\s$", "\u0085", False, id="space-excludes-nel"),
    pytest.param("^\\S+$", "a\ufeffb", False, id="non-space-excludes-bom"),
    pytest.param("^.$", "\r", False, id="dot-excludes-cr"),
    pytest.param("^.$", "\u2028", False, id="dot-excludes-line-separator"),
    pytest.param("^.+$", "a\u2029b", False, id="dot-excludes-paragraph-separator"),
    pytest.param("\\p{L}", "\u00e9", True, id="unicode-property"),
    pytest.param("^\\cJ$", "\n", True, id="control-escape"),
    pytest.param("^\\u00e9$", "\u00e9", True, id="unicode-escape"),
]


def _hits(pattern: str, text: str) -> dict[str, bool]:
    """Whether `pattern` matches `text`, as every path that reads a pattern says (a `pattern` a value
    must match; a `patternProperties` name whose property must be null)."""
    as_value = {"type": "object", "properties": {"v": {"pattern": pattern}}}
    as_name = {"type": "object", "patternProperties": {pattern: {"type": "null"}}}
    wording = compile_schema(as_value)
    tools = normalise_listing("up", [{"name": "t", "inputSchema": as_value}, {"name": "k", "inputSchema": as_name}])
    value, name = tools.tools
    return {
        "engine": search(pattern, text),
        "per-call check": compile_checker(as_value).is_valid({"v": text}),
        "per-call check, patternProperties": not compile_checker(as_name).is_valid({text: 1}),
        "wording validator": wording.is_valid({"v": text}),
        "wording of the refusal": best_match(wording.iter_errors({"v": text})) is None,
        "wording, patternProperties": not compile_schema(as_name).is_valid({text: 1}),
        "upstream tool": value.violation({"v": text}) is None,
        "upstream tool, patternProperties": name.violation({text: 1}) is not None,
    }


def _policy(directory: Path, pattern: str) -> PolicyEngine:
    directory.mkdir()
    (directory / "p.toml").write_text(
        f"""
[defaults]
effect = "allow"

[[rule]]
id = "call"
tools = ["a__value"]
effect = "deny"
when = {{ properties = {{ v = {{ pattern = {json.dumps(pattern)} }} }} }}

[[rule]]
id = "named"
tools = ["a__name"]
effect = "deny"
when = {{ not = {{ patternProperties = {{ {json.dumps(pattern)} = false }} }} }}

[[rule]]
id = "result"
tools = ["*"]
on = "result"
effect = "deny"
when = {{ properties = {{ text = {{ pattern = {json.dumps(pattern)} }} }} }}
""",
        encoding="utf-8",
    )
    return PolicyEngine(load_policies(directory))


@pytest.mark.parametrize(("pattern", "text", "ecma"), DIFFERENCES)
def test_every_path_gives_the_ecma_262_verdict(tmp_path: Path, pattern: str, text: str, ecma: bool) -> None:
    # Python's `re` (or a check that used it) says the opposite, or cannot read the pattern at all.
    hits = _hits(pattern, text)
    engine = _policy(tmp_path / "policies", pattern)
    hits["policy when"] = engine.evaluate("a__value", {"v": text}, now=0).effect is Effect.DENY
    hits["policy when, patternProperties"] = engine.evaluate("a__name", {text: 1}, now=0).effect is Effect.DENY
    result = {"content": [{"type": "text", "text": text}]}
    hits["result rule"] = engine.screen_result("a__t", result).withheld_by == "result"
    assert hits == dict.fromkeys(hits, ecma)


PYTHON_ONLY = [
    pytest.param("abc\\Z", id="end-of-string-Z"),
    pytest.param("^a{,3}$", id="open-lower-bound"),
    pytest.param("(?P<n>a)(?P=n)", id="python-backreference"),
    pytest.param("\\e", id="unknown-escape"),
]


@pytest.mark.parametrize("pattern", PYTHON_ONLY)
def test_a_pattern_only_python_reads_is_refused(tmp_path: Path, pattern: str) -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {"v": {"pattern": pattern}}}
    with pytest.raises(SchemaError):
        compile_schema(schema)
    listing = normalise_listing("up", [{"name": "t", "inputSchema": schema}])
    assert listing.tools == () and "not a valid JSON Schema" in listing.problems[0]
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "p.toml").write_text(
        f'[[rule]]\nid = "r"\ntools = ["*"]\neffect = "deny"\nwhen = {{ properties = {{ v = {{ pattern = '
        f"{json.dumps(pattern)} }} }} }}\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError, match=re.escape("p.toml: rule 'r': when: not a valid JSON Schema")):
        load_policies(directory)
