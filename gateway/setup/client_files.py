"""Reading and writing an agent client's MCP configuration file: JSON, or JSON with comments (VS Code).

An edit changes only the entries it is about; every other key of the file is kept as it was, and
the file is written back in its own indentation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ClientFileError
from gateway.setup.clients import ClientFormat


@dataclass
class ClientFile:
    """A client's configuration file: its data, and what is needed to write it back in its own style."""

    client: ClientFormat
    path: Path
    text: str | None
    """The file as read; `None` if it does not exist yet."""
    data: dict[str, Any]
    indent: str = "  "
    comments: bool = False
    """The file had comments (JSON with comments); they cannot be kept when it is rewritten."""
    project_dir: Path | None = None
    """For Claude Code's `~/.claude.json`: the project whose local servers are also this file's."""

    @classmethod
    def read(cls, client: ClientFormat, path: Path, *, project_dir: Path | None = None) -> ClientFile:
        try:
            text: str | None = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientFileError(f"{path}: cannot be read: {exc}") from None
        data, comments = ({}, False) if text is None or not text.strip() else _parse(path, text)
        servers = data.get(client.servers_key)
        if servers is not None and not isinstance(servers, dict):
            raise ClientFileError(f"{path}: '{client.servers_key}' must be an object of servers")
        indent = match[1] if text and (match := re.match(r"\{\s*?\n([ \t]+)\S", text)) else "  "
        return cls(client, path, text, data, indent, comments, project_dir)

    def tables(self) -> list[dict[str, Any]]:
        """The server tables in this file: the client's own, and (Claude Code) the project's local ones."""
        found = []
        own = self.data.get(self.client.servers_key)
        if isinstance(own, dict):
            found.append(own)
        if self.client.name == "claude-code" and self.project_dir is not None:
            project = self.data.get("projects", {}).get(str(self.project_dir))
            if isinstance(project, dict) and isinstance(project.get("mcpServers"), dict):
                found.append(project["mcpServers"])
        return found

    def servers(self) -> dict[str, Any]:
        """The file's server table, created (empty) if it has none."""
        table = self.data.setdefault(self.client.servers_key, {})
        assert isinstance(table, dict)
        return table

    def render(self) -> str:
        trailing = "\n" if self.text is None or self.text.endswith("\n") else ""
        return json.dumps(self.data, indent=self.indent, ensure_ascii=False) + trailing


def _parse(path: Path, text: str) -> tuple[dict[str, Any], bool]:
    """The file's object, and whether it had comments; duplicate keys are an error, not last-wins."""
    try:
        try:
            data, comments = json.loads(text, object_pairs_hook=_object), False
        except json.JSONDecodeError as strict:
            relaxed = _strip_comments(text)
            if relaxed == text:
                raise ClientFileError(_json_error(path, strict)) from None
            try:
                data, comments = json.loads(relaxed, object_pairs_hook=_object), True
            except json.JSONDecodeError as exc:
                raise ClientFileError(_json_error(path, exc)) from None
    except _DuplicateKey as exc:
        raise ClientFileError(f"{path}: not valid JSON: key {exc.args[0]!r} appears twice in one object") from None
    if not isinstance(data, dict):
        raise ClientFileError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data, comments


def _json_error(path: Path, exc: json.JSONDecodeError) -> str:
    return f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


_JSONC_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|//[^\n]*|/\*[\s\S]*?\*/|,')
_CLOSER = re.compile(r"\s*[}\]]")


def _strip_comments(text: str) -> str:
    """JSON with comments (VS Code's format) made JSON: comments and trailing commas become spaces.

    Line and column numbers are kept, so an error still points into the user's file.
    """
    without = _JSONC_TOKEN.sub(lambda match: _blank(match[0]) if match[0][0] == "/" else match[0], text)
    return _JSONC_TOKEN.sub(
        lambda match: " " if match[0] == "," and _CLOSER.match(without, match.end()) else match[0], without
    )


def _blank(token: str) -> str:
    return re.sub(r"[^\n]", " ", token)
