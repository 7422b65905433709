"""The `mcp-armor` command line: argument parsing and printing, no business logic.

A mistake of the user's (bad config, bad argument) is one line on stderr and exit status 2; an
upstream that could not be reached makes `tools` (and `upstream add --check`) exit 1 after printing
what it could; a broken audit chain makes `audit verify` exit 1; servers `import` had to leave in
the client make it exit 1. Output cut short by its reader (`mcp-armor audit export | head`) ends
quietly with status 141, as a process killed by SIGPIPE would (`set -o pipefail` scripts see it the
same way). The commands live in `cli/policy.py`, `cli/audit.py`, `cli/pins.py`, `cli/register.py`,
`cli/importing.py` and `cli/upstreams.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from gateway import __version__
from gateway.audit.queries import Filters
from gateway.cli import audit, importing, pins, policy, register, upstreams
from gateway.cli.common import print_table
from gateway.config.models import Config, load_config
from gateway.config.source import DEFAULT_CONFIG
from gateway.errors import GatewayError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_engine
from gateway.setup.clients import CLIENTS
from gateway.upstream.connect import connect


class _Version(argparse.Action):
    """`--version`: the installed distribution's version, looked up only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("mcp-armor")
        except PackageNotFoundError:  # run from a source tree that was never installed
            installed = __version__
        print(f"mcp-armor {installed}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-armor", description="A guarding gateway for the Model Context Protocol.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print the installed version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=DEFAULT_CONFIG, metavar="PATH", help="the gateway's upstreams.toml (default: %(default)s)"
    )

    serve = commands.add_parser("serve", parents=[common], help="serve the gateway to an agent (stdio unless --http)")
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (HOST defaults to 127.0.0.1)",
    )
    serve.add_argument("--verbose", action="store_true", help="log upstream traffic details to stderr")
    serve.add_argument("--quiet", action="store_true", help="do not print a line per tool call to stderr")

    tools = commands.add_parser(
        "tools", parents=[common], help="connect to the upstreams and list the tools the gateway exposes"
    )
    tools.add_argument("--json", action="store_true", help="print JSON instead of a table")

    policy = commands.add_parser("policy", help="check and explain the policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument(
        "--offline", action="store_true", help="do not start the upstreams (skips the checks against their tools)"
    )
    offline.add_argument("--json", action="store_true", help="print JSON")
    policy_commands.add_parser(
        "check",
        parents=[common, offline],
        help="validate upstreams.toml and policies/, and warn about rules that match no tool or name unknown arguments",
    )
    explain = policy_commands.add_parser(
        "explain", parents=[common, offline], help="show the decision on one call and every rule behind it"
    )
    explain.add_argument("tool", metavar="TOOL", help="the exposed tool name, e.g. git__git_log")
    explain.add_argument("--args", default="{}", metavar="JSON", help="the call's arguments as a JSON object")
    explain.add_argument("--client", default="", metavar="NAME", help="the client's name (for 'clients' globs)")

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--tool", metavar="GLOB", help="only calls to tools matching this glob (e.g. 'git__*')")
    filters.add_argument("--decision", choices=["allow", "rewrite", "ask", "deny"], help="only calls decided so")
    filters.add_argument("--since", metavar="WHEN", help='only events since then: "15m", "2h", or an ISO 8601 time')
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    replay = policy_commands.add_parser(
        "replay",
        parents=[common, filters, as_json],
        help="re-decide recorded calls under today's policies and list those whose decision would change",
    )
    replay.add_argument("--session", metavar="ID", help="only this session's calls")

    audit_parser = commands.add_parser("audit", help="read the audit log: sessions, timelines, live tail, verify")
    audit_commands = audit_parser.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    audit_commands.add_parser(
        "sessions", parents=[common, as_json], help="every session: client, start, end, calls, refusals"
    ).add_argument("--since", metavar="WHEN", help='only sessions with events since then ("2h", an ISO time)')
    show = audit_commands.add_parser("show", parents=[common, filters, as_json], help="one session's timeline")
    show.add_argument("session", metavar="SESSION", help="a session id (or a unique beginning of one)")
    tail = audit_commands.add_parser("tail", parents=[common, filters, as_json], help="the latest events")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing events as they are recorded")
    tail.add_argument("-n", "--lines", type=int, default=20, metavar="N", help="how many to show first (default 20)")
    tail.add_argument("--session", metavar="ID", help="only this session's events")
    tail.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="only events of this kind (repeatable, or KIND,KIND), each on its own line; without it, the "
        "catalogue events of one upstream change are folded into one line",
    )
    verify = audit_commands.add_parser(
        "verify", parents=[common, as_json], help="check the hash chain; exit 1 naming the first bad event"
    )
    verify.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="also check that this event (noted from an earlier verify) is still in the chain unchanged",
    )
    export = audit_commands.add_parser("export", parents=[common, filters], help="events as JSON lines")
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="one event per line (the default)")
    export.add_argument("--session", metavar="ID", help="only this session's events")
    _setup_parsers(commands, common)
    commands.add_parser(
        "scan",
        parents=[common, as_json],
        help="scan the upstreams' tool, prompt and template definitions for poisoning; exit 1 on a high finding",
        description="Start the upstreams once and scan every string a model reads in their definitions for hidden "
        "text (tag characters, zero-width and bidirectional characters, escapes, padding), instructions aimed at "
        "the model, references to credential files, and mentions of other servers' tools.",
    )
    commands.add_parser(
        "lock",
        parents=[common],
        help="pin the upstreams' definitions in upstreams.lock (refuses to overwrite one without --force)",
        description="Start the upstreams once and write upstreams.lock beside upstreams.toml: every tool, prompt "
        "and resource-template definition on offer, hashed, except those with high-severity poisoning findings. "
        "Once it exists, a definition that is new or differs is quarantined until approved.",
    ).add_argument("--force", action="store_true", help="re-pin everything as it is now (the old lock is backed up)")
    pins_parser = commands.add_parser("pins", help="review and approve definitions that are new, changed or poisoned")
    pins_commands = pins_parser.add_subparsers(dest="pins_command", required=True, metavar="SUBCOMMAND")
    pins_commands.add_parser(
        "status", parents=[common, as_json], help="what is pinned, new, changed, missing or quarantined; exit 1 if any"
    )
    pins_commands.add_parser(
        "diff", parents=[common], help="the pinned and the offered definition side by side, hidden characters shown"
    ).add_argument("selector", nargs="?", metavar="UPSTREAM[.NAME]", help="only this upstream or definition")
    pins_commands.add_parser(
        "approve",
        parents=[common],
        help="pin what is offered now (recorded in the audit log); a running gateway follows",
    ).add_argument("selector", metavar="UPSTREAM[.NAME]", help="a whole upstream, or one tool, prompt or template")
    return parser


