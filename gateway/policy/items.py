"""An argument given as an array stands for each of its items, so a condition cannot be walked around
by wrapping a value in a list.

A `when` written about one value (`path = { type = "string", pattern = '\\.env$' }`) says nothing of an
array of them: as JSON Schema reads it, the string keywords skip an array, and the rule would not
match a deny, or would vacuously match an allow. So, for an argument the rule's `properties` do not
describe as an array (no `type = "array"`, `items`, `contains`, ...), its items (arrays in it opened
too) are put in its place, and with several such arguments every combination of their items, and
the rule checked again: a refusing rule (`deny`, `ask`) holds when it holds for the arguments as
given or for any combination; a permitting one (`allow`, `rewrite`) only when it holds for them and
for every combination. More than `MAX_ITEMS` combinations are not looked at one by one: a refusal
holds, a permission does not. Arrays are opened at the top level of the arguments only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from gateway.calls import Effect
from gateway.policy.rules import Rule

MAX_ITEMS = 256
_ARRAY_KEYWORDS = frozenset(
    {"items", "prefixItems", "contains", "minItems", "maxItems", "uniqueItems", "minContains", "maxContains"}
)


def when_holds(rule: Rule, arguments: Mapping[str, Any]) -> bool:
    """Whether `rule`'s `when` holds for `arguments`, arrays standing for each of their items."""
    assert rule.when is not None
    given = rule.when.is_valid(arguments)
    refuses = rule.effect in (Effect.DENY, Effect.ASK)
    if given is refuses:  # a refusal that holds as given, or a permission that does not
        return given
    keys = _itemised(rule, arguments)
    if not keys:
        return given
    choices = [_leaves(arguments[key]) for key in keys]
    if math.prod(len(choice) for choice in choices) > MAX_ITEMS:
        return refuses
    for combination in itertools.product(*choices):
        if rule.when.is_valid({**arguments, **dict(zip(keys, combination, strict=True))}) is refuses:
            return refuses
    return given


def _itemised(rule: Rule, arguments: Mapping[str, Any]) -> list[str]:
    """The arguments given as non-empty arrays that the rule names without describing them as arrays
    (every such argument when the rule's `when` has no `properties` of its own)."""
    schema = rule.when_schema if isinstance(rule.when_schema, Mapping) else {}
    described = schema.get("properties")
    keys = []
    for key, value in arguments.items():
        if not isinstance(value, list) or not value:
            continue
        if isinstance(described, Mapping):
            if key in described and not _array_aware(described[key]):
                keys.append(key)
        else:
            keys.append(key)
    return keys


def _leaves(value: list[Any]) -> list[Any]:
    """The items of an array, arrays in it opened too (`[["a"], "b"]` stands for `a` and `b`); at most
    `MAX_ITEMS` + 1 of them (more are not looked at)."""
    leaves: list[Any] = []
    pending = list(reversed(value))
    while pending and len(leaves) <= MAX_ITEMS:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        else:
            leaves.append(item)
    return leaves


def _array_aware(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return False
    kind = schema.get("type")
    return kind == "array" or (isinstance(kind, list) and "array" in kind) or not _ARRAY_KEYWORDS.isdisjoint(schema)
