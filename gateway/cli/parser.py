"""The `mcp-armor` command line's arguments: every command, subcommand and option, with its help."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config.source import DEFAULT_CONFIG
from gateway.setup.clients import CLIENTS


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


def parser() -> argparse.ArgumentParser:
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

    console = commands.add_parser(
        "console",
        parents=[common],
        help="the audit log and the approval queue, live in the browser, with approve/deny and pins",
        description="Serve the console at http://HOST:PORT/console/ and print the URL to open, with a random token "
        "in it (exchanged for a session cookie). Loopback only, unless [gateway.http] sets TLS and principals exist "
        "(then principals with role:approver or role:viewer sign in with their own token).",
    )
    console.add_argument(
        "--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="where to listen (default: a free loopback port)"
    )

    wrap = commands.add_parser(
        "wrap",
        help="guard one server in place over stdio: mcp-armor wrap [OPTIONS] -- COMMAND ARGS...",
        description="Serve one MCP server (the command line after '--') through the gateway over stdio, "
        "its tool and prompt names unchanged. Settings, policies and the audit log come from --config, "
        "else from ~/.mcp-armor/wrap/ (written on first use; its policy denies everything until edited).",
    )
    wrap.add_argument("--config", metavar="PATH", help="take the gateway's settings from this upstreams.toml")
    wrap.add_argument("--policies", metavar="DIR", help="the policy directory (instead of the config's)")
    wrap.add_argument("--name", metavar="NAME", help="the server's upstream name (default: its command's name)")
    wrap.add_argument("--verbose", action="store_true", help="log upstream traffic details to stderr")
    wrap.add_argument("--quiet", action="store_true", help="do not print a line per tool call to stderr")

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
    explain.add_argument(
        "--principal", default="", metavar="NAME", help="the authenticated principal (for 'principals' globs)"
    )
    explain.add_argument(
        "--attribute",
        action="append",
        default=[],
        metavar="ATTR",
        help="an attribute of the principal, e.g. group:admins (repeatable; for 'attributes' globs)",
    )

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--tool", metavar="GLOB", help="only calls to tools matching this glob (e.g. 'git__*')")
    filters.add_argument("--decision", choices=["allow", "rewrite", "ask", "deny"], help="only calls decided so")
    filters.add_argument("--since", metavar="WHEN", help='only events since then: "15m", "2h", or an ISO 8601 time')
    filters.add_argument("--principal", metavar="GLOB", help="only sessions of principals matching this glob")
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
    sessions = audit_commands.add_parser(
        "sessions", parents=[common, as_json], help="every session: client, principal, start, end, calls, refusals"
    )
    sessions.add_argument("--since", metavar="WHEN", help='only sessions with events since then ("2h", an ISO time)')
    sessions.add_argument("--principal", metavar="GLOB", help="only sessions of principals matching this glob")
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
    migrate = audit_commands.add_parser(
        "migrate",
        parents=[common],
        help="copy this config's SQLite audit log into a PostgreSQL store, chain and all",
        description="Copy every event of the config's audit log (the SQLite file) into the shared store at URL, "
        "keeping each event's sequence number and hash, so the chain verifies in its new home. The log must verify "
        "first, and the store's chain must be empty. Then set [gateway] store = URL.",
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user:password@host:port/database")
    store = commands.add_parser("store", help="the shared PostgreSQL store ([gateway] store)")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    store_commands.add_parser(
        "migrate",
        parents=[common],
        help="create or update the store's schema (the gateway does it too when it starts)",
        description="Create the mcp_armor schema in the store [gateway] store names, or bring it to this version. "
        "Run it with a role that may create tables when the gateway's own role may not.",
    )
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
    _principal_parsers(commands, common, as_json)
    _approvals_parsers(commands, common, as_json)
    return parser


def _approvals_parsers(commands: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    approvals = commands.add_parser(
        "approvals",
        help="list, show, approve and deny the calls waiting for a person in the approval queue",
        description="Calls a rule sends to `ask` wait in the approval queue (<state>/approvals.db), shared by "
        "every gateway process on the config. A decision taken here is recorded in the audit log first.",
    )
    approvals_commands = approvals.add_subparsers(dest="approvals_command", required=True, metavar="SUBCOMMAND")
    listing = approvals_commands.add_parser(
        "list",
        parents=[common, as_json],
        help="the pending approvals, then per rule how often it asked and what came of it",
    )
    listing.add_argument("--all", action="store_true", help="the decided, expired and withdrawn ones too")
    listing.add_argument(
        "--since", metavar="WHEN", help='the window of --all and of the counts: "24h" (the default), "7d", an ISO time'
    )
    approvals_commands.add_parser(
        "show", parents=[common, as_json], help="the whole call: who, the tool, every argument, the rule, its state"
    ).add_argument("id", metavar="ID", help="the approval's id (from `approvals list`)")
    approve = approvals_commands.add_parser(
        "approve",
        parents=[common, as_json],
        help="show the call, ask for confirmation, and approve it (recorded in the audit log)",
    )
    approve.add_argument("id", metavar="ID", help="the approval's id (from `approvals list`)")
    approve.add_argument(
        "--yes", action="store_true", help="do not ask for confirmation (required when not on a terminal)"
    )
    approve.add_argument("--reason", default="", metavar="TEXT", help="a note kept with the decision")
    deny = approvals_commands.add_parser(
        "deny",
        parents=[common, as_json],
        help="show the call and deny it (recorded in the audit log); the agent is told the reason",
    )
    deny.add_argument("id", metavar="ID", help="the approval's id (from `approvals list`)")
    deny.add_argument("--reason", default="", metavar="TEXT", help="why: the agent's refusal says it")


def _principal_parsers(commands: Any, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    principal = commands.add_parser(
        "principal",
        help="issue, list and revoke the tokens named callers use over HTTP",
        description="Principals are the named callers of `serve --http`; each holds one or more tokens "
        "(Authorization: Bearer <token>). Only a hash of each token is stored, in the state directory.",
    )
    principal_commands = principal.add_subparsers(dest="principal_command", required=True, metavar="SUBCOMMAND")
    add = principal_commands.add_parser(
        "add",
        parents=[common, as_json],
        help="a new token for NAME (made a principal if new; another token for an existing one, to rotate)",
    )
    add.add_argument("name", metavar="NAME", help="the principal's name (policy rules match it)")
    add.add_argument(
        "--expires", metavar="WHEN", help='a duration ("30d", "12h") or an ISO 8601 time; never, without it'
    )
    add.add_argument(
        "--role", action="append", default=[], metavar="ROLE", help="a role (repeatable): attribute role:ROLE"
    )
    principal_commands.add_parser(
        "list", parents=[common, as_json], help="the principals, their roles and their tokens (never a secret)"
    )
    principal_commands.add_parser(
        "revoke", parents=[common], help="revoke one token (by its id) or every token of a principal (by its name)"
    ).add_argument("selector", metavar="NAME|TOKEN_ID")


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
