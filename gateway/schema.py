"""JSON helpers shared by the catalogue and the policy engine: canonical form, digests, compiled schemas.

Free of MCP and of I/O, so the sans-IO policy engine can use them. A schema is checked at load by
jsonschema (`compile_schema`, which also words refusals) and checked per call by jsonschema-rs
(`compile_checker`). Both read every regular expression one way, JSON Schema's (ECMA-262, as
jsonschema-rs reads it), and run it in linear time: a pattern from an upstream or a policy, or a
caller's string, cannot stall the gateway's one event loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import jsonschema_rs
from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import SchemaError
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.protocols import Validator
from referencing import Registry

from gateway.errors import UncheckableSchema

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


@FORMATS.checks("regex")
def _is_regex(value: object) -> bool:
    """An ECMA-262 regular expression, as jsonschema-rs reads one (the dialect of every `pattern` here)."""
    if not isinstance(value, str):
        return True
    # A caller's string may be megabytes: only short ones (a schema's patterns) are worth keeping.
    return _compiles(value) if len(value) <= _CACHED_PATTERN else _compiles.__wrapped__(value)


_CACHED_PATTERN = 1024
"""The longest regular expression whose verdict is kept (characters)."""


@functools.lru_cache(maxsize=1024)
def _compiles(pattern: str) -> bool:
    try:
        jsonschema_rs.validator_for({"pattern": pattern})
    except jsonschema_rs.ValidationError:
        return False
    return True


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


def check_schema(schema: dict[str, Any]) -> type[Validator]:
    """Raise `SchemaError` unless `schema` is a valid JSON Schema (its patterns ECMA-262); its validator class."""
    cls = _linear(validators.validator_for(schema, default=Draft202012Validator))
    cls.check_schema(schema, format_checker=_schema_formats(cls))  # type: ignore[call-arg]
    return cls


def compile_schema(schema: dict[str, Any], registry: Registry[Any] | None = None) -> Validator:
    """Check a JSON Schema and compile a validator for it (draft from `$schema`, else 2020-12): the
    check at load, and the wording of a violation the per-call check (`compile_checker`) found.

    `format` is asserted, not just annotated; regular expressions are ECMA-262 and run by `search`.
    Raises `SchemaError` for a schema that is not valid.
    """
    cls = check_schema(schema)
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
    where = instance_place(error.absolute_path, mask)
    text = json_message(error, mask)
    message = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
    return f"at '{where}': {message}" if where else message


def instance_place(path: Iterable[str | int], mask: Mask | None = None) -> str:
    """A place in an instance as `a/0/b`, each key masked first with `mask` (a key may be a secret)."""
    parts = [str(part) for part in path]
    if mask is not None:
        parts = [str(mask(part, tuple(parts[:index]))) for index, part in enumerate(parts)]
    return "/".join(parts)


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


def past_limits(value: Any, *, values: int | None = None, depth: int | None = None) -> str | None:
    """`"values"` when `value` holds more than `values` values (objects, arrays and their members, at any
    depth), else `"depth"` when its objects and arrays nest more than `depth` levels, else `None`. One
    walk without recursion, never past `values` values: bounded work however large the value."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    count, deep = 0, False
    while stack:
        item, level = stack.pop()
        count += 1
        if values is not None and count > values:
            return "values"
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth is not None and level + 1 > depth:
            if values is None:
                return "depth"
            deep = True  # still counted: holding too many values is said first
        stack.extend((child, level + 1) for child in children)
    return "depth" if deep else None


def holds_more_than(value: Any, limit: int) -> bool:
    """Whether `value` holds more than `limit` values (objects, arrays and their members, at any depth)."""
    return past_limits(value, values=limit) == "values"


class Matcher(Protocol):
    """Anything that says whether an instance satisfies a schema (the per-call check, `compile_checker`)."""

    def is_valid(self, instance: Any) -> bool: ...

    def first_error(self, instance: Any) -> tuple[tuple[str | int, ...], str] | None:
        """Where the instance first breaks the schema, and the keyword it breaks with the keyword's value
        (`type: ["object"]`); `None` when it does not."""
        ...


_LINEAR = jsonschema_rs.RegexOptions()
"""Every pattern of a per-call check runs on the `regex` crate's engine: linear time, no backtracking."""
_DATA_KEYWORDS = ("const", "enum", "default", "examples")
"""Keywords whose values are instances, not schemas: nothing inside them is a keyword."""


