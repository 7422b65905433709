"""Agent clients' MCP configuration files: the clients, where their files live, and how they differ.

Reading and writing a client's file is `setup/client_files.py`; the gateway's own entry in it
(`register`) is `setup/registration.py`; moving the client's servers behind it is `setup/importing.py`.

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

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