def _setup_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    clients = sorted(CLIENTS)
    location = argparse.ArgumentParser(add_help=False)
    location.add_argument(
        "--path", type=Path, metavar="FILE", help="the client's configuration file, if not the usual one"
    )
    location.add_argument(
        "--project",
        action="store_true",
        help="the project's file in the current directory (.mcp.json, .cursor/mcp.json, .vscode/mcp.json, "
        ".gemini/settings.json)",
    )
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--offline", action="store_true", help="do not start the servers to list their tools")
    where = argparse.ArgumentParser(add_help=False, parents=[location])
    where.add_argument("client", metavar="CLIENT", choices=clients, help=f"one of: {', '.join(clients)}")
    where.add_argument("--dry-run", action="store_true", help="print the change instead of making it")

    registering = commands.add_parser(
        "register",
        parents=[common, where],
        help="write the gateway into an agent client's MCP configuration",
        description="Write the gateway's entry into an agent client's MCP configuration file, keeping everything "
        "else in it. The original is backed up beside it; running it again changes nothing.",
    )
    registering.add_argument("--remove", action="store_true", help="take the gateway's entry out again")
    registering.add_argument(
        "--name",
        metavar="NAME",
        help="the entry's name (default: [gateway] name, mcp-armor): a second entry, or one that no other scope has",
    )

    importing = commands.add_parser(
        "import",
        parents=[common, where, listing],
        help="move an agent client's MCP servers into upstreams.toml, behind the gateway",
        description="Add the client's MCP servers to upstreams.toml (with a first policy each: tools the server "
        "marks read-only allowed) and replace them in the client's file with the gateway. Servers that cannot be "
        "fronted as they are stay in the client, and are named. Exit status 1 if any did.",
    )
    importing.add_argument("--keep", action="store_true", help="leave the client's file as it is")

    init = commands.add_parser(
        "init",
        parents=[location, listing],
        help="write a starter upstreams.toml and policies/ (default deny)",
        description="Write a commented upstreams.toml and policies/ (default deny) into DIRECTORY. With --from, "
        "declare a client's servers as upstreams (the client's file is not changed) with a first policy each.",
    )
    init.add_argument("directory", nargs="?", default=".", metavar="DIRECTORY", help="where (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite existing files (they are backed up)")
    init.add_argument(
        "--from", dest="from_client", choices=clients, metavar="CLIENT", help="declare this client's servers"
    )

    upstream = commands.add_parser(
        "upstream",
        help="add, remove and list upstreams in upstreams.toml",
        description="Edit upstreams.toml. Comments are kept; where an edit cannot be made in place (an upstream "
        "written as an inline table, say) the file is rewritten and its comments are lost, which is said.",
    )
    upstream_commands = upstream.add_subparsers(dest="upstream_command", required=True, metavar="SUBCOMMAND")
    add = upstream_commands.add_parser(
        "add",
        parents=[common],
        help="add an upstream: NAME -- COMMAND ARGS... (stdio) or NAME --url URL (streamable HTTP)",
        usage="mcp-armor upstream add NAME [options] (-- COMMAND [ARGS...] | --url URL [--header K=V ...])",
        description="Add an upstream to upstreams.toml; everything after -- is its command line. Comments in the "
        "file are kept.",
    )
    add.add_argument("name", metavar="NAME", help="the upstream's name (its tools are exposed as NAME__TOOL)")
    add.add_argument("--url", metavar="URL", help="a streamable HTTP server's URL")
    add.add_argument("--header", action="append", default=[], metavar="K=V", help="an HTTP header (repeatable)")
    add.add_argument(
        "--env", action="append", default=[], metavar="K=V", help='an environment variable; "${VAR}" passes one on'
    )
    add.add_argument("--cwd", metavar="DIR", help="the command's working directory (relative to upstreams.toml)")
    add.add_argument("--check", action="store_true", help="start it once and list its tools before writing")
    upstream_commands.add_parser("remove", parents=[common], help="remove an upstream").add_argument(
        "name", metavar="NAME"
    )
    upstream_commands.add_parser(
        "list", parents=[common], help="the upstreams as written (no variable expanded, no secret shown)"
    ).add_argument("--json", action="store_true", help="print JSON")


