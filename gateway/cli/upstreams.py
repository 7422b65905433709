"""`upstream add`, `remove` and `list`: editing `upstreams.toml` in place, comments kept.

An edit is checked to load before it is written; where it cannot be made in place the file is
rewritten and its comments are lost, which is said.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from gateway.cli.common import note, print_table
from gateway.config.edit import ConfigText, Edit
from gateway.config.models import Config
from gateway.config.source import UPSTREAM_NAME
from gateway.errors import ConfigError
from gateway.setup.files import write_atomically
from gateway.setup.starter import (
    list_upstreams,
    policy_path,
)


def upstream_command(args: argparse.Namespace) -> int:
    config_text = ConfigText.read(Path(args.config))
    config = config_text.check()
    if args.upstream_command == "list":
        return _list(config_text, config, args.json)
    name = args.name
    if args.upstream_command == "remove":
        if name not in config_text.upstreams:
            raise ConfigError(f"{config_text.path}: there is no upstream named '{name}'")
        edit = config_text.removing(name)
        remaining = edit.file.check()
        write_atomically(config_text.path, edit.text)
        print(f"{config_text.path}: removed upstream '{name}'")
        comments_note(config_text.path, edit)
        leftover = policy_path(remaining.policy_dir, name)
        if leftover.exists():
            note(f"{leftover} still holds rules for its tools; remove it if the upstream is gone for good")
        return 0
    return anyio.run(_add, config_text, args)


async def _add(config_text: ConfigText, args: argparse.Namespace) -> int:
    name = args.name
    if not UPSTREAM_NAME.match(name):
        raise ConfigError(
            f"'{name}' is not a valid upstream name: use lower-case a-z, 0-9, _ and -, starting with a letter or digit"
        )
    if name in config_text.upstreams:
        raise ConfigError(
            f"{config_text.path}: an upstream named '{name}' already exists; remove it first or pick another name"
        )
    table = _table(args)
    edit = config_text.adding({name: table})
    edit.file.check()
    if args.check:
        listing = (await list_upstreams(edit.file, [name]))[name]
        if listing.problem is not None:
            print(
                f"mcp-armor: error: upstream '{name}' did not answer: {listing.problem} (nothing written)",
                file=sys.stderr,
            )
            return 1
        print_table(
            ("TOOL", "DESCRIPTION"), [(tool.name, _first_line(tool.model.description)) for tool in listing.tools]
        )
    write_atomically(config_text.path, edit.text)
    print(f"{config_text.path}: added upstream '{name}'")
    comments_note(config_text.path, edit)
    note(f"its tools are refused until a policy allows them: see `mcp-armor tools --config {config_text.path}`")
    return 0


def _table(args: argparse.Namespace) -> dict[str, Any]:
    if args.url is not None:
        if args.argv or args.env or args.cwd:
            raise ConfigError(
                "give either --url URL or -- COMMAND ARGS..., not both (--env and --cwd are for commands)"
            )
        table: dict[str, Any] = {"url": args.url}
        if args.header:
            table["headers"] = _pairs(args.header, "--header")
        return table
    if not args.argv:
        raise ConfigError("say how to reach the upstream: -- COMMAND ARGS... (stdio) or --url URL (streamable HTTP)")
    if args.header:
        raise ConfigError("--header is for --url upstreams")
    command, *arguments = args.argv
    table = {"command": command}
    if arguments:
        table["args"] = arguments
    if args.env:
        table["env"] = _pairs(args.env, "--env")
    if args.cwd:
        table["cwd"] = args.cwd
    return table


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def comments_note(path: Path, edit: Edit) -> None:
    if not edit.comments_kept:
        note(f"{path} could not be edited in place; it was rewritten and its comments are gone")


def _list(config_text: ConfigText, config: Config, as_json: bool) -> int:
    """Upstreams as written (variables not expanded, so no secret is printed; env and header values hidden),
    and which are unavailable here for want of a variable."""
    rows = []
    for name, table in config_text.upstreams.items():
        if "url" in table:
            transport, target = "http", table["url"]
        else:
            transport, target = "stdio", " ".join([table.get("command", ""), *map(_shell_word, table.get("args", []))])
        rows.append(
            {
                "name": name,
                "transport": transport,
                "target": target,
                "enabled": table.get("enabled", True),
                "env": sorted(table.get("env", {})),
                "headers": sorted(table.get("headers", {})),
                "unavailable": config.upstreams[name].unavailable,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(
        ("UPSTREAM", "TRANSPORT", "ENABLED", "TARGET"),
        [(row["name"], row["transport"], "yes" if row["enabled"] else "no", row["target"]) for row in rows],
        empty="(no upstreams)",
    )
    for row in rows:
        if row["unavailable"] is not None:
            print(f"{row['name']}: unavailable: {row['unavailable']}")
    return 0


def _shell_word(word: str) -> str:
    return word if word and all(char.isalnum() or char in "-_./:=@,+" for char in word) else json.dumps(word)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0][:100] if (text or "").strip() else ""
