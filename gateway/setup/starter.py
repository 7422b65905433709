"""Starter files: `mcp-armor init`'s `upstreams.toml` and `policies/`, and a first policy per new upstream.

A new upstream's tools are refused until a rule allows them (the default is deny). So that putting
the gateway in front of a server does not leave the agent with nothing, a first policy file allows
the tools the server itself marks read-only (`annotations.readOnlyHint`) and lists the others,
refused, in comments, with a ready rule to ask a person instead. Read-only is the server's claim,
not a fact the gateway can check: the file says so, for the person reviewing it.
"""

from __future__ import annotations

import os
import re
import sys
from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.catalog.listing import ExposedTool
from gateway.config.edit import ConfigText, toml_value, upstream_table
from gateway.config.models import parse_config
from gateway.errors import ConfigError
from gateway.policy.paths import fold, normalise_path
from gateway.upstream.connect import connect

CONFIG_TEMPLATE = """\
# mcp-armor configuration: the gateway's settings and the upstream MCP servers it fronts.
# Relative paths resolve against this file's directory. Check it with `mcp-armor policy check`.
# Add servers with `mcp-armor upstream add NAME -- COMMAND ARGS...` (or `--url URL`), or move an
# agent client's servers here with `mcp-armor import CLIENT`. Comments in this file are kept when
# those commands edit it.

[gateway]
name = "mcp-armor"        # the name agent clients know the gateway by
separator = "__"          # exposed tool name = <upstream><separator><tool>
policies = "policies"     # every *.toml in it is loaded; reloaded when a file changes (or on SIGHUP)
mode = "enforce"          # "monitor": record what policy would refuse or ask, refuse nothing
call_timeout = "60s"
startup_timeout = "10s"   # the first tools/list waits this long for upstreams still starting
ask_timeout = "2m"        # how long a person has to approve an "ask" call
# audit = ".mcp-armor/audit.db"   # the audit log (SQLite), beside this file unless absolute
# audit_sync = "normal"           # "full": every commit also survives power loss

# A local server, started by the gateway over stdio (no shell; a minimal environment plus `env`):
# [upstreams.files]
# command = "npx"
# args = ["-y", "@modelcontextprotocol/server-filesystem", "."]
# env = { LOG_LEVEL = "info" }    # "${VAR}" takes VAR from the gateway's environment

# A remote server over streamable HTTP:
# [upstreams.search]
# url = "https://search.example/mcp"
# headers = { Authorization = "Bearer ${SEARCH_TOKEN}" }
"""

DEFAULTS_TEMPLATE = """\
# mcp-armor policies: every *.toml file in this directory is loaded (order does not matter).
# Anything no rule allows is refused, and a tool no rule can ever allow is hidden from the agent.
# Check edits with `mcp-armor policy check`; try a call with `mcp-armor policy explain TOOL --args '{...}'`.
# A running gateway reloads this directory when a file changes (or on SIGHUP); a set that does not
# compile is not installed, and the previous one stays in force.

[defaults]
effect = "deny"

# Mask credentials in whatever any tool, resource or prompt returns, before the agent (and its model
# provider) sees it.
[[rule]]
id = "redact-credentials"
tools = ["*"]
resources = ["*"]
prompts = ["*"]
on = "result"
redact = [
    'AKIA[0-9A-Z]{16}',                                                   # AWS access key ids
    'gh[pousr]_[A-Za-z0-9]{36,}',                                         # GitHub tokens
    '-----BEGIN [A-Z ]*PRIVATE KEY-----[\\s\\S]*?-----END [A-Z ]*PRIVATE KEY-----',
    '(?i)(password|passwd|secret|api[_-]?key)\\s*[:=]\\s*\\S+',
]

# Withhold any result carrying binary content (images, audio, blobs of a type that is not text, or that
# do not read as text), which patterns cannot read reliably: uncomment to turn it on. It is off because
# screenshots and other media are what some tools are for; `binary = { contains = { pattern =
# "^image/" } }` under `when.properties` narrows it to images.
# [[rule]]
# id = "no-binary-results"
# tools = ["*"]
# resources = ["*"]
# prompts = ["*"]
# on = "result"
# effect = "deny"
# reason = "it carries binary content"
# when = { required = ["binary"] }
"""


