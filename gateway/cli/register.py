"""`register`: writing the gateway's entry into an agent client's MCP configuration (or taking it out).

The change is checked first, the client's file is backed up before it is rewritten, and with
`--dry-run` the change is printed instead. Notes go to stderr as `mcp-armor: note: ...`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.cli.common import note
from gateway.config.edit import ConfigText
from gateway.config.models import Config
from gateway.config.source import variables
from gateway.errors import ClientFileError, ConfigError
from gateway.setup.client_files import ClientFile
from gateway.setup.clients import CLIENTS, locate
from gateway.setup.files import backup, unified_diff, write_atomically
from gateway.setup.registration import Registration, absolute_paths, register, unregister


def register_command(args: argparse.Namespace) -> int:
    client = CLIENTS[args.client]
    config_text = ConfigText.read(Path(args.config))
    config = config_text.check()
    path = locate(client, path=args.path, project=args.project)
    file = ClientFile.read(client, path, project_dir=Path.cwd())
    name = config.gateway.name if args.name is None else args.name
    if not ENTRY_NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if args.remove:
        change = unregister(file, name)
    else:
        project_dir = Path.cwd() if args.project else None
        change = register(
            file, name, config.path, variables(config_text.data), project_dir=project_dir, pass_env=pass_env(config)
        )
        check_entry(change, name, config_text, project_dir)
        _other_scopes(file, name)
    return apply(change, args.dry_run, then=None if args.remove else next_steps(client.title, config))


ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A name for the gateway's entry that every client accepts."""


def pass_env(config: Config) -> dict[str, tuple[str, ...]]:
    """Where each `pass_env` is (`[gateway]`, `[upstreams.NAME]`) -> its entries."""
    tables = {f"[upstreams.{name}]": upstream.pass_env for name, upstream in config.upstreams.items()}
    return {"[gateway]": config.gateway.pass_env, **tables}


def check_entry(change: Registration, name: str, config_text: ConfigText, project_dir: Path | None) -> None:
    """Warn of what would keep the entry from working: a variable set nowhere the client can see it (among
    the change's warnings), and (in a project's file) the absolute paths that tie the file to this machine."""
    file = change.file
    entry = file.servers()[name]
    needs = _needed_by(config_text.data)
    for variable, value in sorted(entry.get("env", {}).items()):
        passed = file.client.referenced(value)
        if variable in needs and passed is not None and passed not in os.environ:
            change.warnings.append(
                f"{passed} is set neither in this shell nor in the '{name}' entry of "
                f"{file.path}, and {needs[variable]} needs it as {variable}"
            )
    if project_dir is not None and (paths := absolute_paths(entry)):
        note(
            f"{file.path} is machine-specific: it holds {', '.join(paths)} (outside {project_dir}); "
            f"in a clone elsewhere run `mcp-armor register {file.client.name} --project` again"
        )


def _needed_by(data: Mapping[str, Any]) -> dict[str, str]:
    """Each variable upstreams.toml refers to without a default -> who needs it (upstreams, or [gateway])."""
    users: dict[str, list[str]] = {}
    tables = {f"upstream '{key}'": table for key, table in data.get("upstreams", {}).items()}
    for who, table in {"the [gateway] table": data.get("gateway", {}), **tables}.items():
        for variable, has_default in variables(table).items():
            if not has_default:
                users.setdefault(variable, []).append(who)
    return {variable: " and ".join(who) for variable, who in users.items()}


def _other_scopes(file: ClientFile, name: str) -> None:
    """Say where else the client defines a server of that name: it runs only one (Claude Code calls it
    "defined in multiple scopes"), so another `--name` keeps both."""
    client = file.client
    here = [file.path]
    if client.project_file is not None:
        here.append(Path.cwd() / client.project_file)
    here.append(client.user_file())
    tables = file.tables()[1:]  # Claude Code's local scope for this project, in the same file
    elsewhere = [str(file.path)] if any(name in table for table in tables) else []
    for path in dict.fromkeys(here):
        if path == file.path:
            continue
        try:
            other = ClientFile.read(client, path, project_dir=Path.cwd())
        except ClientFileError:
            continue  # only a note: a file that cannot be read is reported when it is the one edited
        if any(name in table for table in other.tables()):
            elsewhere.append(str(path))
    if elsewhere:
        note(
            f"{client.title} also has a server named '{name}' in {', '.join(elsewhere)}; it uses only one of "
            f"them: register under another --name to keep both, or remove the other"
        )


def tell(change: Registration) -> None:
    for text in change.warnings:
        print(f"mcp-armor: warning: {text}", file=sys.stderr)
    for text in change.notes:
        note(text)


def apply(change: Registration, dry_run: bool, *, then: str | None) -> int:
    tell(change)
    if not change.changed:
        print(change.message)
        return 0
    file = change.file
    rendered = file.render()
    if dry_run:
        print(unified_diff(file.path, file.text, rendered), end="")
        print(f"{change.message} (dry run: nothing written)")
        return 0
    if file.comments:
        note(f"{file.path} had comments; they are not kept in the rewritten file (the backup has them)")
    saved = backup(file.path)
    write_atomically(file.path, rendered)
    print(change.message + (f"; the original is in {saved}" if saved else ""))
    if then:
        print(then)
    return 0


def next_steps(client: str, config: Config) -> str:
    return (
        f"Restart {client} (or reload its MCP servers); its calls then go through the gateway. Watch them with:\n"
        f"  mcp-armor audit tail -f --config {config.path}"
    )
