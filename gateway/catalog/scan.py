"""Scanning what a model reads in an upstream's definitions for tool poisoning: sans-IO, from data alone.

Every string a model can see in a tool, prompt or resource-template definition (descriptions,
titles, parameter names and descriptions, enum values, defaults, examples, nested schema strings)
and in a server's instructions is checked for:

- text a person reviewing the tool never sees: Unicode tag characters (U+E0000-E007F, which spell
  out hidden ASCII), zero-width characters, bidirectional overrides, ANSI escape sequences and other
  control characters, and long runs of whitespace that push text out of view;
- instructions aimed at the model rather than descriptions of the tool ("ignore previous
  instructions", "do not tell the user", `<IMPORTANT>` blocks, "before using this tool ...");
- references to secrets and credential files (`~/.ssh/id_rsa`, `.aws/credentials`, `mcp.json`, ...);
- mentions of other servers' tools (shadowing: a description that tells the model how to use
  another server's `send_email`).

A finding is `high` when it has no business in an honest definition (it quarantines the tool where
pinning is enforced), `medium` when it deserves a look. The patterns are tuned so that the
definitions of ordinary servers raise nothing high.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]


class Severity(StrEnum):
    HIGH = "high"
    MEDIUM = "medium"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    kind: str
    where: str
    """What was scanned and where in it: `tool 'x': inputSchema.properties.path.description`."""
    detail: str
    """What was found, hidden characters made visible."""

    def to_record(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}


_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u180e\u00ad]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _linear(pattern: str) -> Any:
    """`pattern`, case-insensitive, run by RE2: linear time on whatever an upstream writes. (Python's `re`
    spent a second per 200 kB of crafted description in the nested bounded repeats below.)"""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return re2.compile(pattern, options)


_PADDING = _linear("[ \t\u00a0\u3000]{40,}" r"|(?:[ \t]*\r?\n){8,}")

_INSTRUCTIONS: tuple[tuple[str, Any], ...] = tuple(
    (label, _linear(pattern))
    for label, pattern in (
        (
            "asks the model to disregard its instructions",
            r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+|the\s+|your\s+)?"
            r"(?:previous|prior|above|earlier|preceding|other|system|original)\s+"
            r"(?:instructions?|prompts?|rules|directions|guidelines)",
        ),
        (
            "asks the model to keep something from the user",
            r"\b(?:do\s+not|don'?t|never|must\s+not)\s+(?:tell|inform|mention|reveal|disclose|show|alert|notify|"
            r"let)\b[^.]{0,100}\b(?:user|human|person)|\bwithout\s+(?:telling|informing|notifying|alerting|asking)"
            r"\s+the\s+(?:user|human)|\b(?:hide|conceal)\s+(?:this|it)\s+from\s+the\s+(?:user|human)",
        ),
        ("carries a hidden-instruction block", r"<\s*/?\s*(?:important|system|instructions?|secret|hidden|admin)\s*>"),
        (
            "tells the model what to do before using the tool",
            r"\bbefore\s+(?:using|calling|invoking|executing)\s+(?:this|any|the)\s+tool\b[^.]{0,80}\b"
            r"(?:read|call|send|include|pass|fetch|open|cat|provide)\b",
        ),
        ("tries to redefine the model's role", r"\byou\s+are\s+now\b|\bnew\s+instructions?\s*:|\bsystem\s+prompt\b"),
        (
            "asks for data to be passed in a side channel",
            r"\b(?:pass|put|include|send|append|add|provide)\b[^.]{0,40}\b(?:content|contents|text|value)\s+of\b"
            r"[^.]{0,60}\b(?:as|in|into|inside)\b[^.]{0,20}\b(?:parameter|argument|field|sidenote|note)\b",
        ),
    )
)
_SECRET_FILES = re.compile(
    r"~?/?\.ssh\b|\bid_(?:rsa|dsa|ecdsa|ed25519)\b|\.aws/credentials|\.netrc\b|\.pgpass\b|\.git-credentials\b|"
    r"\.docker/config\.json|\.kube/config|/etc/(?:passwd|shadow)\b|\bmcp\.json\b|claude_desktop_config\.json|"
    r"\.npmrc\b|\.pypirc\b|(?<![\w.])\.env\b(?!\s*(?:var|variable))",
    re.IGNORECASE,
)
_SECRET_WORDS = _linear(r"\b(?:private\s+key|api[\s_-]?keys?|access\s+tokens?|passwords?|credentials|secret\s+keys?)\b")
_URGENT = _linear(r"\b(?:always|never|must|instead|whenever|important|mandatory|required\s+to|bcc|redirect|forward)\b")
_IDENTIFIER = re.compile(r"^(?=.{5,}$)(?:[a-z0-9]+(?:[_.-][a-z0-9]+)+|[a-z]+(?:[A-Z][a-z0-9]*)+)$")


def scan_definition(
    kind: str, name: str, definition: Mapping[str, Any], other_tools: Collection[str] = ()
) -> list[Finding]:
    """Findings in one definition (`kind` is tool, prompt, resource template or server); `other_tools`
    are the names (exposed and upstream) of tools other servers offer."""
    shadows = _shadows(tuple(other_tools), identifiers_only=True)
    findings: list[Finding] = []
    for path, text in model_visible_strings(definition):
        findings += _scan(text, f"{kind} '{name}': {path or '(name)'}", shadows, name)
    return findings


def scan_text(text: str, where: str, other_tools: Collection[str] = ()) -> list[Finding]:
    """Findings in one string a model will read."""
    return _scan(text, where, _shadows(tuple(other_tools), identifiers_only=False), None)


@dataclass(frozen=True, slots=True)
class _Shadows:
    names: tuple[str, ...]
    anywhere: re.Pattern[str] | None
    """Matches where any of `names` is mentioned: one search per string instead of one per name."""


@functools.lru_cache(maxsize=64)
def _shadows(names: tuple[str, ...], *, identifiers_only: bool) -> _Shadows:
    """The other servers' tool names worth looking for (cached: every definition of an upstream shares them)."""
    kept = tuple(dict.fromkeys(name for name in names if not identifiers_only or _IDENTIFIER.match(name)))
    if not kept:
        return _Shadows((), None)
    return _Shadows(kept, re.compile(rf"(?<![\w.-])(?:{'|'.join(map(re.escape, kept))})(?![\w-])"))


