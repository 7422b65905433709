"""Declared path arguments (`[[paths]]`): the arguments of a tool that name files, normalised before
any rule sees them, so a condition is written once for the path and not for each way of spelling it.

A declared path becomes absolute (a relative one joined to the declaration's `root`), with `.`, `..`,
repeated and trailing slashes resolved lexically, and the upstream receives that form, so no second
reading of the path names another file. The rules see it too; with `case = "insensitive"` they see
it case-folded in Unicode NFC, while the upstream gets its case as written (a case-insensitive file
system opens the same file, and a server that compares its allowed directories case-sensitively,
as `server-filesystem` does, still finds them). A value that cannot be normalised (not a string or
an array of strings, empty, holding a NUL or a backslash, relative with no root, or climbing above
`/`) refuses the call. Symbolic links are not seen: the normalisation reads text, never the file
system.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.errors import PolicyError
from gateway.policy.rules import tool_glob

_LAST = 0x10FFFF


class PathsSpec(BaseModel):
    """One `[[paths]]` as written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: tuple[StrictStr, ...] = Field(min_length=1)
    arguments: tuple[StrictStr, ...] = Field(min_length=1)
    root: StrictStr | None = None
    case: Literal["sensitive", "insensitive"] = "sensitive"


@dataclass(frozen=True, slots=True)
class PathDeclaration:
    """One compiled `[[paths]]`: these arguments of these tools are paths."""

    source: str
    tools: tuple[str, ...]
    tools_pattern: re.Pattern[str]
    arguments: frozenset[str]
    root: str | None
    """Normalised (not folded); relative paths are joined to it."""
    insensitive: bool

    def concerns(self, tool: str, argument: str) -> bool:
        return argument in self.arguments and self.tools_pattern.fullmatch(tool) is not None


