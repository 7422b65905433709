"""The `mcp-armor` command line: argument parsing and printing, no business logic.

A mistake of the user's (bad config, bad argument) is one line on stderr and exit status 2; an
upstream that could not be reached makes `tools` exit 1 after printing what it could.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from gateway import __version__
from gateway.catalog import Catalog
from gateway.config import Config, load_config
from gateway.errors import GatewayError
from gateway.policy import PolicyEngine
from gateway.policy_files import load_engine, load_policies
from gateway.policy_lint import lint
from gateway.upstreams import UpstreamPool

DEFAULT_CONFIG = "upstreams.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-armor", description="A guarding gateway for the Model Context Protocol.")
    parser.add_argument("--version", action="version", version=f"mcp-armor {__version__}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(verbose=getattr(args, "verbose", False))
    try:
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(parser, config, args.http)
        if args.command == "policy" and args.policy_command == "check":
            return anyio.run(_policy_check, config, args.offline, args.json)
        if args.command == "policy":
            return anyio.run(_policy_explain, config, args)
        return anyio.run(_tools, config, args.json)
    except GatewayError as exc:
        print(f"mcp-armor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _configure_logging(*, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcp-armor %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("gateway").setLevel(logging.DEBUG if verbose else logging.INFO)


def _serve(parser: argparse.ArgumentParser, config: Config, http: str | None) -> int:
    from gateway.transports import serve_http, serve_stdio

    if http is None:
        anyio.run(serve_stdio, config)
        return 0
    host, _, port_text = http.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        parser.error(f"--http: expected HOST:PORT (e.g. 127.0.0.1:8765), got {http!r}")
    anyio.run(serve_http, config, host or "127.0.0.1", int(port_text))
    return 0


@dataclass
class _Upstreams:
    """What the upstreams offered when the command connected to them once."""

    catalog: Catalog = field(default_factory=Catalog)
    down: dict[str, str] = field(default_factory=dict)

    def report(self) -> None:
        for name, reason in self.down.items():
            print(f"mcp-armor: upstream '{name}' unavailable: {reason}", file=sys.stderr)
        for problem in self.catalog.problems:
            print(f"mcp-armor: {problem}", file=sys.stderr)


async def _connect(config: Config) -> _Upstreams:
    pool = UpstreamPool(config)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await pool.wait_settled(max(config.gateway.startup_timeout, 30.0))
        catalog = pool.catalog  # taken now: closing the upstreams withdraws their tools
        down = {up.name: up.last_error or "did not start in time" for up in pool.upstreams.values() if not up.is_up}
        tg.cancel_scope.cancel()
    return _Upstreams(catalog, down)


async def _tools(config: Config, as_json: bool) -> int:
    engine = load_engine(config)
    upstreams = await _connect(config)
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
    if as_json:
        down, problems = upstreams.down, list(upstreams.catalog.problems)
        print(json.dumps({"tools": rows, "unavailable": down, "problems": problems}, indent=2))
    else:
        _print_table(rows)
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


async def _policy_check(config: Config, offline: bool, as_json: bool) -> int:
    policies = load_policies(config.policy_dir)
    upstreams = _Upstreams() if offline else await _connect(config)
    schemas = {name: tool.source.definition["inputSchema"] for name, tool in upstreams.catalog.tools.items()}
    warnings = [] if offline else lint(policies, schemas)
    warnings += [
        f"upstream '{name}' unavailable ({reason}): its tools were not checked"
        for name, reason in upstreams.down.items()
    ]
    summary = {
        "ok": True,
        "policies": str(config.policy_dir),
        "revision": policies.revision,
        "files": list(policies.files),
        "rules": len(policies.rules),
        "default": policies.default.value,
        "warnings": warnings,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    for warning in warnings:
        print(f"warning: {warning}")
    print(
        f"ok: {len(policies.rules)} rules in {len(policies.files)} files, default {policies.default.value}, "
        f"revision {policies.revision} ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})"
    )
    return 0


async def _policy_explain(config: Config, args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.args)
    except ValueError as exc:
        raise GatewayError(f"--args: not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise GatewayError(f"--args: must be a JSON object, got {type(arguments).__name__}")
    engine = load_engine(config)
    upstreams = _Upstreams() if args.offline else await _connect(config)
    engine.index_tools(upstreams.catalog.tools)
    notes: list[str] = []
    refusal = ""
    tool = upstreams.catalog.tools.get(args.tool)
    if not args.offline and tool is None:
        notes.append(f"no upstream exposes '{args.tool}' now: a call to it is refused as an unknown tool")
    violation = tool.source.violation(arguments) if tool is not None else None
    if violation is not None:
        refusal = f"arguments do not match the tool's input schema: {violation}"
    if not engine.visible(args.tool, client=args.client):
        notes.append("no rule can ever allow it for this client: it is hidden from tools/list")
    decision, trace = engine.explain(args.tool, arguments, now=time.monotonic(), client=args.client)
    effect = "deny" if refusal else decision.effect.value
    reason = refusal or decision.reason
    if args.json:
        record = {**decision.to_record(), "decision": effect, "reason": reason, "notes": notes}
        record["considered"] = [{"rule": rule_id, "verdict": verdict} for rule_id, verdict in trace]
        print(json.dumps(record, indent=2))
    else:
        print(f"decision: {effect}")
        print(f"reason:   {reason}")
        if decision.arguments is not None:
            print(f"rewritten arguments: {json.dumps(decision.arguments, sort_keys=True)}")
        if decision.would is not None:
            print(f"monitor:  would {decision.would.value} (rules {', '.join(decision.monitored)})")
        print(f"policy revision: {decision.revision}")
        for note in notes:
            print(f"note: {note}")
        if trace:
            width = max(len(rule_id) for rule_id, _ in trace)
            print("rules:")
            for rule_id, verdict in trace:
                print(f"  {rule_id:<{width}}  {verdict}")
    upstreams.report()
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(no tools exposed)")
        return
    width = max(len("TOOL"), *(len(row["name"]) for row in rows))
    up_width = max(len("UPSTREAM"), *(len(row["upstream"]) for row in rows))
    tool_width = max(len("UPSTREAM TOOL"), *(len(row["upstream_tool"]) for row in rows))
    print(f"{'TOOL':<{width}}  {'UPSTREAM':<{up_width}}  {'UPSTREAM TOOL':<{tool_width}}  POLICY")
    for row in rows:
        note = "" if not row["shortened"] else "  (name shortened)"
        print(
            f"{row['name']:<{width}}  {row['upstream']:<{up_width}}  {row['upstream_tool']:<{tool_width}}  "
            f"{row['policy']}{note}"
        )
