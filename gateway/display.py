"""How a call is shown to a person asked to approve it: every argument by name, those naming files first,
long values shortened in the middle with their size and digest, and nothing in a value able to draw a
line of its own or hide what follows (control, bidi and zero-width characters are written as escapes).

Pure and free of I/O: the approval prompt uses it, and so can anything else that shows a call.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Collection, Mapping
from typing import Any

PATH_WORDS = frozenset(
    {
        "path",
        "file",
        "filename",
        "filepath",
        "pathname",
        "destination",
        "dest",
        "source",
        "src",
        "target",
        "dir",
        "dirname",
        "directory",
        "folder",
        "root",
        "uri",
        "url",
        "cwd",
    }
)
"""Words that make an argument's name path-like (`path`, `filePath`, `source_dir`, `paths`)."""

BUDGET = 4000
"""Characters the arguments of a prompt aim to fit in: values are shortened to fit, keys never are."""

_FIRST_CUT = 2000
_LAST_CUT = 16
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_BARE = re.compile(r"[\x20-\x7e]*")
_SIMPLE = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Control, format (bidi overrides, zero-width), surrogate, private, unassigned, line and paragraph separators."""


def path_like(name: str) -> bool:
    """Whether an argument's name says it names a file or a location (`path`, `filePath`, `source_dir`)."""
    for word in _WORD.findall(name):
        word = word.lower()
        if word in PATH_WORDS or (word.endswith("s") and word[:-1] in PATH_WORDS):
            return True
        if word.endswith("ies") and word[:-3] + "y" in PATH_WORDS:
            return True
    return False


def escape(text: str, *, quotes: bool = True, ascii_only: bool = False) -> str:
    """`text` with every character that could draw a line, reorder or hide text written as an escape
    (`\\n`, `\\u202e`); `quotes`: `"` and `\\` too (text shown between quotes); `ascii_only`: every
    character past ASCII as well (a name, where a look-alike letter could pass for another)."""
    if _BARE.fullmatch(text) and (not quotes or ('"' not in text and "\\" not in text)):
        return text
    out: list[str] = []
    for char in text:
        if char in _SIMPLE and (quotes or char not in '\\"'):
            out.append(_SIMPLE[char])
        elif (ascii_only and ord(char) > 0x7E) or unicodedata.category(char) in _HIDDEN:
            code = ord(char)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def show_arguments(arguments: Mapping[str, Any], *, paths: Collection[str] = (), budget: int = BUDGET) -> str:
    """The arguments, one `"name": value` line each (nested objects and arrays indented beneath), path-like
    ones first (`paths`: the names declared to be paths, besides those `path_like` finds). Values are
    shortened in the middle until the whole fits `budget`, down to a floor: keys are never left out."""
    cut = _FIRST_CUT
    while True:
        lines: list[str] = []
        _object(arguments, paths, cut, 0, lines)
        text = "\n".join(lines) if lines else "(none)"
        if len(text) <= budget or cut <= _LAST_CUT:
            return text
        cut //= 2


def approval_prompt(
    *,
    tool: str,
    upstream_tool: str,
    upstream: str,
    reason: str,
    arguments: Mapping[str, Any],
    paths: Collection[str],
    binding: str,
    call_id: str,
    expires: str,
) -> str:
    """What a person is asked: the call (as the upstream will receive it), why policy asks, and the
    digest the approval is bound to."""
    return (
        f"The agent wants to call '{escape(tool, quotes=False)}' (tool '{escape(upstream_tool, quotes=False)}' "
        f"of upstream '{escape(upstream, quotes=False)}'). Policy: {escape(reason, quotes=False)}.\n\n"
        f"Arguments:\n{show_arguments(arguments, paths=paths)}\n\n"
        f"Approve this exact call? (call {call_id}; approval bound to sha256 {binding}; expires in {expires})"
    )


def _ordered(mapping: Mapping[str, Any], paths: Collection[str]) -> list[tuple[str, Any]]:
    items = sorted(mapping.items(), key=lambda item: str(item[0]))
    return sorted(items, key=lambda item: not (item[0] in paths or path_like(str(item[0]))))


def _object(mapping: Mapping[str, Any], paths: Collection[str], cut: int, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for key, value in _ordered(mapping, paths):
        name = f'"{escape(str(key), ascii_only=True)}"'
        _entry(f"{indent}{name}:", value, paths, cut, depth, lines)


def _entry(head: str, value: Any, paths: Collection[str], cut: int, depth: int, lines: list[str]) -> None:
    if isinstance(value, Mapping) and value:
        lines.append(f"{head} object of {len(value)} key{'s' if len(value) != 1 else ''}")
        _object(value, paths, cut, depth + 1, lines)
    elif isinstance(value, list | tuple) and value:
        lines.append(f"{head} array of {len(value)} item{'s' if len(value) != 1 else ''}")
        indent = "  " * (depth + 1)
        for index, item in enumerate(value):
            _entry(f"{indent}[{index}]:", item, paths, cut, depth + 1, lines)
    else:
        lines.append(f"{head} {_scalar(value, cut)}")


def _scalar(value: Any, cut: int) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    quote = '"' if isinstance(value, str) else ""
    if len(text) <= cut:
        return f"{quote}{escape(text) if quote else text}{quote}"
    half = cut // 2
    data = text.encode("utf-8", "surrogatepass")
    sha = hashlib.sha256(data).hexdigest()[:16]
    head, tail = escape(text[:half]), escape(text[-half:])
    return (
        f"{quote}{head}{quote} ... {quote}{tail}{quote} "
        f"[{len(text):,} characters, {len(text) - 2 * half:,} left out in the middle; sha256 {sha}]"
    )
