"""Warnings about policies that load but probably do not say what their author meant.

Checked against the tools the upstreams expose now (upstreams change, so these are warnings, not
errors): a `tools` glob that matches no exposed tool, a `when` that names an argument the tool's
own input schema does not have (a typo there silently turns a condition off), a `[[paths]]` argument
none of its tools has (a path left as spelled), and an upstream whose every tool is hidden (declared,
started, and of no use to any client). Without the upstreams: an `attributes` glob that names no kind
of attribute. (A `principals` glob matching no one is no finding: principals are not known at load.)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from gateway.calls import ATTRIBUTE_KINDS
from gateway.policy.engine import PolicyEngine, PolicySet

_BRANCHES = ("allOf", "anyOf", "oneOf")


def lint(policies: PolicySet, tools: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per finding; `tools` maps exposed tool names to their input schemas."""
    findings: list[str] = []
    for rule in policies.rules:
        where = f"{rule.source}: rule '{rule.id}'"
        concerned = [name for name in tools if rule.concerns(name)]
        findings += _unmatched(rule.tools, tools, where)
        if rule.on_result or rule.when_schema is None:
            continue
        named = set(_argument_names(rule.when_schema))
        for name in concerned:
            known = tools[name].get("properties")
            if not isinstance(known, Mapping):
                continue
            for argument in sorted(named - set(known)):
                findings.append(f"{where}: when: names argument {argument!r}, which tool '{name}' does not have")
    for declared in policies.paths.declarations:
        where = f"{declared.source}: paths"
        findings += _unmatched(declared.tools, tools, where)
        schemas = [tools[name].get("properties") for name in tools if declared.tools_pattern.fullmatch(name)]
        for argument in sorted(declared.arguments):
            if schemas and not any(isinstance(known, Mapping) and argument in known for known in schemas):
                findings.append(f"{where}: arguments: {argument!r} is an argument of none of the tools it names")
    return findings


def unkinded_attributes(policies: PolicySet) -> list[str]:
    """One line per `attributes` glob that begins with no kind of attribute (`scope:`, `group:`, `role:`):
    every attribute a principal holds begins with one, so such a glob most likely matches none."""
    kinds = ", ".join(ATTRIBUTE_KINDS)
    return [
        f"{rule.source}: rule '{rule.id}': attributes: {glob!r} does not begin with {kinds} "
        "(every attribute of a principal does)"
        for rule in policies.rules
        for glob in rule.attributes or ()
        if not glob.startswith(ATTRIBUTE_KINDS)
    ]


def _unmatched(globs: Iterable[str], tools: Mapping[str, Any], where: str) -> list[str]:
    return [
        f"{where}: tools: {glob!r} matches no exposed tool"
        for glob in globs
        if not any(fnmatch.fnmatchcase(name, glob) for name in tools)
    ]


def hidden_upstreams(engine: PolicyEngine, tools: Iterable[tuple[str, str]]) -> list[str]:
    """One line per upstream none of whose tools any client can call (`PolicyEngine.reachable`); `tools`
    are (exposed name, upstream)."""
    per_upstream: dict[str, list[str]] = {}
    for name, upstream in tools:
        per_upstream.setdefault(upstream, []).append(name)
    findings: list[str] = []
    for upstream, names in sorted(per_upstream.items()):
        if not any(engine.reachable(name) for name in names):
            which = "the only tool" if len(names) == 1 else f"all {len(names)} tools"
            verb = "is" if len(names) == 1 else "are"
            findings.append(f"{which} of '{upstream}' {verb} hidden: no rule allows, asks or rewrites a call to it")
    return findings


def _argument_names(schema: Mapping[str, Any]) -> Iterator[str]:
    """The top-level argument names a `when` schema talks about (through allOf/anyOf/oneOf/not too)."""
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        yield from properties
    required = schema.get("required")
    if isinstance(required, list):
        yield from (name for name in required if isinstance(name, str))
    for key in _BRANCHES:
        branches = schema.get(key)
        if isinstance(branches, list):
            for branch in branches:
                if isinstance(branch, Mapping):
                    yield from _argument_names(branch)
    negated = schema.get("not")
    if isinstance(negated, Mapping):
        yield from _argument_names(negated)
