"""The gateway's own entry in an agent client's file: how it starts this installation, and `register` /
`register --remove` putting it in or taking it out (never replacing a server of the user's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.environment import changes_runtime
from gateway.errors import ClientFileError
from gateway.setup.client_files import ClientFile
from gateway.setup.clients import ClientFormat


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