def schema_keywords(schema: Any) -> Iterator[tuple[str, Any]]:
    """Every (keyword, value) pair of a schema and of the schemas nested in it."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield key, value
            if key not in _DATA_KEYWORDS:
                yield from schema_keywords(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from schema_keywords(item)


def schema_patterns(schema: Any) -> Iterator[str]:
    """Every regular expression a schema holds: `pattern` values and `patternProperties` names."""
    for key, value in schema_keywords(schema):
        if key == "pattern" and isinstance(value, str):
            yield value
        elif key == "patternProperties" and isinstance(value, dict):
            yield from (name for name in value if isinstance(name, str))


@functools.lru_cache(maxsize=4096)
def _searcher(pattern: str) -> Callable[[Any], bool]:
    """`pattern` compiled once: JSON Schema's `pattern` keyword alone, which is a search."""
    return _Checker(jsonschema_rs.validator_for({"pattern": pattern}, pattern_options=_LINEAR).is_valid).is_valid


def pattern_problem(pattern: str) -> str | None:
    """Why the gateway cannot run `pattern` on a call (`None` when it can)."""
    try:
        _searcher(pattern)
        return None
    except jsonschema_rs.ValidationError:
        pass
    if not _is_regex(pattern):
        return "not an ECMA-262 regular expression"
    return "needs backtracking (a lookaround or a backreference), so it cannot be checked in linear time"


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches anywhere in `text`, read as JSON Schema reads it (ECMA-262, with
    jsonschema-rs) and run in linear time. Raises `UncheckableSchema` for a pattern it cannot run."""
    try:
        searcher = _searcher(pattern)
    except jsonschema_rs.ValidationError:
        raise UncheckableSchema(f"pattern {pattern!r}: {pattern_problem(pattern)}") from None
    return searcher(text)


LONE_SURROGATES = re.compile("[\ud800-\udfff]+")
"""What JSON's `\\udcff` escapes and a blob's bytes that are not UTF-8 leave in a Python string."""


class _Checker:
    """A jsonschema-rs check that also takes strings holding lone surrogates, which are not text to it:
    each is read as U+FFFD (the replacement character), in the check and in the wording of a refusal."""

    __slots__ = ("_is_valid", "_validator")

    def __init__(self, is_valid: Callable[[Any], bool], validator: Any = None) -> None:
        self._is_valid = is_valid
        self._validator = validator

    def is_valid(self, instance: Any) -> bool:
        try:
            return self._is_valid(instance)
        except UnicodeEncodeError:
            return self._is_valid(_replaced_surrogates(instance))

    def first_error(self, instance: Any) -> tuple[tuple[str | int, ...], str] | None:
        if self._validator is None:
            return None
        try:
            errors = self._validator.iter_errors(instance)
            error = next(errors, None)
        except UnicodeEncodeError:
            error = next(self._validator.iter_errors(_replaced_surrogates(instance)), None)
        if error is None:
            return None
        keyword = next((str(part) for part in reversed(error.schema_path) if isinstance(part, str)), "")
        try:  # what the schema asks there (the upstream's, not the caller's: nothing to mask)
            value = error.kind.value
            asked = "" if value is None or isinstance(value, bool) else json.dumps(value, ensure_ascii=False)
        except (AttributeError, TypeError, ValueError):
            asked = ""
        if asked:
            keyword = f"{keyword}: {asked}" if len(asked) <= _MAX_DETAIL else f"{keyword}: {asked[:_MAX_DETAIL]}..."
        return tuple(error.instance_path), keyword


def _replaced_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return LONE_SURROGATES.sub(lambda match: "\ufffd" * len(match[0]), value)
    if isinstance(value, Mapping):
        return {_replaced_surrogates(key): _replaced_surrogates(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_replaced_surrogates(item) for item in value]
    return value


def compile_checker(schema: dict[str, Any], resources: Sequence[tuple[str, Any]] = ()) -> Matcher:
    """The per-call check of `schema` (already checked by `compile_schema`): jsonschema-rs, with every
    pattern run in linear time and every `format` asserted by `FORMATS`; `resources` are the schemas its
    `$ref`s may name (nothing is fetched). Raises `UncheckableSchema` for what it cannot check so."""
    for pattern in schema_patterns(schema):
        if problem := pattern_problem(pattern):
            raise UncheckableSchema(f"pattern {pattern!r}: {problem}")
    registry = jsonschema_rs.Registry(list(resources)) if resources else None
    try:
        validator = jsonschema_rs.validator_for(
            schema,
            formats=_FORMAT_CALLS,
            validate_formats=True,
            pattern_options=_LINEAR,
            registry=registry,
            offline=True,
        )
        return _Checker(validator.is_valid, validator)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError) as exc:
        raise UncheckableSchema(str(exc).split("\n", 1)[0]) from None


def _conforms(name: str, value: Any) -> bool:
    return FORMATS.conforms(value, name)


_RS_FORMATS = (
    "date", "date-time", "duration", "email", "hostname", "idn-email", "idn-hostname", "ipv4", "ipv6", "iri",
    "iri-reference", "json-pointer", "regex", "relative-json-pointer", "time", "uri", "uri-reference",
    "uri-template", "uuid",
)  # fmt: skip
"""The formats jsonschema-rs asserts on its own."""
_FORMAT_CALLS: dict[str, Callable[..., bool]] = {
    name: functools.partial(_conforms, name) for name in {*FORMATS.checkers, *_RS_FORMATS}
}
"""`FORMATS` as jsonschema-rs takes them, so the per-call check and the wording of a refusal agree: a
format `FORMATS` cannot check is not asserted by either."""


_unique = _Checker(jsonschema_rs.validator_for({"uniqueItems": True}).is_valid).is_valid
"""Whether an array's items are distinct, by jsonschema-rs (hashing: linear), where jsonschema's own `uniq`
compares every pair of items that do not sort (objects): seconds for a few thousand."""


class _Engine:
    """Stands in for the module `re` in jsonschema's keyword functions: wording a refusal runs the
    per-call check's engine (linear time, ECMA-262), never Python's backtracking `re` on a caller's text."""

    @staticmethod
    def search(pattern: str, string: str) -> bool:
        return search(pattern, string)


