"""`import` and `init`: declaring a client's servers as upstreams, with a first policy each.

`import` also puts the gateway in their place in the client's file; `init` writes a starter
`upstreams.toml` and `policies/`. Every file is checked before it is written (the edited
`upstreams.toml` must load, the new policy set must compile) and written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from gateway.cli.common import note, print_table
from gateway.cli.register import apply, check_entry, next_steps, pass_env, tell
from gateway.cli.upstreams import comments_note
from gateway.config.edit import ConfigText, Edit
from gateway.config.models import Config
from gateway.config.source import variables
from gateway.errors import ConfigError
from gateway.policy.files import load_policies
from gateway.setup.client_files import ClientFile
from gateway.setup.clients import CLIENTS, locate
from gateway.setup.files import backup, unified_diff, write_atomically
from gateway.setup.importing import ImportPlan, plan_import, without_moved
from gateway.setup.registration import register
from gateway.setup.starter import (
    DEFAULTS,
    Listing,
    StarterFile,
    list_upstreams,
    policy_path,
    starter_config,
    upstream_policy,
)


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
            file, name, new_config.path, variables(edited.data), plan.passthrough, project_dir, pass_env(new_config)
        )
        check_entry(change, name, edited, project_dir)
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
            tell(change)
            print(unified_diff(file.path, file.text, file.render()), end="")
        print("(dry run: nothing written)")
        return 1 if plan.left else 0
    _write_policies(policies)
    if plan.adds or starting:
        write_atomically(config_path, edit.text)
        added = f"added {len(plan.adds)} upstream{'s' * (len(plan.adds) != 1)}"
        print(f"{config_path}: {'created with the starter settings; ' if starting else ''}{added}")
        comments_note(config_path, edit)
    for policy, starter in policies.items():
        print(f"{policy}: {starter.summary}")
    if change is not None:
        apply(change, False, then=next_steps(client.title, new_config))
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
        policies[target] = upstream_policy(
            name, listing, written_by=command, separator=config.gateway.separator, table=names[name]
        )
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
            name, listing, written_by="init", separator=config.gateway.separator, table=upstreams[name]
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
