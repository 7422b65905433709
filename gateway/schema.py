"""JSON helpers shared by the catalogue and the policy engine: canonical form, digests, compiled schemas.

Free of MCP and of I/O, so the sans-IO policy engine can use them.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, validators
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


def canonical_json(value: Any) -> bytes:
    """A canonical JSON form (sorted keys, no insignificant whitespace) for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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


def describe_violation(error: SchemaViolation) -> str:
    """One line naming where in the instance the schema was violated, and how."""
    where = "/".join(str(part) for part in error.absolute_path)
    message = error.message if len(error.message) <= _MAX_DETAIL else error.message[:_MAX_DETAIL] + "..."
    return f"at '{where}': {message}" if where else message
