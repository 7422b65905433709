"""An argument given as an array stands for each of its items, so a condition cannot be walked around
by wrapping a value in a list.

A `when` written about one value (`path = { type = "string", pattern = '\\.env$' }`) says nothing of an
array of them: as JSON Schema reads it, the string keywords skip an array, and the rule would not
match a deny, or would vacuously match an allow. So, for an argument the rule's `properties` do not
describe as an array (no `type = "array"`, `items`, `contains`, ...), its items are each put in its
place and the rule checked again: a refusing rule (`deny`, `ask`) holds when it holds for the
arguments as given or for any item; a permitting one (`allow`, `rewrite`) only when it holds for them
and for every item. An array longer than `MAX_ITEMS` is not looked at item by item: a refusal holds,
a permission does not.
"""

from __future__ import annotations

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
    for key in _itemised(rule, arguments):
        items = arguments[key]
        if len(items) > MAX_ITEMS:
            return refuses
        for item in items:
            if rule.when.is_valid({**arguments, key: item}) is refuses:
                return refuses
    return given


def _itemised(rule: Rule, arguments: Mapping[str, Any]) -> list[str]:
    """The arguments given as non-empty arrays that the rule does not describe as arrays."""
    schema = rule.when_schema if isinstance(rule.when_schema, Mapping) else {}
    described = schema.get("properties")
    keys = []
    for key, value in arguments.items():
        if isinstance(value, list) and value:
            own = described.get(key) if isinstance(described, Mapping) else None
            if not _array_aware(own):
                keys.append(key)
    return keys


def _array_aware(schema: Any) -> bool:
    if not isinstance(schema, Mapping):
        return False
    kind = schema.get("type")
    return kind == "array" or (isinstance(kind, list) and "array" in kind) or not _ARRAY_KEYWORDS.isdisjoint(schema)