@dataclass(frozen=True)
class Listing:
    """What one upstream offered when it was started once, or why it could not be listed."""

    tools: Sequence[ExposedTool] = ()
    problem: str | None = None


async def list_upstreams(
    config: ConfigText, names: Iterable[str], known: Mapping[str, str] | None = None
) -> dict[str, Listing]:
    """Start these upstreams of `config` once and list their tools.

    Variables come from this shell's environment, and from `known` (values the client will pass).
    """
    environ = ChainMap(dict(known or {}), dict(os.environ))
    gateway = config.data.get("gateway", {})
    listings: dict[str, Listing] = {}
    startable: dict[str, Any] = {}
    for name in names:
        table = config.upstreams[name]
        if table.get("enabled") is False:
            listings[name] = Listing(problem="it is disabled (enabled = false)")
            continue
        try:
            parse_config(
                {"gateway": gateway, "upstreams": {name: table}}, config.path.resolve(), label="", environ=environ
            )
        except ConfigError as exc:
            listings[name] = Listing(problem=str(exc).removeprefix(": "))
            continue
        startable[name] = table
    if startable:
        live = parse_config(
            {"gateway": gateway, "upstreams": startable},
            config.path.resolve(),
            label=str(config.path),
            environ=environ,
        )
        found = await connect(live)
        for name in startable:
            tools = [tool for tool in found.catalog.tools.values() if tool.upstream == name]
            listings[name] = Listing(tools, found.down.get(name))
    return listings


@dataclass(frozen=True)
class StarterFile:
    """A starter file's text, and one line saying what it does."""

    text: str
    summary: str


DEFAULTS = StarterFile(DEFAULTS_TEMPLATE, "default deny; credentials masked in every result")


FILESYSTEM_PACKAGE = "@modelcontextprotocol/server-filesystem"
SECRET_FILES = (
    r"(^|/)(\.env(\..*)?|\.netrc|\.npmrc|\.pypirc|id_(rsa|dsa|ecdsa|ed25519)|[^/]*\.(pem|key|p12|pfx)"
    r"|credentials(\.json)?|\.ssh|\.aws)(/|$)"
)
"""A normalised path naming a file that holds secrets, or inside `.ssh`/`.aws` (as `schemas/secret-file.json`)."""
CASE_INSENSITIVE = sys.platform == "darwin"
"""Whether a starter `[[paths]]` says `case = "insensitive"` (macOS file systems are, by default)."""


def upstream_policy(
    upstream: str, listing: Listing, *, written_by: str, separator: str, table: Mapping[str, Any] | None = None
) -> StarterFile:
    """The first policy file of an upstream: its read-only tools allowed, the rest listed, refused.

    For `server-filesystem` serving absolute directories (`table` is its `[upstreams.NAME]`), its path
    arguments are declared, the read-only tools allowed only inside those directories, and secret
    files in them denied."""
    today = datetime.now(UTC).date().isoformat()
    lines = [f"# Upstream '{upstream}': first rules, written by `mcp-armor {written_by}` on {today}."]
    if listing.problem is not None:
        lines += [
            f"# Its tools could not be listed then ({listing.problem}),",
            "# so every tool of it is refused until a rule here allows it. When it starts, list them with",
            "# `mcp-armor tools` and add rules, e.g.:",
            "#",
            "# [[rule]]",
            f'# id = "{upstream}-read-only"',
            f'# tools = ["{upstream}{separator}TOOL"]',
            '# effect = "allow"',
        ]
        summary = "no rules yet (its tools could not be listed): every tool of it is refused until a rule allows it"
        return StarterFile("\n".join(lines) + "\n", summary)
    read_only = [tool for tool in listing.tools if _read_only(tool)]
    others = [tool for tool in listing.tools if not _read_only(tool)]
    lines += [
        "# Allowed: the tools the server marks read-only (annotations.readOnlyHint). That mark is the",
        "# server's own claim; review the list. Every other tool is refused until a rule allows it.",
    ]
    roots = _filesystem_roots(table or {})
    if read_only:
        names = [tool.name for tool in read_only]
        listed = [f"    {toml_value(name)}," for name in names]
        lines += ["", "[[rule]]", f'id = "{upstream}-read-only"', "tools = [", *listed, "]", 'effect = "allow"']
        if roots:
            lines += _inside(roots)
    else:
        lines += ["# (It marks none of its tools read-only.)"]
    if others:
        width = max(len(tool.name) for tool in others)
        lines += ["", "# Not marked read-only, so refused for now:"]
        lines += [f"#   {tool.name.ljust(width)}  {_hints(tool)}".rstrip() for tool in others]
        lines += [
            "#",
            "# To let a person approve each call to them instead, uncomment:",
            "# [[rule]]",
            f'# id = "{upstream}-ask"',
            f"# tools = {toml_value([tool.name for tool in others])}",
            '# effect = "ask"',
        ]
    summary = (
        f"allows {_count(read_only, 'read-only tool')}; {_count(others, 'other')} refused until a rule allows them"
    )
    if roots:
        lines += _paths(upstream, separator, roots)
        summary += f"; paths normalised, reads only inside {', '.join(roots)}, secret files denied"
    return StarterFile("\n".join(lines) + "\n", summary)