def _rebound(function: Any, namespace: dict[str, Any]) -> Any:
    """`function` with its module's names looked up in `namespace` instead."""
    return types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )


_UTILS: dict[str, Any] = {**vars(jsonschema._utils), "re": _Engine}
for _name in ("find_additional_properties", "find_evaluated_property_keys_by_schema"):
    _UTILS[_name] = _rebound(getattr(jsonschema._utils, _name), _UTILS)
_KEYWORD_MODULES = {
    module.__name__: {
        **vars(module),
        "re": _Engine,
        "uniq": _unique,
        "find_additional_properties": _UTILS["find_additional_properties"],
        "find_evaluated_property_keys_by_schema": _UTILS["find_evaluated_property_keys_by_schema"],
    }
    for module in (jsonschema._keywords, jsonschema._legacy_keywords)
}


@functools.cache
def _linear(cls: type[Validator]) -> type[Validator]:
    """`cls` with every keyword that reads a regular expression (`pattern`, `patternProperties`, and
    `additionalProperties`/`unevaluatedProperties` beside them) reading it with `search`, and
    `uniqueItems` deciding in linear time."""
    keywords = {
        name: _rebound(function, _KEYWORD_MODULES[function.__module__])
        if function.__module__ in _KEYWORD_MODULES
        else function
        for name, function in cls.VALIDATORS.items()
    }
    linear: type[Validator] = validators.extend(cls, keywords)  # type: ignore[no-untyped-call]
    return linear


@functools.cache
def _schema_formats(cls: type[Validator]) -> FormatChecker:
    """The formats `check_schema` asserts for `cls`, `regex` (a `pattern`'s value) read as ECMA-262."""
    checker = FormatChecker(())
    checker.checkers = {**cls.FORMAT_CHECKER.checkers, "regex": (_is_regex, ())}
    return checker


def replace_non_finite(value: Any, replacement: Callable[[float], Any]) -> Any:
    """A JSON-like value with every NaN and infinity (which JSON cannot carry) replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return replacement(value)
    if isinstance(value, Mapping):
        return {key: replace_non_finite(item, replacement) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [replace_non_finite(item, replacement) for item in value]
    return value
