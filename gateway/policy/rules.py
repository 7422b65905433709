"""Compiled policy rules: one `[[rule]]` as the engine reads it, and the rules that concern one tool.

Built by `policy/files.py` at load time, read by the engine; plain data, no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import re2  # type: ignore[import-untyped]

from gateway.calls import Effect, Who
from gateway.schema import LONE_SURROGATES, Matcher

RESOURCE_PREFIX = "resource:"
"""The engine knows a resource read by `resource:` and its URI (`rules.resources` globs match the URI)."""
PROMPT_PREFIX = "prompt:"
"""The engine knows a prompt by `prompt:` and its exposed name (`rules.prompts` globs match the name)."""
UPSTREAM_PREFIXES = {"sampling/createMessage": "sampling:", "elicitation/create": "elicitation:"}
"""An upstream's own request, by `sampling:` or `elicitation:` and the upstream's name (`rules.sampling`,
`rules.elicitation` globs match the name)."""


def tool_glob(glob: str) -> str:
    """The regex for one glob over exposed tool names, which never hold a colon (so `*` names no
    `resource:URI`, `prompt:NAME`, ...)."""
    return f"(?=[^:]*$)(?:{fnmatch.translate(glob)})"


_RE2 = re2.Options()
_RE2.log_errors = False  # a pattern RE2 refuses is reported once, as a PolicyError


class RedactPattern:
    """One `redact` pattern of a result rule, in RE2's syntax and run by RE2: every match is masked in
    linear time, whatever text the upstream returns. Raises `ValueError` for a pattern RE2 cannot take
    (a lookaround or a backreference among them)."""

    __slots__ = ("_regexp", "pattern")

    def __init__(self, pattern: str) -> None:
        try:
            self._regexp = re2.compile(pattern, _RE2)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise ValueError(
                f"invalid regular expression (RE2 syntax, run in linear time: no lookarounds or backreferences): "
                f"{reason}"
            ) from None
        self.pattern = pattern

    def sub(self, replacement: str, text: str) -> str:
        """`text` with every match of the pattern replaced by `replacement` (taken literally). A lone
        surrogate (a byte of a blob that is not UTF-8, kept as an escape) is not text to RE2: a match
        ends there."""
        if not LONE_SURROGATES.search(text):
            return str(self._regexp.sub(lambda _: replacement, text))
        kept = iter(LONE_SURROGATES.findall(text))
        parts = [str(self._regexp.sub(lambda _: replacement, part)) for part in LONE_SURROGATES.split(text)]
        return "".join(part + next(kept, "") for part in parts)

    def __repr__(self) -> str:
        return f"RedactPattern({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedactPattern) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` calls per `period` seconds, per principal (per session for a caller without one)."""

    limit: int
    period: float
    text: str


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled `[[rule]]`."""

    id: str
    source: str
    """The policy file it came from."""
    tools: tuple[str, ...]
    tools_pattern: re.Pattern[str] = field(repr=False)
    effect: Effect | None
    """The effect of a call rule, or `deny` for a result rule that withholds; `None` for a redacting one."""
    clients: tuple[str, ...] | None = None
    """Globs over what the client says it is (a self-description, not identity)."""
    clients_pattern: re.Pattern[str] | None = field(default=None, repr=False)
    principals: tuple[str, ...] | None = None
    """Globs over the authenticated principal's name; a caller without one matches none."""
    principals_pattern: re.Pattern[str] | None = field(default=None, repr=False)
    attributes: tuple[str, ...] | None = None
    """Globs over the principal's attributes; a caller holding any that matches is concerned."""
    attributes_pattern: re.Pattern[str] | None = field(default=None, repr=False)
    when: Matcher | None = field(default=None, repr=False)
    when_schema: Mapping[str, Any] | None = field(default=None, repr=False)
    reason: str = ""
    monitor: bool = False
    rate: Rate | None = None
    patch: Mapping[str, Any] | None = None
    on_result: bool = False
    redact: tuple[RedactPattern, ...] = ()
    mask: tuple[tuple[str, ...], ...] = ()
    """Argument paths the audit log stores masked (for every call of the rule's tools)."""
    resources: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    sampling: tuple[str, ...] = ()
    elicitation: tuple[str, ...] = ()

    def concerns(self, tool: str) -> bool:
        return self.tools_pattern.fullmatch(tool) is not None

    @property
    def for_every_caller(self) -> bool:
        """No `clients`, `principals` or `attributes`: the rule concerns whoever calls."""
        return self.clients is None and self.principals is None and self.attributes is None

    def applies_to(self, who: Who) -> bool:
        return self.unmet_by(who) is None

    def unmet_by(self, who: Who) -> str | None:
        """The key (`clients`, `principals`, `attributes`) whose globs `who` does not match; `None`
        when the rule concerns it (every key given matches)."""
        if self.clients_pattern is not None and self.clients_pattern.fullmatch(who.client) is None:
            return "clients"
        if self.principals_pattern is not None and (
            not who.principal or self.principals_pattern.fullmatch(who.principal) is None
        ):
            return "principals"
        attributes = self.attributes_pattern
        if attributes is not None and not any(attributes.fullmatch(held) for held in who.attributes):
            return "attributes"
        return None


@dataclass(frozen=True, slots=True)
class ToolRules:
    """The rules that can concern one exposed tool, in policy order."""

    call: tuple[Rule, ...] = ()
    result: tuple[Rule, ...] = ()
    mask: tuple[tuple[str, ...], ...] = ()
    """Argument paths to mask in the audit log, from every rule naming the tool."""