@dataclass(frozen=True, slots=True)
class PathArguments:
    """Every `[[paths]]` of a policy set; `normalise` puts a call's declared paths in their one form."""

    declarations: tuple[PathDeclaration, ...] = ()

    def declared(self, tool: str) -> frozenset[str]:
        """The arguments of `tool` that some declaration says are paths."""
        return frozenset(
            name for found in self.declarations if found.tools_pattern.fullmatch(tool) for name in found.arguments
        )

    def normalise(self, tool: str, arguments: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
        """What the rules see and what the upstream is sent: `arguments` with every declared path
        normalised, folded in the first when its declaration says `case = "insensitive"` (each the
        same mapping when nothing changes); `ValueError` with the reason when one cannot be."""
        if not self.declarations:
            return arguments, arguments
        seen: dict[str, Any] = {}
        sent: dict[str, Any] = {}
        for key, value in arguments.items():
            declared = {(found.root, found.insensitive) for found in self.declarations if found.concerns(tool, key)}
            if not declared:
                continue
            where = f"argument '{key}' of '{tool}'"
            if len(declared) > 1:
                raise ValueError(f"{where} is declared a path by [[paths]] entries that disagree on root or case")
            ((root, insensitive),) = declared
            normalised = _normalise_value(value, root, where)
            folded = _fold_value(normalised) if insensitive else normalised
            if normalised != value:
                sent[key] = normalised
            if folded != value:
                seen[key] = folded
        return ({**arguments, **seen} if seen else arguments), ({**arguments, **sent} if sent else arguments)


def normalise_path(path: str, root: str | None) -> str:
    """One path in its one form; `ValueError` saying what is wrong with it."""
    if not path:
        raise ValueError("is empty")
    if "\0" in path:
        raise ValueError("holds a NUL character")
    if "\\" in path:  # a separator to a server on Windows: `a\..\..\x` would climb where the rules see none
        raise ValueError("holds a backslash (a separator to some servers)")
    if not path.startswith("/"):
        if root is None:
            raise ValueError(f"is relative ({path!r}) and its [[paths]] declaration has no root")
        path = f"{root}/{path}"
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError("climbs above /")
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def fold(text: str) -> str:
    """Caseless form: Unicode case folding, in NFC (so `É` composed or decomposed folds alike)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def _normalise_value(value: Any, root: str | None, where: str) -> Any:
    """A declared argument: a string, or an array of them (arrays in it too), normalised."""
    if isinstance(value, str):
        try:
            return normalise_path(value, root)
        except ValueError as exc:
            raise ValueError(f"{where} is a declared path that {exc}") from None
    if isinstance(value, list):
        return [_normalise_value(item, root, f"{where} item {index}") for index, item in enumerate(value)]
    raise ValueError(f"{where} is a declared path but is not a string or an array of strings")


def _fold_value(value: Any) -> Any:
    return fold(value) if isinstance(value, str) else [_fold_value(item) for item in value]


def declare_paths(spec: PathsSpec, source: str, where: str) -> PathDeclaration:
    """One `[[paths]]` compiled; `PolicyError` with one line naming `where` and the key."""
    for key in ("tools", "arguments"):
        if any(not text.strip() for text in getattr(spec, key)):
            raise PolicyError(f"{where}: {key}: empty entry")
    insensitive = spec.case == "insensitive"
    root = None
    if spec.root is not None:
        if not spec.root.startswith("/"):
            raise PolicyError(f"{where}: root: must be an absolute path, got {spec.root!r}")
        try:
            root = normalise_path(spec.root, None)
        except ValueError as exc:
            raise PolicyError(f"{where}: root: {spec.root!r} {exc}") from None
    pattern = re.compile("|".join(tool_glob(glob) for glob in spec.tools))
    return PathDeclaration(source, spec.tools, pattern, frozenset(spec.arguments), root, insensitive)


def check_conflicts(declarations: list[PathDeclaration], labels: Mapping[str, str]) -> None:
    """Two declarations that can both name one argument of one tool must agree on root and case."""
    for index, first in enumerate(declarations):
        for second in declarations[index + 1 :]:
            if (first.root, first.insensitive) == (second.root, second.insensitive):
                continue
            shared = sorted(first.arguments & second.arguments)
            if not shared:
                continue
            pairs = [(a, b) for a in first.tools for b in second.tools if globs_overlap(a, b)]
            if pairs:
                a, b = pairs[0]
                raise PolicyError(
                    f"{labels[second.source]}: paths: argument {shared[0]!r} of tools {b!r} is also declared "
                    f"by {first.source} (tools {a!r}) with a different root or case; declare it once"
                )


# -- whether two globs can match one name -------------------------------------------------------

_STAR = None
_Token = tuple[tuple[int, int], ...] | None
"""`*` (None), or the characters one position accepts, as sorted, disjoint code point ranges."""


def globs_overlap(first: str, second: str) -> bool:
    """Whether some name matches both fnmatch globs (their product automaton reaches its end)."""
    a, b = _tokens(first), _tokens(second)
    pending, seen = [(0, 0)], {(0, 0)}
    while pending:
        i, j = pending.pop()
        if i == len(a) and j == len(b):
            return True
        steps = []
        if i < len(a) and a[i] is _STAR:
            steps.append((i + 1, j))
            if j < len(b) and b[j] is not _STAR:
                steps.append((i, j + 1))
        if j < len(b) and b[j] is _STAR:
            steps.append((i, j + 1))
            if i < len(a) and a[i] is not _STAR:
                steps.append((i + 1, j))
        if i < len(a) and j < len(b):
            left, right = a[i], b[j]
            if left is not None and right is not None and _meet(left, right):
                steps.append((i + 1, j + 1))
        for step in steps:
            if step not in seen:
                seen.add(step)
                pending.append(step)
    return False


def _tokens(glob: str) -> list[_Token]:
    """A glob read as fnmatch reads it: `*`, `?`, `[...]`/`[!...]` (a `[` never closed is literal)."""
    tokens: list[_Token] = []
    index = 0
    while index < len(glob):
        char = glob[index]
        index += 1
        if char == "*":
            if not tokens or tokens[-1] is not _STAR:
                tokens.append(_STAR)
        elif char == "?":
            tokens.append(((0, _LAST),))
        elif char == "[":
            end = index + (glob[index : index + 1] == "!")
            end += glob[end : end + 1] == "]"
            end = glob.find("]", end)
            if end < 0:
                tokens.append(((ord("["), ord("[")),))
                continue
            body, index = glob[index:end], end + 1
            negated = body.startswith("!")
            tokens.append(_class(body[1:] if negated else body, negated))
        else:
            tokens.append(((ord(char), ord(char)),))
    return tokens


def _class(body: str, negated: bool) -> tuple[tuple[int, int], ...]:
    ranges = []
    index = 0
    while index < len(body):
        if index + 2 < len(body) and body[index + 1] == "-":
            low, high = ord(body[index]), ord(body[index + 2])
            index += 3
            if low <= high:
                ranges.append((low, high))
        else:
            ranges.append((ord(body[index]), ord(body[index])))
            index += 1
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    if not negated:
        return tuple(merged)
    gaps, start = [], 0
    for low, high in merged:
        if low > start:
            gaps.append((start, low - 1))
        start = high + 1
    if start <= _LAST:
        gaps.append((start, _LAST))
    return tuple(gaps)


def _meet(first: tuple[tuple[int, int], ...], second: tuple[tuple[int, int], ...]) -> bool:
    return any(low <= other_high and other_low <= high for low, high in first for other_low, other_high in second)
