"""Agent clients' MCP configuration files: where they live, how to read them, and the two edits the
gateway makes to them (`register`: put the gateway in; `import`: move the client's servers behind it).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.environment import changes_runtime
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


# The gateway's own entry ------------------------------------------------------------------------


def launcher() -> list[str]:
    """How a client starts this installation: its `mcp-armor` script, else `python -m gateway`.

    `sys.executable` is deliberately not resolved: in a virtual environment it is a link whose own
    directory (the environment's `bin/`) is what makes the gateway's packages importable.
    """
    interpreter = Path(os.path.abspath(sys.executable))
    for name in ("mcp-armor", "mcp-armor.exe"):
        script = interpreter.parent / name
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [str(interpreter), "-m", "gateway"]


def gateway_entry(
    client: ClientFormat, config: Path, env: Mapping[str, str], project_dir: Path | None = None
) -> dict[str, Any]:
    """The entry that starts the gateway on `config` (an absolute path): clients start it from anywhere.

    In a project's file (`project_dir`), paths inside the project are written as the client names
    the project directory, so the file still works in a clone elsewhere; the others stay absolute.
    """
    command, *args = (portable(client, word, project_dir) for word in launcher())
    entry: dict[str, Any] = {"type": "stdio"} if client.typed else {}
    entry["command"] = command
    entry["args"] = [*args, "serve", "--config", portable(client, str(config), project_dir)]
    if env:
        entry["env"] = dict(env)
    return entry


def portable(client: ClientFormat, word: str, project_dir: Path | None) -> str:
    """`word`, if it is a path inside `project_dir`, written relative to the project as the client allows."""
    if project_dir is None or client.project_root is None or not os.path.isabs(word):
        return word
    path = Path(word)  # not resolved: a virtual environment's interpreter is a link that must stay one
    root = next((root for root in (project_dir, project_dir.resolve()) if path.is_relative_to(root)), None)
    if root is None:
        return word
    relative = path.relative_to(root).as_posix()
    if client.project_root:
        return f"{client.project_root}/{relative}"
    return f"./{relative}"  # relative to where the client starts the server; a bare name is looked up on PATH


def absolute_paths(entry: Mapping[str, Any]) -> list[str]:
    """The absolute paths an entry holds (what ties a project's file to this machine)."""
    words = [entry.get("command"), *entry.get("args", [])]
    return [word for word in words if isinstance(word, str) and os.path.isabs(word)]


def is_gateway_entry(entry: Any) -> bool:
    """Whether a client's entry starts an mcp-armor gateway (so `import` never fronts the gateway itself)."""
    if not isinstance(entry, dict):
        return False
    command, args = entry.get("command"), entry.get("args")
    if not isinstance(command, str) or not isinstance(args, list):
        return False
    words = [Path(command).name.removesuffix(".exe"), *map(str, args)]
    runs_gateway = "mcp-armor" in words or any(words[i : i + 2] == ["-m", "gateway"] for i in range(len(words)))
    return runs_gateway and "serve" in words


@dataclass
class Registration:
    """What `register` (or `--remove`) would do to a client's file."""

    file: ClientFile
    changed: bool
    message: str
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def register(
    file: ClientFile,
    name: str,
    config: Path,
    variables: Mapping[str, bool],
    passthrough: Mapping[str, str] | None = None,
    project_dir: Path | None = None,
    pass_env: Mapping[str, Sequence[str]] | None = None,
) -> Registration:
    """Put the gateway's entry `name` into the file (in place of an older one of that name).

    `variables` are those `upstreams.toml` refers to (name -> always has a default): each is passed
    through from the client's environment unless the entry already sets it (values a person put
    there are kept, but for those that change how the gateway runs or what it loads). `passthrough`
    gives client-specific values for some of them (VS Code inputs). `pass_env` (where -> its entries)
    names more, for a client that strips secret-looking variables. An entry of that name that is not
    the gateway's is another server: it is never replaced.
    """
    servers = file.servers()
    previous = servers.get(name)
    _own(file, name, previous)
    kept: dict[str, str] = {}
    if isinstance(previous, dict) and isinstance(previous.get("env"), dict):
        kept = {key: value for key, value in previous["env"].items() if isinstance(value, str)}
    env = {key: value for key, value in kept.items() if not changes_runtime(key)}
    notes = []
    warnings = []
    variables = dict(variables)
    if file.client.strips_secrets:
        for where, entries in (pass_env or {}).items():
            for given in entries:
                if "*" in given or "?" in given:
                    warnings.append(
                        f"{where} pass_env '{given}': {file.client.title} strips the variables it matches whose "
                        f"names look like secrets (*TOKEN*, *KEY*, ...); name each such variable exactly"
                    )
                else:
                    variables.setdefault(given, True)
    unpassed = []
    for variable, has_default in sorted(variables.items()):
        if variable in env:
            continue
        if changes_runtime(variable):
            # Listed, it would reach the gateway itself (where a client leaves an unset one as its own
            # reference, `${PYTHONPATH}` names a directory of the project the gateway starts in).
            warnings.append(
                f"upstreams.toml refers to {variable}, which changes how a program runs or what code it loads: "
                f"it is not passed through the '{name}' entry; write its value into upstreams.toml instead"
            )
            continue
        value = (passthrough or {}).get(variable) or file.client.reference(variable, has_default=has_default)
        if value is None:
            if not has_default:
                unpassed.append(variable)
        else:
            env[variable] = value
    for variable in sorted(key for key in kept if changes_runtime(key) and env.get(key) != kept[key]):
        warnings.append(
            f"{file.path}: dropped {variable} from the 'env' of the '{name}' entry: it changes how the gateway "
            f"runs or what code it loads"
        )
    if unpassed:
        notes.append(
            f"{file.client.title} does not expand variables: set {', '.join(unpassed)} in the 'env' of the "
            f"'{name}' entry in {file.path} (upstreams.toml refers to them)"
        )
    entry = gateway_entry(file.client, config, env, project_dir)
    if file.client.expands_bare and any("$" in word for word in [entry["command"], *entry["args"]]):
        raise ClientFileError(
            f"{file.path}: {file.client.title} would expand the '$' in the gateway's path; "
            f"install it, and keep upstreams.toml, where a path has no '$'"
        )
    if previous == entry:
        message = f"{file.path}: '{name}' is already registered; nothing to change"
        return Registration(file, False, message, notes, warnings)
    servers[name] = entry
    verb = "updated" if previous is not None else "added"
    return Registration(file, True, f"{file.path}: {verb} '{name}' (serve --config {config})", notes, warnings)


def unregister(file: ClientFile, name: str) -> Registration:
    servers = file.data.get(file.client.servers_key)
    if not isinstance(servers, dict) or name not in servers:
        return Registration(file, False, f"{file.path}: '{name}' is not registered; nothing to remove")
    _own(file, name, servers[name])
    del servers[name]
    return Registration(file, True, f"{file.path}: removed '{name}'")


def _own(file: ClientFile, name: str, entry: Any) -> None:
    """Refuse to replace or remove a server of the user's that happens to have the gateway's name."""
    if entry is not None and not is_gateway_entry(entry):
        raise ClientFileError(
            f"{file.path}: '{name}' is another server, not the gateway; nothing changed (pick another --name)"
        )
