"""`register`, `import`, `init` and `upstream`: putting the gateway in front of what a user already runs.

Every command that changes a file checks the result first (the edited `upstreams.toml` must load,
the new policy set must compile), writes atomically, backs up a client's file before changing it,
and with `--dry-run` prints the change instead. Notes go to stderr as `mcp-armor: note: ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from gateway.cli.common import print_table
from gateway.config.edit import ConfigText, Edit
from gateway.config.models import Config
from gateway.config.source import UPSTREAM_NAME, variables
from gateway.errors import ClientFileError, ConfigError
from gateway.policy.files import load_policies
from gateway.setup.clients import (
    CLIENTS,
    ClientFile,
    Registration,
    absolute_paths,
    locate,
    register,
    unregister,
)
from gateway.setup.files import backup, unified_diff, write_atomically
from gateway.setup.importing import ImportPlan, plan_import, without_moved
from gateway.setup.starter import (
    DEFAULTS,
    Listing,
    StarterFile,
    list_upstreams,
    policy_path,
    starter_config,
    upstream_policy,
)


def note(text: str) -> None:
    print(f"mcp-armor: note: {text}", file=sys.stderr)


# register ---------------------------------------------------------------------------------------


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
            file, name, config.path, variables(config_text.data), project_dir=project_dir, pass_env=_pass_env(config)
        )
        _check_entry(change, name, config_text, project_dir)
        _other_scopes(file, name)
    return _apply(change, args.dry_run, then=None if args.remove else _next_steps(client.title, config))


ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A name for the gateway's entry that every client accepts."""


def _pass_env(config: Config) -> dict[str, tuple[str, ...]]:
    """Where each `pass_env` is (`[gateway]`, `[upstreams.NAME]`) -> its entries."""
    tables = {f"[upstreams.{name}]": upstream.pass_env for name, upstream in config.upstreams.items()}
    return {"[gateway]": config.gateway.pass_env, **tables}


def _check_entry(change: Registration, name: str, config_text: ConfigText, project_dir: Path | None) -> None:
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


def _tell(change: Registration) -> None:
    for text in change.warnings:
        print(f"mcp-armor: warning: {text}", file=sys.stderr)
    for text in change.notes:
        note(text)


def _apply(change: Registration, dry_run: bool, *, then: str | None) -> int:
    _tell(change)
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


def _next_steps(client: str, config: Config) -> str:
    return (
        f"Restart {client} (or reload its MCP servers); its calls then go through the gateway. Watch them with:\n"
        f"  mcp-armor audit tail -f --config {config.path}"
    )


# import -----------------------------------------------------------------------------------------


def import_command(args: argparse.Namespace) -> int:
    client = CLIENTS[args.client]
    path = locate(client, path=args.path, project=args.project)
    file = ClientFile.read(client, path, project_dir=Path.cwd())
    if file.text is None:
        raise ConfigError(f"{path}: not found, so there is nothing to import (pass --path FILE)")
    config_path = Path(args.config)
    starting = not config_path.exists()
    if starting:
        config_text = ConfigText.of(config_path, starter_config({}))
    else:
        config_text = ConfigText.read(config_path)
    config = config_text.check()
    plan = plan_import(
        file,
        config_text.upstreams,
        separator=config.gateway.separator,
        gateway=config.gateway.name,
        project_dir=Path.cwd() if args.project else None,
        move_secrets=not args.keep,
    )
    _report_plan(client.title, file, plan)
    edit = config_text.adding(plan.adds) if plan.adds else Edit(config_text, comments_kept=True)
    edited = edit.file
    new_config = edited.check()
    known = {name: value for name, value in plan.passthrough.items() if not value.startswith("${")}
    listings = {} if args.offline or not plan.adds else anyio.run(list_upstreams, edited, list(plan.adds), known)
    policies = _first_policies(new_config, plan.adds, listings, "import", starting=starting)
    change = None
    if not args.keep and plan.moved:
        without_moved(file, plan)
        project_dir = Path.cwd() if args.project else None
        name = config.gateway.name
        change = register(
            file, name, new_config.path, variables(edited.data), plan.passthrough, project_dir, _pass_env(new_config)
        )
        _check_entry(change, name, edited, project_dir)
        if plan.removals:
            moved = len(plan.removals)
            change.changed = True
            servers = f"{moved} server{'s' * (moved != 1)}"
            change.message = f"{file.path}: the gateway now fronts the {servers} moved from here"
    if args.dry_run:
        if plan.adds or starting:
            print(unified_diff(config_path, None if starting else config_text.text, edit.text), end="")
        for policy, starter in policies.items():
            print(unified_diff(policy, None, starter.text), end="")
        if change is not None:
            _tell(change)
            print(unified_diff(file.path, file.text, file.render()), end="")
        print("(dry run: nothing written)")
        return 1 if plan.left else 0
    _write_policies(policies)
    if plan.adds or starting:
        write_atomically(config_path, edit.text)
        added = f"added {len(plan.adds)} upstream{'s' * (len(plan.adds) != 1)}"
        print(f"{config_path}: {'created with the starter settings; ' if starting else ''}{added}")
        _comments_note(config_path, edit)
    for policy, starter in policies.items():
        print(f"{policy}: {starter.summary}")
    if change is not None:
        _apply(change, False, then=_next_steps(client.title, new_config))
    elif args.keep and plan.moved:
        print(f"{file.path}: unchanged (--keep); register the gateway there and remove those servers when ready")
    return 1 if plan.left else 0