def _scan(text: str, where: str, shadows: _Shadows, own_name: str | None) -> list[Finding]:
    found: list[Finding] = []

    def add(severity: Severity, kind: str, detail: str) -> None:
        found.append(Finding(severity, kind, where, detail))

    for tags in _TAGS.finditer(text):
        hidden = "".join(chr(ord(char) - 0xE0000) for char in tags[0])
        add(Severity.HIGH, "hidden-text", f"Unicode tag characters spelling {hidden!r}")
    if zero_width := sorted(set(_ZERO_WIDTH.findall(text))):
        add(Severity.HIGH, "hidden-text", "zero-width characters " + ", ".join(_codepoint(c) for c in zero_width))
    if bidi := sorted(set(_BIDI.findall(text))):
        add(Severity.HIGH, "hidden-text", "bidirectional controls " + ", ".join(_codepoint(c) for c in bidi))
    if _ANSI.search(text) or _CONTROL.search(text):
        add(Severity.HIGH, "hidden-text", f"terminal escape or control characters: {visible(text)[:120]}")
    for run in _PADDING.finditer(text):
        after = text[run.end() :].strip()
        severity = Severity.HIGH if after else Severity.MEDIUM
        detail = f"{len(run[0])} characters of whitespace" + (f", then: {visible(after)[:100]!r}" if after else "")
        add(severity, "padding", detail)
    clean = _readable(text)
    for label, pattern in _INSTRUCTIONS:
        if match := pattern.search(clean):
            add(Severity.HIGH, "instructions", f"{label}: {_excerpt(clean, match)}")
    if match := _SECRET_FILES.search(clean):
        add(Severity.HIGH, "secrets", f"refers to a credential file: {_excerpt(clean, match)}")
    elif (match := _SECRET_WORDS.search(clean)) and _URGENT.search(clean):
        add(Severity.MEDIUM, "secrets", f"speaks of secrets insistently: {_excerpt(clean, match)}")
    if shadows.anywhere is None or not shadows.anywhere.search(clean):
        return found
    for tool in shadows.names:
        if tool == own_name:
            continue
        if match := re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w-])", clean):
            urgent = _URGENT.search(clean)
            severity = Severity.HIGH if urgent else Severity.MEDIUM
            add(severity, "shadowing", f"mentions another server's tool '{tool}': {_excerpt(clean, match)}")
    return found


def model_visible_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string in a definition, property names included (a model reads those)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or key in ("_meta", "icons"):
                continue
            child = f"{path}.{key}" if path else key
            if path.endswith("properties") or path.endswith("patternProperties") or path.endswith("$defs"):
                yield f"{child} (name)", key
            yield from model_visible_strings(item, child)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from model_visible_strings(item, f"{path}[{index}]")


def visible(text: str) -> str:
    """The text with everything invisible or misleading written out (`<U+200B>`, `<ESC>`, `<tags:'...'>`)."""
    text = _TAGS.sub(lambda match: "<tags:" + repr("".join(chr(ord(c) - 0xE0000) for c in match[0])) + ">", text)
    text = _ZERO_WIDTH.sub(lambda match: f"<{_codepoint(match[0])}>", text)
    text = _BIDI.sub(lambda match: f"<{_codepoint(match[0])}>", text)
    text = text.replace("\x1b", "<ESC>")
    text = _CONTROL.sub(lambda match: f"<{_codepoint(match[0])}>", text)
    return re.sub(r"[ \t]{40,}", lambda match: f"<{len(match[0])} blanks>", text)


def _readable(text: str) -> str:
    """What a model reads past the tricks: invisible characters removed, width-folded, spaces collapsed."""
    text = _TAGS.sub(lambda match: " " + "".join(chr(ord(c) - 0xE0000) for c in match[0]) + " ", text)
    text = _ZERO_WIDTH.sub("", _BIDI.sub("", _ANSI.sub("", text)))
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text))


class _Span(Protocol):
    """A match, of Python's `re` or of RE2."""

    def start(self) -> int: ...

    def end(self) -> int: ...


def _excerpt(text: str, match: _Span) -> str:
    start, end = max(0, match.start() - 30), min(len(text), match.end() + 50)
    return ("..." if start else "") + text[start:end].strip() + ("..." if end < len(text) else "")


def _codepoint(char: str) -> str:
    return f"U+{ord(char):04X}"
