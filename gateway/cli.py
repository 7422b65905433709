"""The `mcp-armor` command line: argument parsing and printing, no business logic.

A mistake of the user's (bad config, bad argument) is one line on stderr and exit status 2; an
upstream that could not be reached makes `tools` exit 1 after printing what it could.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from gateway import __version__
from gateway.config import Config, load_config
from gateway.errors import GatewayError
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(verbose=getattr(args, "verbose", False))
    try:
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(parser, config, args.http)
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


async def _tools(config: Config, as_json: bool) -> int:
    pool = UpstreamPool(config)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await pool.wait_settled(max(config.gateway.startup_timeout, 30.0))
        catalog = pool.catalog
        down = {up.name: up.last_error or "did not start in time" for up in pool.upstreams.values() if not up.is_up}
        tg.cancel_scope.cancel()
    rows: list[dict[str, Any]] = [
        {
            "name": tool.name,
            "upstream": tool.upstream,
            "upstream_tool": tool.upstream_name,
            "shortened": tool.name != f"{tool.upstream}{config.gateway.separator}{tool.upstream_name}",
            "description": tool.model.description or "",
        }
        for tool in catalog.tools.values()
    ]
    if as_json:
        print(json.dumps({"tools": rows, "unavailable": down, "problems": list(catalog.problems)}, indent=2))
    else:
        _print_table(rows)
    for name, reason in down.items():
        print(f"mcp-armor: upstream '{name}' unavailable: {reason}", file=sys.stderr)
    for problem in catalog.problems:
        print(f"mcp-armor: {problem}", file=sys.stderr)
    return 1 if down else 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(no tools exposed)")
        return
    width = max(len(row["name"]) for row in rows)
    up_width = max(len(row["upstream"]) for row in rows)
    print(f"{'TOOL':<{width}}  {'UPSTREAM':<{up_width}}  UPSTREAM TOOL")
    for row in rows:
        note = "" if not row["shortened"] else "  (name shortened)"
        print(f"{row['name']:<{width}}  {row['upstream']:<{up_width}}  {row['upstream_tool']}{note}")