def _report_plan(client: str, file: ClientFile, plan: ImportPlan) -> None:
    print(f"{client}: {file.path}")
    rows: list[tuple[str, str, str]] = []
    for key, upstream in plan.moved.items():
        state = "imported" if upstream in plan.adds else "already"
        rows.append((state, key, f"upstream '{upstream}'"))
    rows += [("left", key, reason) for key, reason in plan.left.items()]
    if rows:
        print_table(("", "SERVER", "NOW"), rows)
    else:
        print("(no servers besides the gateway)")
    for text in plan.notes:
        note(text)
    for key, reason in plan.left.items():
        print(
            f"mcp-armor: not imported: '{key}': {reason} (it stays in {file.path}, not behind the gateway)",
            file=sys.stderr,
        )


def _first_policies(
    config: Config, names: Mapping[str, Any], listings: Mapping[str, Listing], command: str, *, starting: bool
) -> dict[Path, StarterFile]:
    """A first policy file per new upstream (where it has none yet), checked to compile with the others."""
    policy_dir = config.policy_dir
    policies: dict[Path, StarterFile] = {}
    if starting and not (policy_dir / "defaults.toml").exists():
        policies[policy_dir / "defaults.toml"] = DEFAULTS
    for name in names:
        target = policy_path(policy_dir, name)
        if target.exists():
            note(f"{target} exists and is kept; the rules for upstream '{name}' are yours to write")
            continue
        listing = listings.get(name, Listing(problem="not started: --offline"))
        policies[target] = upstream_policy(name, listing, written_by=command, separator=config.gateway.separator)
    with tempfile.TemporaryDirectory() as scratch:
        trial = Path(scratch) / "policies"
        if policy_dir.is_dir():
            shutil.copytree(policy_dir, trial)
        trial.mkdir(exist_ok=True)
        for target, starter in policies.items():
            (trial / target.name).write_text(starter.text, encoding="utf-8")
        try:
            load_policies(trial)
        except ConfigError as exc:
            raise ConfigError(f"the first policies for the new upstreams would not compile: {exc}") from None
    return policies


def _write_policies(policies: Mapping[Path, StarterFile]) -> None:
    for target, starter in policies.items():
        write_atomically(target, starter.text)


# init -------------------------------------------------------------------------------------------


def init_command(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    config_path = directory / "upstreams.toml"
    defaults = directory / "policies" / "defaults.toml"
    existing = [path for path in (config_path, defaults) if path.exists()]
    if existing and not args.force:
        raise ConfigError(f"{existing[0]} already exists; pass --force to overwrite it (the old one is backed up)")
    upstreams: dict[str, dict[str, Any]] = {}
    if args.from_client:
        client = CLIENTS[args.from_client]
        file = ClientFile.read(client, locate(client, path=args.path, project=args.project), project_dir=Path.cwd())
        project_dir = Path.cwd() if args.project else None
        plan = plan_import(file, {}, separator="__", gateway="mcp-armor", project_dir=project_dir, move_secrets=False)
        _report_plan(client.title, file, plan)
        upstreams = plan.adds
    text = starter_config(upstreams)
    config_text = ConfigText.of(config_path, text)
    config = config_text.check()
    listings = {} if args.offline or not upstreams else anyio.run(list_upstreams, config_text, list(upstreams))
    policies = {defaults: DEFAULTS}
    for name in upstreams:
        listing = listings.get(name, Listing(problem="not started: --offline"))
        policies[policy_path(config.policy_dir, name)] = upstream_policy(
            name, listing, written_by="init", separator=config.gateway.separator
        )
    written = [(config_path, StarterFile(text, "the gateway's settings and upstreams")), *policies.items()]
    for target, starter in written:
        if target.exists():
            saved = backup(target)
            note(f"{target} overwritten (--force); the old one is in {saved}")
        write_atomically(target, starter.text)
        print(f"{target}: {starter.summary}")
    print(
        f"Next: add upstreams (`mcp-armor upstream add NAME -- COMMAND ARGS...` or `mcp-armor import CLIENT`), "
        f"then `mcp-armor register CLIENT --config {config_path.resolve()}`."
    )
    return 0


# upstream add / remove / list ---------------------------------------------------------------------


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
        _comments_note(config_text.path, edit)
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
    _comments_note(config_text.path, edit)
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


def _comments_note(path: Path, edit: Edit) -> None:
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
