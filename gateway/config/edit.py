"""Editing `upstreams.toml` from the command line (`upstream add/remove`, `import`), comments kept.

An edit is made to the text: a new upstream is appended as a `[upstreams.NAME]` table (values written
by `tomli-w`), a removed one is cut out with its subtables and the comment lines directly above it.
The edited text is then parsed and compared with the intended data; only if it matches exactly is
it used. Where it does not (an upstream written as an inline table or with dotted keys, say), the
whole file is rewritten by `tomli-w` from the intended data instead, which loses its comments, and
the edit says so. Either way the result is checked as a configuration before it is written.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from gateway.config.models import Config, parse_config
from gateway.errors import ConfigError


@dataclass(frozen=True)
class Edit:
    """The file as it would be after an edit, and whether its comments survived."""

    file: ConfigText
    comments_kept: bool

    @property
    def text(self) -> str:
        return self.file.text


@dataclass(frozen=True)
class ConfigText:
    """`upstreams.toml` as written: its text and the data it parses to (no interpolation)."""

    path: Path
    text: str
    data: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> ConfigText:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: file not found (create one with `mcp-armor init`, or pass --config PATH)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot be read: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls(path, text, data)

    @classmethod
    def of(cls, path: Path, text: str) -> ConfigText:
        """Text this command wrote itself (a starter file), parsed."""
        return cls(path, text, tomllib.loads(text))

    @property
    def upstreams(self) -> dict[str, Any]:
        tables = self.data.get("upstreams", {})
        return tables if isinstance(tables, dict) else {}

    def adding(self, tables: Mapping[str, Mapping[str, Any]]) -> Edit:
        """The file with these upstream tables added at its end."""
        intended = copy.deepcopy(self.data)
        intended.setdefault("upstreams", {}).update(copy.deepcopy(dict(tables)))
        blocks = "\n".join(upstream_table(name, table) for name, table in tables.items())
        head = self.text.rstrip()
        return self._settle(f"{head}\n\n{blocks}" if head else blocks, intended)

    def removing(self, name: str) -> Edit:
        """The file without `[upstreams.NAME]` (and its subtables and the comment directly above it)."""
        intended = copy.deepcopy(self.data)
        del intended["upstreams"][name]
        if not intended["upstreams"]:
            del intended["upstreams"]
        return self._settle(_cut_table(self.text, name), intended)

    def _settle(self, text: str, intended: dict[str, Any]) -> Edit:
        try:
            if _without_empty_upstreams(tomllib.loads(text)) == intended:
                return Edit(ConfigText(self.path, text, intended), comments_kept=True)
        except tomllib.TOMLDecodeError:
            pass
        rewritten = ConfigText(self.path, tomli_w.dumps(intended), intended)
        return Edit(rewritten, comments_kept="#" not in self.text)

    def check(self) -> Config:
        """Validate this content as a configuration, with placeholders for `[gateway]` variables this shell
        lacks (an upstream whose variable it lacks is read as unavailable)."""
        return parse_config(
            self.data, self.path.resolve(), label=str(self.path), environ=os.environ, stand_in="placeholder"
        )


def upstream_table(name: str, table: Mapping[str, Any]) -> str:
    """`[upstreams.NAME]` with one line per key: arguments on one line, `env`/`headers` inline."""
    lines = [f"[upstreams.{toml_key(name)}]"]
    lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def toml_key(key: str) -> str:
    """A key as TOML writes it: bare if it can be, quoted otherwise."""
    return tomli_w.dumps({key: 0}).rpartition(" = ")[0]


def toml_value(value: Any) -> str:
    """A value on one line: strings escaped by `tomli-w`, arrays and tables inline."""
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{toml_key(key)} = {toml_value(item)}" for key, item in value.items())
        return f"{{ {pairs} }}" if pairs else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


_ANY_HEADER = re.compile(r"^[ \t]*\[")


def _cut_table(text: str, name: str) -> str:
    quoted = re.escape(name)
    own = re.compile(rf"""^[ \t]*\[[ \t]*upstreams[ \t]*\.[ \t]*(?:{quoted}|"{quoted}"|'{quoted}')[ \t]*[\].]""")
    kept: list[str] = []
    dropped: list[str] = []
    for line in text.splitlines(keepends=True):
        if _ANY_HEADER.match(line):
            # Comment lines directly above a header belong to that header's table.
            if own.match(line):
                if not dropped:
                    attached = _comment_block(kept)
                    if attached < len(kept) and attached:  # a comment that opens the file is the file's
                        del kept[attached:]
                dropped.append(line)
                continue
            if dropped:
                kept += dropped[_comment_block(dropped) :]
                dropped = []
        (dropped if dropped else kept).append(line)
    return re.sub(r"\n{3,}", "\n\n", "".join(kept)).lstrip("\n")


def _comment_block(lines: list[str]) -> int:
    """Where the run of comment lines at the end of `lines` starts."""
    start = len(lines)
    while start and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


def _without_empty_upstreams(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("upstreams") == {}:
        del data["upstreams"]
    return data
