"""Agent clients' MCP configuration files: the clients, where their files live, how they differ, and
reading and writing them. The gateway's own entry in them (`register`) is `setup/registration.py`;
moving the client's servers behind it is `setup/importing.py`.

Every client keeps its servers in a JSON object of `name -> entry`: Claude Desktop, Claude Code,
Cursor, Windsurf and Gemini CLI under `mcpServers`, VS Code under `servers` (in JSON with comments).
They differ in where the file is, whether an entry names its transport (`type`), the key of a remote
server's address (`url`, Windsurf's `serverUrl`, Gemini CLI's `httpUrl`) and how a value refers to an
environment variable (`${VAR}` in Claude Code and Gemini CLI, `${env:VAR}` in Cursor, VS Code and
Windsurf, nothing in Claude Desktop). An edit changes only the entries it is about; every other key of
the file is kept as it was.

Gemini CLI, as its documentation (docs/tools/mcp-server.md) and source
(packages/core/src/services/environmentSanitization.ts, packages/cli/src/utils/envVarResolver.ts)
describe it: it removes variables whose names look like secrets (*TOKEN*, *SECRET*, *KEY*, *AUTH*,
*PASSWORD*, *CREDENTIAL*, ...) from the environment a stdio server inherits, and passes those listed
in the server's `env`; it expands `$VAR` and `${VAR}` in the strings of its settings (an unset one is
left as written: the gateway reads a variable set to its own reference as unset), with no way to write
a literal `$VAR`; it reads the project file from the directory it runs in, and starts stdio servers
there. So the gateway's entry lists every variable `upstreams.toml` refers to or `pass_env` names.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import ClientFileError


@dataclass(frozen=True)
class ClientFormat:
    name: str
    title: str
    servers_key: str = "mcpServers"
    url_key: str = "url"
    typed: bool = False
    """Whether entries carry `"type": "stdio" | "http"` (Claude Code, VS Code)."""
    env_syntax: str | None = "${{env:{}}}"
    """How a value refers to an environment variable; `None`: the client does not expand variables."""
    project_file: str | None = None
    """The project-scoped file, relative to the project directory (`--project`)."""
    project_root: str | None = None
    """How an entry in the project file names the project directory, so the file works in any clone: a
    variable the client expands, or "" where the client starts the project's servers in that directory."""
    sse_url_key: str | None = None
    """The key of a server the client reaches over SSE unless `type` says otherwise (Gemini CLI's `url`)."""
    expands_bare: bool = False
    """Whether `$VAR` is a reference too, in every string of the file (Gemini CLI): a `$` cannot be literal."""
    strips_secrets: bool = False
    """Whether a stdio server inherits only the variables whose names do not look like secrets, unless its
    `env` lists them (Gemini CLI): the entry then lists what `pass_env` names too."""

    def user_file(self, platform: str = sys.platform, environ: Mapping[str, str] = os.environ) -> Path:
        """The user-wide file on this operating system."""
        home = Path(environ.get("HOME") or Path.home())
        if platform == "darwin":
            app_support = home / "Library" / "Application Support"
        elif platform == "win32":
            app_support = Path(environ.get("APPDATA") or home / "AppData" / "Roaming")
        else:
            app_support = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        if self.name == "claude-desktop":
            return app_support / "Claude" / "claude_desktop_config.json"
        if self.name == "vscode":
            return app_support / "Code" / "User" / "mcp.json"
        if self.name == "claude-code":
            return home / ".claude.json"
        if self.name == "cursor":
            return home / ".cursor" / "mcp.json"
        if self.name == "gemini":
            return home / ".gemini" / "settings.json"
        return home / ".codeium" / "windsurf" / "mcp_config.json"

    def reference(self, variable: str, *, has_default: bool = False) -> str | None:
        """A value that makes the client pass its own `variable` on to the gateway."""
        if self.env_syntax is None:
            return None
        if has_default and self.name == "claude-code":
            return f"${{{variable}:-}}"
        return self.env_syntax.format(variable)

    def referenced(self, value: str) -> str | None:
        """The variable of the client's environment that `value` passes on whole, if it is one reference."""
        if self.env_syntax is None:
            return None
        before, _, after = (re.escape(part) for part in self.env_syntax.format("\0").partition("\0"))
        match = re.fullmatch(f"{before}([A-Za-z_][A-Za-z0-9_]*)(?::-)?{after}", value)
        return match[1] if match else None


CLIENTS: dict[str, ClientFormat] = {
    client.name: client
    for client in (
        ClientFormat("claude-desktop", "Claude Desktop", env_syntax=None),
        # Claude Code starts a project's servers in the directory it runs in, the one holding `.mcp.json`.
        ClientFormat(
            "claude-code", "Claude Code", typed=True, env_syntax="${{{}}}", project_file=".mcp.json", project_root=""
        ),
        ClientFormat("cursor", "Cursor", project_file=".cursor/mcp.json", project_root="${workspaceFolder}"),
        ClientFormat(
            "vscode",
            "VS Code",
            servers_key="servers",
            typed=True,
            project_file=".vscode/mcp.json",
            project_root="${workspaceFolder}",
        ),
        ClientFormat("windsurf", "Windsurf", url_key="serverUrl"),
        ClientFormat(
            "gemini",
            "Gemini CLI",
            url_key="httpUrl",
            env_syntax="${{{}}}",
            project_file=".gemini/settings.json",
            project_root="",
            sse_url_key="url",
            expands_bare=True,
            strips_secrets=True,
        ),
    )
}


def locate(client: ClientFormat, *, path: Path | None, project: bool, cwd: Path | None = None) -> Path:
    """The file to read and edit: `--path`, the project's file (`--project`), or the user-wide one."""
    if path is not None:
        return path
    if project:
        if client.project_file is None:
            raise ClientFileError(f"{client.title} has no project-scoped configuration file; drop --project")
        return (cwd or Path.cwd()) / client.project_file
    return client.user_file()


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