def _filesystem_roots(table: Mapping[str, Any]) -> list[str]:
    """The directories a `server-filesystem` upstream serves, when every one is absolute; else none."""
    command, args = table.get("command"), table.get("args", [])
    if not isinstance(command, str) or not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        return []
    packages = [
        index for index, arg in enumerate(args) if arg == FILESYSTEM_PACKAGE or arg.startswith(FILESYSTEM_PACKAGE + "@")
    ]
    if packages:
        rest = args[packages[0] + 1 :]
    elif Path(command).name == "mcp-server-filesystem":
        rest = args
    else:
        return []
    try:
        return [normalise_path(arg, None) for arg in rest if not arg.startswith("-")]
    except ValueError:  # a relative directory: relative to where the server starts, unknown here
        return []


def _inside(roots: Sequence[str]) -> list[str]:
    """The read-only rule's condition: every declared path inside one of the directories."""
    folded = [fold(root) if CASE_INSENSITIVE else root for root in roots]
    inside = "^(" + "|".join(re.escape(root.rstrip("/")) for root in folded) + ")(/|$)"
    where = f"{{ pattern = {toml_value(inside)} }}"
    return [f"when = {{ properties = {{ path = {where}, paths = {where} }} }}  # only inside its directories"]


def _paths(upstream: str, separator: str, roots: Sequence[str]) -> list[str]:
    """The path declaration of a `server-filesystem` upstream, and the secret-file denial."""
    secret = f"{{ pattern = {toml_value(SECRET_FILES)} }}"
    return [
        "",
        "# Its path arguments, normalised before any rule sees them (and forwarded so): absolute, with",
        "# '.', '..' and extra slashes resolved. A rule cannot see symlinks: keep none in these directories.",
        "[[paths]]",
        f"tools = {toml_value([upstream + separator + '*'])}",
        'arguments = ["path", "paths", "source", "destination"]',
        f"root = {toml_value(roots[0])}",
        *(['case = "insensitive"'] if CASE_INSENSITIVE else []),
        "",
        "[[rule]]",
        f'id = "{upstream}-no-secret-files"',
        f"tools = {toml_value([upstream + separator + '*'])}",
        'effect = "deny"',
        'reason = "secret files (.env, keys, credentials) stay off-limits"',
        "when = { anyOf = [",
        f'    {{ required = ["path"], properties = {{ path = {secret} }} }},',
        f'    {{ required = ["paths"], properties = {{ paths = {secret} }} }},',
        "] }",
    ]


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"


def _read_only(tool: ExposedTool) -> bool:
    annotations = tool.model.annotations
    return annotations is not None and annotations.read_only_hint is True


def _hints(tool: ExposedTool) -> str:
    annotations = tool.model.annotations
    if annotations is None:
        return ""
    hints = [
        word
        for word, flag in (
            ("destructive", annotations.destructive_hint),
            ("open-world", annotations.open_world_hint),
            ("idempotent", annotations.idempotent_hint),
        )
        if flag
    ]
    return "(" + ", ".join(hints) + ")" if hints else ""


def starter_config(upstreams: Mapping[str, Mapping[str, Any]]) -> str:
    """`init`'s `upstreams.toml`: the commented settings, then these upstreams."""
    tables = "\n".join(upstream_table(name, table) for name, table in upstreams.items())
    return CONFIG_TEMPLATE + ("\n" + tables if tables else "")


def policy_path(policy_dir: Path, upstream: str) -> Path:
    return policy_dir / f"{upstream}.toml"
