"""The per-call check (jsonschema-rs) gives the same verdict as the jsonschema validator on every case here;
violations are described in JSON's spelling."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, best_match

from gateway.catalog.listing import normalise_listing
from gateway.errors import UncheckableSchema
from gateway.schema import FORMATS, compile_checker, compile_schema, describe_violation

SCHEMAS: list[dict[str, Any]] = [
    {"type": "integer"},
    {"type": ["string", "null"]},
    {"type": "number", "minimum": 1, "exclusiveMaximum": 10},
    {"type": "object", "required": ["path"], "properties": {"path": {"type": "string", "pattern": "^/srv/"}}},
    {"properties": {"path": {"pattern": "(^|/)\\.\\.(/|$)"}}},
    {"properties": {"a": {"enum": [1, "1", True, None, [1, 2], {"k": 1}]}}},
    {"properties": {"a": {"const": 0}}},
    {"properties": {"a": {"const": False}}},
    {"properties": {"n": {"type": "integer", "maximum": 100}, "tags": {"type": "array", "maxItems": 2}}},
    {"properties": {"s": {"minLength": 2, "maxLength": 3}}},
    {"properties": {"files": {"type": "array", "contains": {"pattern": "\\.env$"}}}},
    {"properties": {"files": {"items": {"type": "string"}, "minItems": 1}}},
    {"additionalProperties": False, "properties": {"a": {}}},
    {"additionalProperties": {"type": "integer"}},
    {"not": {"required": ["debug"]}},
    {"anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
    {"oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    {"allOf": [{"required": ["a"]}, {"properties": {"a": {"type": "integer"}}}]},
    {"properties": {"day": {"format": "date"}, "at": {"format": "date-time"}, "ip": {"format": "ipv4"}}},
    {"title": "annotations only", "description": "x", "default": 1},
    {"properties": {"x": True, "y": False}},
    {"patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
    {"if": {"required": ["a"]}, "then": {"required": ["b"]}, "else": {"required": ["s"]}},
    {"properties": {"a": {"multipleOf": 2}, "n": {"multipleOf": 5}}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "dependencies": {"a": ["b"]}},
    {"properties": {"a": {"prefixItems": [{"type": "integer"}], "items": False}}},
    {"properties": {"a": {"uniqueItems": True}, "tags": {"uniqueItems": True}}},
    {"propertyNames": {"pattern": "^[a-z]+$", "maxLength": 4}},
    {"dependentRequired": {"a": ["debug"]}, "minProperties": 1, "maxProperties": 2},
    {"properties": {"files": {"contains": {"type": "string"}, "minContains": 2}}},
    {"$defs": {"p": {"type": "string", "pattern": "^/srv/"}}, "properties": {"path": {"$ref": "#/$defs/p"}}},
    {"properties": {"at": {"format": "date-time"}, "host": {"format": "hostname"}, "to": {"format": "uri"}}},
    {"properties": {"a": {"type": "object", "unevaluatedProperties": False, "properties": {"k": {}}}}},
    {"properties": {"d": {"format": "duration"}, "j": {"format": "json-pointer"}, "u": {"format": "uuid"}}},
]
INSTANCES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    1.0,
    1.5,
    10,
    "1",
    "",
    "ab",
    "abcd",
    "/srv/x",
    "../x",
    [],
    [1, 2],
    [1, 2, 3],
    ["a", ".env"],
    {},
    {"a": 1},
    {"a": True},
    {"a": 1.0},
    {"a": "1"},
    {"a": [1, 2]},
    {"a": [1.0, 2]},
    {"a": {"k": 1}},
    {"a": {"k": True}},
    {"a": 0},
    {"a": False},
    {"b": 2},
    {"a": 1, "b": 2},
    {"a": 1, "debug": True},
    {"path": "/srv/project"},
    {"path": "/etc/passwd"},
    {"path": "a/../b"},
    {"path": 5},
    {"n": 100},
    {"n": 101},
    {"n": "10"},
    {"n": 10.0},
    {"n": True},
    {"tags": [1, 2, 3]},
    {"s": "ab"},
    {"s": "abcd"},
    {"s": "äö"},
    {"files": []},
    {"files": ["a.py", "conf/.env"]},
    {"files": [1]},
    {"day": "2026-11-23", "at": "2026-11-23T10:00:00Z", "ip": "127.0.0.1"},
    {"day": "2026-02-30"},
    {"at": "2026-11-23 10:00"},
    {"ip": "999.1.1.1"},
    {"x": 1},
    {"y": 1},
    {"x": 1.5, "xy": 2},
    {"z": 1},
    {"a": [1, "x"]},
    {"a": [1]},
    {"a": 4, "n": 15.0},
    {"a": 3},
    {"a": [1, 1.0]},
    {"tags": [{"k": 1}, {"k": 1.0}]},
    {"abcde": 1},
    {"a": 1, "debug": True, "x": 2},
    {"files": ["a", "b"]},
    {"at": "2026-11-23T10:00:00+01:00", "host": "example.com", "to": "https://example.com/x"},
    {"at": "2026-11-23T25:00:00Z"},
    {"host": "-bad-.com"},
    {"host": "a" * 64},
    {"to": "no scheme"},
    {"a": {"k": 1, "l": 2}},
    {"d": "soon", "j": "no/pointer", "u": "not-a-uuid"},
    {"u": "12345678-1234-5678-1234-567812345678"},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=[str(index) for index in range(len(SCHEMAS))])
def test_the_per_call_check_agrees_with_jsonschema(schema: dict[str, Any]) -> None:
    """jsonschema-rs, the wording validator and jsonschema as shipped give one verdict on every instance."""
    checker = compile_checker(schema)
    wording = compile_schema(schema)
    stock = validators.validator_for(schema, default=Draft202012Validator)(schema, format_checker=FORMATS)
    for instance in INSTANCES:
        assert checker.is_valid(instance) == stock.is_valid(instance) == wording.is_valid(instance), instance


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"$ref": "other.json"}, "other.json"),
        ({"properties": {"a": {"pattern": "^(\\w+)\\1$"}}}, "cannot be checked in linear time"),
        ({"patternProperties": {"^(?!x)": {}}}, "cannot be checked in linear time"),
    ],
)
def test_what_cannot_be_checked_in_linear_time_is_said(schema: dict[str, Any], problem: str) -> None:
    compile_schema(schema)  # a valid schema
    with pytest.raises(UncheckableSchema, match=problem.replace("(", ".")):
        compile_checker(schema)


MESSAGES = [
    pytest.param({"type": "number"}, None, "at 'a': null is not of type 'number'", id="null"),
    pytest.param({"type": "string"}, True, "at 'a': true is not of type 'string'", id="true"),
    pytest.param({"type": "integer"}, "1", "at 'a': \"1\" is not of type 'integer'", id="string"),
    pytest.param({"type": "string"}, {"k": None}, "at 'a': {\"k\": null} is not of type 'string'", id="object"),
    pytest.param({"enum": ["x", None, False]}, "y", 'at \'a\': "y" is not one of ["x", null, false]', id="enum"),
    pytest.param({"const": None}, 0, "at 'a': null was expected", id="const"),
    pytest.param(
        {"not": {"type": "string"}}, "y", 'at \'a\': "y" should not be valid under {"type": "string"}', id="not"
    ),
    pytest.param({"pattern": "^z"}, "y", "at 'a': \"y\" does not match '^z'", id="pattern"),
    pytest.param({"minimum": 2}, 1.5, "at 'a': 1.5 is less than the minimum of 2", id="number"),
]


@pytest.mark.parametrize(("schema", "value", "message"), MESSAGES)
def test_violations_quote_values_as_json(schema: dict[str, Any], value: Any, message: str) -> None:
    validator = compile_schema({"type": "object", "properties": {"a": schema}})
    error = best_match(validator.iter_errors({"a": value}))
    assert error is not None
    assert describe_violation(error) == message


def test_schema_errors_quote_values_as_json() -> None:
    with pytest.raises(SchemaError) as raised:
        compile_schema({"properties": {"a": {"type": None}}})
    assert (
        describe_violation(raised.value) == "at 'properties/a/type': null is not valid under any of the given schemas"
    )


def test_arguments_the_check_cannot_read_are_refused_and_lone_surrogates_read_as_replacement() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x.$"}}}
    (tool,) = normalise_listing("up", [{"name": "t", "inputSchema": schema}]).tools
    assert tool.violation({1: "x"}) == "the arguments cannot be checked (ValueError)"
    assert tool.violation({"a": "x\udcff"}) is None
    assert tool.violation({"a": "y\udcff"}) == "at 'a': \"y\udcff\" does not match '^x.$'"
