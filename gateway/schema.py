"""JSON helpers shared by the catalogue and the policy engine: canonical form, digests, compiled schemas.

Free of MCP and of I/O, so the sans-IO policy engine can use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.protocols import Validator
from referencing import Registry

_MAX_DETAIL = 300
_DATE_TIME = re.compile(r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s\x00-\x1f\x7f]*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")

FORMATS = FormatChecker()
"""Every `format` a schema may assert: jsonschema's own, plus the common ones it leaves to optional packages."""


@FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _DATE_TIME.match(value):
        return False
    try:
        datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


@FORMATS.checks("uri")
def _is_uri(value: object) -> bool:
    return not isinstance(value, str) or _URI.match(value) is not None


@FORMATS.checks("hostname")
def _is_hostname(value: object) -> bool:
    return not isinstance(value, str) or _HOSTNAME.match(value) is not None


_CANONICAL = {
    allow_nan: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan).encode
    for allow_nan in (True, False)
}
"""Built once: `json.dumps` with any non-default option builds a new encoder on every call."""


def canonical_text(value: Any, *, allow_nan: bool = True) -> str:
    """A canonical JSON form (sorted keys, no insignificant whitespace, non-ASCII as is) for hashing."""
    return _CANONICAL[allow_nan](value)


def canonical_json(value: Any) -> bytes:
    return canonical_text(value).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def compile_schema(schema: dict[str, Any], registry: Registry[Any] | None = None) -> Validator:
    """Check a JSON Schema and compile a validator for it (draft from `$schema`, else 2020-12).

    `format` is asserted, not just annotated. Raises `SchemaError` for a schema that is not valid.
    """
    cls = validators.validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    if registry is None:
        validator: Validator = cls(schema, format_checker=FORMATS)
    else:
        validator = cls(schema, format_checker=FORMATS, registry=registry)
    return validator


Mask = Callable[[Any, tuple[str, ...]], Any]
"""Masks a value found at a path of the instance (the keys and indices on the way to it) before it is
quoted: what a refusal's text may show of a call's arguments."""


def describe_violation(error: SchemaViolation | SchemaError, mask: Mask | None = None) -> str:
    """One line naming where in the instance (or, for a `SchemaError`, the schema) it went wrong, and how.

    With `mask`, every value of the instance quoted (and every key of the path) is masked first, and only
    then written out and cut to length: no secret reaches the text, whole or in part."""
    parts = [str(part) for part in error.absolute_path]
    if mask is not None:
        parts = [str(mask(part, tuple(parts[:index]))) for index, part in enumerate(parts)]
    where = "/".join(parts)
    text = json_message(error, mask)
    message = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
    return f"at '{where}': {message}" if where else message


_FALSE_SCHEMA = "False schema does not allow "
_VALUE_KEYWORDS = frozenset(("const", "enum", "not"))
"""Keywords whose own value (a JSON value or schema) jsonschema's message quotes, at its start or end."""


