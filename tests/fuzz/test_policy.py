"""The policy engine's decisions agree with a reference evaluation written here, and the per-call schema
check (jsonschema-rs) agrees with jsonschema, on generated rule sets, calls, schemas and instances.

The reference is deliberately plain: the call rules in order, `fnmatchcase` for tool and client globs,
`when` checked by jsonschema as shipped, `deny` over `ask` over `allow`, and the default when no rule
matches. Patterns are kept to ones where no regular-expression dialect differs (ASCII literals and classes).
"""

from __future__ import annotations

import tempfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from gateway.calls import Effect, Who
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from gateway.schema import compile_checker

TOOLS = ["box__read", "box__write", "fs__read", "fs__list", "other"]
TOOL_GLOBS = ["box__read", "box__*", "*__read", "*", "fs__????", "[bf]*__read", "fs__*", "none"]
CLIENTS = ["claude-code", "cursor", "bot", ""]
CLIENT_GLOBS = ["claude-*", "cursor", "*", "b?t", "*o*"]
WHENS: list[dict[str, Any]] = [
    {"required": ["path"]},
    {"properties": {"path": {"type": "string", "pattern": "^/ws/"}}},
    {"properties": {"path": {"pattern": "\\.env$"}}, "required": ["path"]},
    {"properties": {"n": {"type": "integer", "minimum": 3}}},
    {"properties": {"n": {"type": "number", "exclusiveMaximum": 10}}, "required": ["n"]},
    {"not": {"required": ["force"]}},
    {"properties": {"mode": {"enum": ["r", "w"]}}},
    {"anyOf": [{"required": ["force"]}, {"properties": {"path": {"maxLength": 5}}}]},
    {"properties": {"force": {"const": True}}, "additionalProperties": {"type": ["string", "integer", "boolean"]}},
]
EFFECTS = ["allow", "deny", "ask"]
PRECEDENCE = {"deny": 0, "ask": 1, "allow": 2}

rules = st.lists(
    st.fixed_dictionaries(
        {
            "tools": st.lists(st.sampled_from(TOOL_GLOBS), min_size=1, max_size=2),
            "effect": st.sampled_from(EFFECTS),
        },
        optional={
            "clients": st.lists(st.sampled_from(CLIENT_GLOBS), min_size=1, max_size=2),
            "when": st.sampled_from(WHENS),
        },
    ),
    max_size=6,
)
arguments = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(["/ws/a", "/ws/.env", "/etc/passwd", "x", ".env", "", "/ws/\u00e9.env"]),
        "n": st.one_of(st.integers(-5, 15), st.floats(-5, 15), st.booleans()),
        "mode": st.sampled_from(["r", "w", "x"]),
        "force": st.sampled_from([True, False, 1, "yes"]),
    },
)


def reference(
    written: list[dict[str, Any]], default: str | None, tool: str, client: str, args: dict[str, Any]
) -> tuple[str, tuple[str, ...]]:
    """The effect, and the ids of the rules that match, in order."""
    matched = []
    for index, rule in enumerate(written):
        if not any(fnmatchcase(tool, glob) for glob in rule["tools"]):
            continue
        if "clients" in rule and not any(fnmatchcase(client, glob) for glob in rule["clients"]):
            continue
        if "when" in rule and not Draft202012Validator(rule["when"]).is_valid(args):
            continue
        matched.append((f"r{index}", rule["effect"]))
    if not matched:
        return default or "deny", ()
    effect = min((effect for _, effect in matched), key=PRECEDENCE.__getitem__)
    return effect, tuple(rule_id for rule_id, _ in matched)


@given(
    written=rules,
    default=st.one_of(st.none(), st.sampled_from(EFFECTS)),
    tool=st.sampled_from(TOOLS),
    client=st.sampled_from(CLIENTS),
    args=arguments,
)
def test_decisions_agree_with_a_reference_evaluation(
    written: list[dict[str, Any]], default: str | None, tool: str, client: str, args: dict[str, Any]
) -> None:
    document: dict[str, Any] = {"rule": [{"id": f"r{index}", **rule} for index, rule in enumerate(written)]}
    if default is not None:
        document["defaults"] = {"effect": default}
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "p.toml").write_text(tomli_w.dumps(document), encoding="utf-8")
        engine = PolicyEngine(load_policies(Path(directory)))
    decision = engine.evaluate(tool, args, now=0, who=Who(client))
    effect, matched = reference(written, default, tool, client, args)
    assert (decision.effect, decision.rules) == (Effect(effect), matched)


ASCII = st.text("ab/.x0", max_size=6)
PATTERNS = ["^a", "b$", "[0-9]", "^/", "x+", "^$", "a.b", "[^a]"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    ASCII,
)
instances = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("abcd"), inner, max_size=4)),
    max_leaves=12,
)
numbers = st.one_of(st.integers(-10, 10), st.floats(-10, 10, width=32))
leaf_schemas = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["string", "integer", "number", "boolean", "null", "array", "object"]),
            "minimum": numbers,
            "exclusiveMaximum": numbers,
            "minLength": st.integers(0, 4),
            "maxLength": st.integers(0, 4),
            "pattern": st.sampled_from(PATTERNS),
            "minItems": st.integers(0, 3),
            "maxProperties": st.integers(0, 3),
            "uniqueItems": st.booleans(),
            "required": st.lists(st.sampled_from("abcd"), max_size=2, unique=True),
        },
    ),
    st.fixed_dictionaries({"enum": st.lists(scalars, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"const": instances}),
    st.booleans(),
)
schemas = st.recursive(
    leaf_schemas,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"properties": st.dictionaries(st.sampled_from("abcd"), inner, max_size=3)}),
        st.fixed_dictionaries({"items": inner}),
        st.fixed_dictionaries({"contains": inner}),
        st.fixed_dictionaries({"additionalProperties": inner, "properties": st.fixed_dictionaries({"a": inner})}),
        st.fixed_dictionaries({"patternProperties": st.dictionaries(st.sampled_from(PATTERNS), inner, max_size=2)}),
        st.fixed_dictionaries({"not": inner}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"oneOf": st.lists(inner, min_size=1, max_size=3)}),
    ),
    max_leaves=8,
)


@given(schema=schemas, instance=instances)
def test_the_per_call_check_agrees_with_jsonschema(schema: Any, instance: Any) -> None:
    wrapped = {"properties": {"x": schema}}
    assert compile_checker(wrapped).is_valid({"x": instance}) == Draft202012Validator(wrapped).is_valid({"x": instance})