SETUP_COMMANDS = {
    "register": register.register_command,
    "import": importing.import_command,
    "init": importing.init_command,
    "upstream": upstreams.upstream_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # `upstream add NAME [options] -- COMMAND ARGS...`: what follows `--` is the upstream's command line,
    # options and all (argparse would bind an optional positional list before the options are read).
    command_line = words[words.index("--") + 1 :] if "--" in words else []
    args = parser.parse_args(words[: words.index("--")] if "--" in words else words)
    if "--" in words and (args.command, getattr(args, "upstream_command", None)) != ("upstream", "add"):
        parser.error("'--' introduces an upstream's command line, in `upstream add NAME -- COMMAND ARGS...` only")
    args.argv = command_line
    _configure_logging(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    try:
        status = _run(parser, args)
        sys.stdout.flush()  # here, so that a reader gone early is seen below and not at the interpreter's exit
    except BrokenPipeError:
        # The final flush at exit would fail again on the closed pipe: hand it /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE
    return status


BROKEN_PIPE = 128 + 13
"""The exit status of a command whose reader closed its output early (a shell's status for SIGPIPE)."""


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command in SETUP_COMMANDS:
            return SETUP_COMMANDS[args.command](args)
        # An upstream whose variable is not set is read as unavailable, and `[gateway.http] token` is needed
        # by `serve --http` alone: no command needs the variables of what it does not use.
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(parser, config, args.http)
        if args.command == "policy":
            return _policy(config, args)
        if args.command == "audit":
            return _audit(config, args)
        if args.command == "scan":
            return anyio.run(pins.scan, config, args.json)
        if args.command == "lock":
            return anyio.run(pins.lock, config, args.force)
        if args.command == "pins":
            return _pins(config, args)
        return anyio.run(_tools, config, args.json)
    except GatewayError as exc:
        print(f"mcp-armor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _policy(config: Config, args: argparse.Namespace) -> int:
    if args.policy_command == "check":
        return anyio.run(policy.check, config, args.offline, args.json)
    if args.policy_command == "explain":
        return anyio.run(policy.explain, config, args)
    return anyio.run(policy.replay, config, _filters(args), args.json)


def _pins(config: Config, args: argparse.Namespace) -> int:
    if args.pins_command == "status":
        return anyio.run(pins.status, config, args.json)
    if args.pins_command == "diff":
        return anyio.run(pins.diff, config, args.selector)
    return anyio.run(pins.approve, config, args.selector)


def _audit(config: Config, args: argparse.Namespace) -> int:
    command = args.audit_command
    if command == "sessions":
        since = audit.parse_since(args.since) if args.since else None
        return audit.sessions(config, Filters(since=since), args.json)
    if command == "show":
        return audit.show(config, args.session, _filters(args), args.json)
    if command == "tail":
        return audit.tail(config, _filters(args), args.lines, args.follow, args.json)
    if command == "verify":
        return audit.verify(config, args.anchor, args.json)
    return audit.export(config, _filters(args))


def _filters(args: argparse.Namespace) -> Filters:
    since = audit.parse_since(args.since) if args.since else None
    kinds = audit.parse_kinds(getattr(args, "kind", None))
    session = getattr(args, "session", None)
    return Filters(session=session, tool=args.tool, decision=args.decision, since=since, kinds=kinds)


def _configure_logging(*, verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcp-armor %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("gateway").setLevel(logging.DEBUG if verbose else logging.INFO)
    calls = logging.StreamHandler(sys.stderr)
    calls.setFormatter(logging.Formatter("mcp-armor: %(message)s"))
    monitor = logging.getLogger("gateway.monitor")
    monitor.handlers[:] = [calls]
    monitor.propagate = False
    monitor.setLevel(logging.WARNING if quiet else logging.INFO)


def _serve(parser: argparse.ArgumentParser, config: Config, http: str | None) -> int:
    from gateway.downstream.serve import serve_http, serve_stdio

    if http is None:
        anyio.run(serve_stdio, config)
        return 0
    host, _, port_text = http.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        parser.error(f"--http: expected HOST:PORT (e.g. 127.0.0.1:8765), got {http!r}")
    anyio.run(serve_http, config, host or "127.0.0.1", int(port_text))
    return 0


async def _tools(config: Config, as_json: bool) -> int:
    engine = load_engine(config)
    upstreams = await connect(config)
    engine.index_tools(upstreams.catalog.tools)
    rows: list[dict[str, Any]] = [
        {
            "name": tool.name,
            "upstream": tool.upstream,
            "upstream_tool": tool.upstream_name,
            "shortened": tool.name != f"{tool.upstream}{config.gateway.separator}{tool.upstream_name}",
            "policy": _policy_summary(engine, tool.name),
            "description": tool.model.description or "",
        }
        for tool in upstreams.catalog.tools.values()
    ]
    rows += [
        {
            "name": name,
            "upstream": held.item.upstream,
            "upstream_tool": held.item.name,
            "shortened": name != f"{held.item.upstream}{config.gateway.separator}{held.item.name}",
            "policy": f"quarantined ({held.verdict}): see `mcp-armor pins diff {held.item.label}`",
            "description": str(held.item.form.get("description", "")),
        }
        for name, held in upstreams.quarantined.items()
    ]
    if as_json:
        down, problems = upstreams.down, list(upstreams.catalog.problems)
        print(json.dumps({"tools": rows, "unavailable": down, "problems": problems}, indent=2))
    else:
        _print_tools(rows)
    upstreams.report()
    return 1 if upstreams.down else 0


def _policy_summary(engine: PolicyEngine, tool: str) -> str:
    """What policy does to a tool, for a client that no `clients` glob names."""
    if not engine.visible(tool):
        return "hidden (no rule allows it)"
    rules = engine.rules_for(tool).call
    if not rules:
        return f"{engine.policies.default.value} (default)"
    effects = sorted({rule.effect.value for rule in rules if rule.effect is not None and not rule.monitor})
    conditional = any(rule.when is not None or rule.rate is not None or rule.clients for rule in rules)
    return "/".join(effects) + (" (conditional)" if conditional else "")


def _print_tools(rows: list[dict[str, Any]]) -> None:
    table = [
        (row["name"], row["upstream"], row["upstream_tool"], row["policy"] + ("  (name shortened)" * row["shortened"]))
        for row in rows
    ]
    print_table(("TOOL", "UPSTREAM", "UPSTREAM TOOL", "POLICY"), table, empty="(no tools exposed)")
