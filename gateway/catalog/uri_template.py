"""RFC 6570 URI templates, as far as routing a `resources/read` needs them: parse, then match a URI.

A template is checked when an upstream lists it (a malformed one is dropped with a note), and
compiled into one regular expression. Matching answers "could this upstream have made this URI":
a simple `{name}` stays within one path segment, `{+path}` and `{#frag}` take anything, the
`.` `/` `;` operators take their own separated pieces, and a `{?...}` / `{&...}` tail accepts any
query. The value of a lone simple or reserved variable (`{name}`, `{+path}`) is extracted, decoded,
for the policy to see (`variables`); the upstream that owns the URI reads the rest. The expression
runs on RE2, in linear time: the upstream writes the template and the agent the URI, and with Python's
`re` `x://{+a}{+b}{+c}{+d}Z` took 36 s of the event loop to refuse a 400-character URI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import re2  # type: ignore[import-untyped]

from gateway.errors import InvalidUriTemplate

MAX_LENGTH = 1024
MAX_VARIABLES = 64
_VARIABLE = re.compile(r"^(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*$")
_SEGMENT = r"[^/?#]*"
_PIECE = {".": r"[^/?#.]*", "/": r"[^/?#]*", ";": r"[^/?#;]*"}
_EXPLODED = {".": r"(?:\.[^/?#]*)*", "/": r"(?:/[^/?#]*)*", ";": r"(?:;[^/?#]*)*"}
_QUERY = r"(?:[?&][^#]*)?"
_RE2 = re2.Options()
_RE2.dot_nl = True
_RE2.log_errors = False


@dataclass(frozen=True, slots=True)
class UriTemplate:
    template: str
    pattern: Any
    """The template as one RE2 expression (`fullmatch`, groups `v0`, `v1`, ...)."""
    captured: tuple[str, ...] = ()
    """The variables whose values `variables` extracts, in the order of their groups (`v0`, `v1`, ...)."""

    @classmethod
    def parse(cls, template: str) -> UriTemplate:
        if len(template) > MAX_LENGTH:
            raise InvalidUriTemplate(f"template longer than {MAX_LENGTH} characters")
        regex: list[str] = []
        names: set[str] = set()
        captured: list[str] = []
        position = 0
        while position < len(template):
            opening = template.find("{", position)
            literal = template[position : len(template) if opening == -1 else opening]
            if "}" in literal:
                raise InvalidUriTemplate(f"'}}' without '{{' at position {position + literal.index('}')}")
            regex.append(re.escape(literal))
            if opening == -1:
                break
            closing = template.find("}", opening)
            if closing == -1:
                raise InvalidUriTemplate(f"unclosed expression at position {opening}")
            body = template[opening + 1 : closing]
            expression = _expression(body, opening, names)
            lone = body.removeprefix("+")  # a simple or reserved expansion of one variable, no prefix, no explode
            if lone and lone[0] not in "#./;?&" and not any(mark in lone for mark in ",:*"):
                expression = f"(?P<v{len(captured)}>{expression})"
                captured.append(lone)
            regex.append(expression)
            position = closing + 1
        try:
            pattern = re2.compile("".join(regex), _RE2)
        except re2.error as exc:
            raise InvalidUriTemplate(f"too complex to match ({exc})") from None
        return cls(template, pattern, tuple(captured))

    def match(self, uri: str) -> bool:
        return self._found(uri) is not None

    def _found(self, uri: str) -> Any:
        if len(uri) > 4 * MAX_LENGTH:
            return None
        try:
            return self.pattern.fullmatch(uri)
        except UnicodeEncodeError:  # a lone surrogate: no upstream made this URI
            return None

    def variables(self, uri: str) -> dict[str, str] | None:
        """The decoded values of the lone variables in `uri`; `None` when the template does not match."""
        found = self._found(uri)
        if found is None:
            return None
        return {name: unquote(found[f"v{index}"]) for index, name in enumerate(self.captured)}

    def expand(self, values: Mapping[str, str]) -> str:
        """The URI these values make: a lone `{name}` percent-encoded, a lone `{+name}` with reserved
        characters kept (RFC 6570 levels 1 and 2); any other expression, or a variable without a value,
        expands to nothing."""

        def one(found: re.Match[str]) -> str:
            body = found[1]
            name = body.removeprefix("+")
            if name not in values or not name or name[0] in "#./;?&" or any(mark in name for mark in ",:*"):
                return ""
            return quote(values[name], safe=_RESERVED if body.startswith("+") else "")

        return _EXPRESSION.sub(one, self.template)


_EXPRESSION = re.compile(r"\{([^}]*)\}")
_RESERVED = ":/?#[]@!$&'()*+,;=%"


def _expression(body: str, position: int, names: set[str]) -> str:
    """The regular expression for one `{...}` (its body without braces)."""
    if not body:
        raise InvalidUriTemplate(f"empty expression at position {position}")
    operator = body[0] if body[0] in "+#./;?&" else ""
    if body[0] in "=,!@|":
        raise InvalidUriTemplate(f"reserved operator '{body[0]}' at position {position}")
    specs = body[len(operator) :].split(",")
    exploded = False
    for spec in specs:
        name, _, prefix = spec.partition(":")
        explode = name.endswith("*") and not prefix
        name = name.removesuffix("*") if explode else name
        if not _VARIABLE.match(name):
            raise InvalidUriTemplate(f"invalid variable name {name!r} at position {position}")
        if prefix and not (prefix.isdigit() and 0 < int(prefix) < 10000):
            raise InvalidUriTemplate(f"invalid prefix length {prefix!r} at position {position}")
        if name in names:
            raise InvalidUriTemplate(f"variable {name!r} appears more than once")
        names.add(name)
        exploded = exploded or explode
    if len(names) > MAX_VARIABLES:
        raise InvalidUriTemplate(f"more than {MAX_VARIABLES} variables")
    if operator in ("?", "&"):
        return _QUERY
    if operator == "+":
        return ".*"
    if operator == "":
        return _SEGMENT
    if operator == "#":
        return "(?:#.*)?"
    if exploded:
        return _EXPLODED[operator]
    lead = re.escape(operator)
    return f"(?:{lead}{_PIECE[operator]}){{0,{len(specs)}}}"