def json_message(error: SchemaViolation | SchemaError, mask: Mask | None = None) -> str:
    """jsonschema's message with the values it quotes written as JSON (`null`, `true`, `"x"`), not as Python
    (`None`, `True`, `'x'`): these lines reach agents and people who wrote JSON. Names (`'integer'`, a
    required property) keep their quotes, as everywhere else in the gateway's messages. With `mask`, the
    instance is masked (see `describe_violation`) before it is written out."""
    message = error.message
    python, spoken = repr(error.instance), _as_json(error.instance)
    if mask is not None:
        masked = mask(error.instance, tuple(str(part) for part in error.absolute_path))
        if masked != error.instance:
            spoken = _as_json(masked)
            if not (message.startswith(python) or message == _FALSE_SCHEMA + python):
                # The value is quoted elsewhere in jsonschema's words: say only what it is and which keyword failed.
                return f"{spoken} does not satisfy '{error.validator}'"
    if message.startswith(python):
        message = spoken + message[len(python) :]
    elif message == _FALSE_SCHEMA + python:
        message = _FALSE_SCHEMA + spoken
    if error.validator in _VALUE_KEYWORDS:
        python, spoken = repr(error.validator_value), _as_json(error.validator_value)
        if message.endswith(python):
            message = message[: len(message) - len(python)] + spoken
        elif message.startswith(python):
            message = spoken + message[len(python) :]
    return message


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not JSON (a TOML date in a policy's schema, say): as Python wrote it
        return repr(value)


Check = Callable[[Any], bool]


class Matcher(Protocol):
    """Anything that says whether an instance satisfies a schema: a jsonschema validator, or a `FastSchema`."""

    def is_valid(self, instance: Any) -> bool: ...


_ANNOTATIONS = frozenset(
    ("title", "description", "$comment", "default", "examples", "deprecated", "readOnly", "writeOnly")
)
_TYPES: dict[str, Check] = {
    "string": lambda value: isinstance(value, str),
    "object": lambda value: isinstance(value, dict),
    "array": lambda value: isinstance(value, list),
    "boolean": lambda value: isinstance(value, bool),
    "null": lambda value: value is None,
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "integer": lambda value: (
        (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())
    ),
}


class FastSchema:
    """A JSON Schema compiled to plain Python predicates, for the keywords policies use most.

    Same verdicts as the jsonschema validator (the tests compare them), several times faster. Made only
    by `compile_fast`, which declines any schema using a keyword it does not implement.
    """

    __slots__ = ("_check",)

    def __init__(self, check: Check) -> None:
        self._check = check

    def is_valid(self, instance: Any) -> bool:
        return self._check(instance)


def compile_fast(schema: dict[str, Any]) -> FastSchema | None:
    """A `FastSchema` for `schema` (already checked), or `None` if it uses anything not implemented here."""
    if schema.get("$schema") not in (None, "https://json-schema.org/draft/2020-12/schema"):
        return None
    check = _compile({key: value for key, value in schema.items() if key != "$schema"})
    return FastSchema(check) if check is not None else None


def _compile(schema: Any) -> Check | None:
    if schema is True or schema is False:
        verdict = bool(schema)
        return lambda _: verdict
    if not isinstance(schema, dict):
        return None
    checks: list[Check] = []
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        check = _keyword(key, value, schema)
        if check is None:
            return None  # a keyword not implemented here: the full validator decides
        checks.append(check)
    return _every(checks)


def _compile_all(schemas: Any) -> list[Check] | None:
    compiled = [_compile(sub) for sub in schemas] if isinstance(schemas, list) else [None]
    return None if any(sub is None for sub in compiled) else [sub for sub in compiled if sub is not None]


def _keyword(key: str, value: Any, schema: dict[str, Any]) -> Check | None:
    """One keyword as a predicate, with jsonschema's semantics (a keyword ignores other JSON types)."""
    if key == "type":
        return _some([_TYPES[name] for name in ([value] if isinstance(value, str) else value)])
    if key == "required":
        names = frozenset(value)
        return lambda v: not isinstance(v, dict) or names <= v.keys()
    if key == "properties":
        subs = {name: _compile(sub) for name, sub in value.items()}
        if any(sub is None for sub in subs.values()):
            return None
        checks = [(name, sub) for name, sub in subs.items() if sub is not None]

        def properties(v: Any) -> bool:
            if isinstance(v, dict):
                for name, sub in checks:
                    if name in v and not sub(v[name]):
                        return False
            return True

        return properties
    if key == "additionalProperties":
        extra = _compile(value)
        if extra is None or "patternProperties" in schema:
            return None
        known = frozenset(schema.get("properties", {}))

        def additional(v: Any) -> bool:
            if isinstance(v, dict):
                for name, item in v.items():
                    if name not in known and not extra(item):
                        return False
            return True

        return additional
    if key == "pattern":
        search = re.compile(value).search
        return lambda v: not isinstance(v, str) or search(v) is not None
    if key in ("enum", "const"):
        options = list(value) if key == "enum" else [value]
        return lambda v: any(_equal(v, option) for option in options)
    if key in _BOUNDS:
        compare, limit = _BOUNDS[key], value
        return lambda v: not _TYPES["number"](v) or compare(v, limit)
    if key in _SIZES:
        kind, at_least, size = _SIZES[key][0], _SIZES[key][1], value

        def sized(v: Any) -> bool:
            return not isinstance(v, kind) or (len(v) >= size if at_least else len(v) <= size)

        return sized
    if key in ("items", "contains"):
        item = _compile(value)
        if item is None or {"prefixItems", "minContains", "maxContains"} & schema.keys():
            return None
        if key == "items":
            return lambda v: not isinstance(v, list) or all(map(item, v))
        return lambda v: not isinstance(v, list) or any(map(item, v))
    if key == "format":
        name = value
        return lambda v: FORMATS.conforms(v, name)
    if key == "not":
        inner = _compile(value)
        return None if inner is None else lambda v: not inner(v)
    if key in ("allOf", "anyOf", "oneOf"):
        branches = _compile_all(value)
        if branches is None:
            return None
        if key == "allOf":
            return _every(branches)
        if key == "anyOf":
            return _some(branches)
        return lambda v: sum(1 for sub in branches if sub(v)) == 1
    return None


def _every(checks: list[Check]) -> Check:
    """All of `checks` (in order, stopping at the first that fails), with no generator per instance."""
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)

    def every(v: Any) -> bool:
        for check in checks:
            if not check(v):
                return False
        return True

    return every


def _some(checks: list[Check]) -> Check:
    """Any of `checks` (in order, stopping at the first that passes)."""
    if len(checks) == 1:
        return checks[0]

    def some(v: Any) -> bool:
        for check in checks:
            if check(v):
                return True
        return False

    return some


_BOUNDS: dict[str, Callable[[Any, Any], bool]] = {
    "minimum": lambda v, limit: bool(v >= limit),
    "maximum": lambda v, limit: bool(v <= limit),
    "exclusiveMinimum": lambda v, limit: bool(v > limit),
    "exclusiveMaximum": lambda v, limit: bool(v < limit),
}
_SIZES: dict[str, tuple[type[str] | type[list[Any]], bool]] = {
    "minLength": (str, True),
    "maxLength": (str, False),
    "minItems": (list, True),
    "maxItems": (list, False),
}


def _equal(one: Any, two: Any) -> bool:
    """JSON equality: `true` is not `1`, `1.0` is `1`, arrays and objects compare member by member."""
    if isinstance(one, bool) or isinstance(two, bool):
        return isinstance(one, bool) and isinstance(two, bool) and one == two
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(_equal(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(_equal(one[key], two[key]) for key in one)
    if isinstance(one, list | dict) or isinstance(two, list | dict):
        return False
    return bool(one == two)


def replace_non_finite(value: Any, replacement: Callable[[float], Any]) -> Any:
    """A JSON-like value with every NaN and infinity (which JSON cannot carry) replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return replacement(value)
    if isinstance(value, Mapping):
        return {key: replace_non_finite(item, replacement) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [replace_non_finite(item, replacement) for item in value]
    return value
