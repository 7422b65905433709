"""`mcp-armor import`: a client's MCP servers turned into upstreams, and the client pointed at the gateway.

Each server entry becomes an `[upstreams.NAME]` table: stdio `command`/`args`/`env`/`cwd`, or a
streamable HTTP `url`/`headers`. Where the client's value refers to a variable (`${VAR}`,
`${env:VAR}`, VS Code's `${input:ID}`), the table refers to an environment variable of the gateway
instead, and the gateway's entry in the client passes that variable on from the client, so a
secret stays where the user kept it. An entry that cannot be carried over faithfully (another
transport, an `envFile`, a variable the gateway cannot resolve, a name already taken by a different
upstream) is left in the client, untouched, with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config.source import UPSTREAM_NAME
from gateway.errors import Unsupported
from gateway.policy.redact import Redactor
from gateway.setup.client_files import ClientFile
from gateway.setup.clients import ClientFormat
from gateway.setup.registration import is_gateway_entry

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_BARE_OR_BRACED = re.compile(r"\$(?:(\w+)|\{([^}]+)\})")
"""Gemini CLI's references (`$VAR`, `${VAR}`), in any string of its settings."""
_CLAUDE_CODE_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_STDIO_KEYS = {"command", "args", "env", "cwd"}
_IGNORED_SILENTLY = {"type", "disabled", "description"}
_HTTP_TYPES = {"http", "streamable-http", "streamableHttp", "streamable_http"}
_TOOL_FILTERS = {"includeTools", "excludeTools"}


@dataclass
class Upstream:
    """One client server, as an upstream table."""

    key: str
    name: str
    table: dict[str, Any]
    passthrough: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportPlan:
    adds: dict[str, dict[str, Any]] = field(default_factory=dict)
    """New upstream tables, by upstream name."""
    moved: dict[str, str] = field(default_factory=dict)
    """Client entry -> upstream now fronting it (added now, or already there from an earlier import)."""
    left: dict[str, str] = field(default_factory=dict)
    """Client entry -> why it stays in the client as it is."""
    notes: list[str] = field(default_factory=list)
    passthrough: dict[str, str] = field(default_factory=dict)
    """Gateway environment variable -> the client's expression for its value."""
    removals: set[tuple[int, str]] = field(default_factory=set)
    """(index of the server table in the file, entry name) of each moved entry."""


def plan_import(
    file: ClientFile,
    existing: Mapping[str, Any],
    *,
    separator: str,
    gateway: str,
    project_dir: Path | None,
    move_secrets: bool,
) -> ImportPlan:
    """Decide, entry by entry, what moves into `upstreams.toml` (whose upstream tables are `existing`).

    `project_dir` is the workspace of a project-scoped file (what `${workspaceFolder}` means there).
    With `move_secrets`, a secret written out in an entry's `env` or `headers` stays in the client's
    file, in the gateway's entry, and `upstreams.toml` refers to it by variable.
    """
    plan = ImportPlan()
    taken = dict(existing)
    for index, table in enumerate(file.tables()):
        for key, entry in table.items():
            if key == gateway or is_gateway_entry(entry):
                continue
            try:
                upstream = convert(file.client, key, entry, project_dir=project_dir)
                if move_secrets:
                    _move_secrets(upstream, plan.passthrough)
                else:
                    upstream.notes += _secret_notes(upstream)
            except Unsupported as exc:
                plan.left[key] = str(exc)
                continue
            clash = _clash(upstream, taken, separator)
            if clash == "same":
                plan.moved[key] = upstream.name
            elif clash:
                plan.left[key] = clash
                continue
            else:
                plan.adds[upstream.name] = upstream.table
                taken[upstream.name] = upstream.table
                plan.moved[key] = upstream.name
            plan.removals.add((index, key))
            plan.passthrough.update(upstream.passthrough)
            plan.notes += upstream.notes
    return plan


def _clash(upstream: Upstream, taken: Mapping[str, Any], separator: str) -> str | None:
    name = upstream.name
    if name in taken:
        if taken[name] == upstream.table:
            return "same"
        return f"upstreams.toml already has a different upstream named '{name}'; rename one of them and import again"
    for other in taken:
        if name.startswith(other + separator) or other.startswith(name + separator):
            return f"its name '{name}' and the upstream '{other}' could expose the same tool names; rename one"
    return None


def convert(client: ClientFormat, key: str, entry: Any, *, project_dir: Path | None) -> Upstream:
    """One client entry as an upstream table; `Unsupported` if it cannot be fronted faithfully."""
    if not isinstance(entry, dict):
        raise Unsupported("the entry is not a JSON object")
    name = upstream_name(key)
    upstream = Upstream(key, name, {})
    if name != key:
        upstream.notes.append(f"'{key}' is imported as upstream '{name}' (names are lower-case a-z 0-9 _ -)")
    kind = entry.get("type")
    url = entry.get(client.url_key, entry.get("url"))
    if "envFile" in entry:
        raise Unsupported("'envFile' is not supported: put those variables in 'env' and import again")
    if filters := sorted(_TOOL_FILTERS & set(entry)):
        raise Unsupported(
            f"its '{filters[0]}' limits which tools the client offers, and the gateway would offer them all: "
            f"write that limit as policy rules, remove the key and import again"
        )
    if kind is None and client.sse_url_key in entry and client.url_key not in entry and "command" not in entry:
        kind = "sse"  # Gemini CLI reaches a `url` (as against an `httpUrl`) over SSE
    if kind in _HTTP_TYPES or (kind is None and url is not None and "command" not in entry):
        if not isinstance(url, str):
            raise Unsupported(f"'{client.url_key}' must be a string")
        upstream.table["url"] = _translate(client, url, upstream, project_dir)
        headers = _strings(entry.get("headers", {}), "headers")
        if headers:
            upstream.table["headers"] = {k: _translate(client, v, upstream, project_dir) for k, v in headers.items()}
        known = {"url", client.url_key, "headers"}
    elif kind in (None, "stdio"):
        command = entry.get("command")
        if not isinstance(command, str) or not command:
            raise Unsupported("it has neither a 'command' nor a URL")
        upstream.table["command"] = _translate(client, command, upstream, project_dir)
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise Unsupported("'args' must be a list of strings")
        if args:
            upstream.table["args"] = [_translate(client, arg, upstream, project_dir) for arg in args]
        env = _strings(entry.get("env", {}), "env")
        if env:
            upstream.table["env"] = {k: _translate(client, v, upstream, project_dir) for k, v in env.items()}
        if isinstance(entry.get("cwd"), str):
            upstream.table["cwd"] = _translate(client, entry["cwd"], upstream, project_dir)
        known = _STDIO_KEYS
    elif kind == "sse":
        raise Unsupported("it uses the SSE transport; the gateway reaches remote servers over streamable HTTP only")
    else:
        raise Unsupported(f"unknown transport type {kind!r}")
    if entry.get("disabled") is True:
        upstream.table["enabled"] = False
    for ignored in sorted(set(entry) - known - _IGNORED_SILENTLY):
        upstream.notes.append(f"'{key}': key '{ignored}' is not carried over (the gateway has no such setting)")
    return upstream


def upstream_name(key: str) -> str:
    """A client's server name as an upstream name (`^[a-z0-9][a-z0-9_-]*$`)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", key.lower()).strip("-_")
    name = re.sub(r"-{2,}", "-", name)
    return name if UPSTREAM_NAME.match(name) else "server"


def _strings(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise Unsupported(f"'{key}' must be an object of strings")
    return value


def _translate(client: ClientFormat, value: str, upstream: Upstream, project_dir: Path | None) -> str:
    """A client's string in `upstreams.toml` syntax: literals escaped, references made gateway variables."""
    pieces: list[str] = []
    position = 0
    for match in (_BARE_OR_BRACED if client.expands_bare else _REFERENCE).finditer(value):
        literal = value[position : match.start()]
        body = next(group for group in match.groups() if group is not None)
        reference = _reference(client, body, upstream, project_dir)
        if literal.endswith("$") and reference.startswith("${"):
            raise Unsupported(f"a '$' directly before '{match[0]}' cannot be written in upstreams.toml")
        pieces += [_escape(literal), reference]
        position = match.end()
    pieces.append(_escape(value[position:]))
    return "".join(pieces)


def _escape(literal: str) -> str:
    return literal.replace("${", "$${")


def _reference(client: ClientFormat, body: str, upstream: Upstream, project_dir: Path | None) -> str:
    if client.env_syntax is None:
        return _escape("${" + body + "}")  # this client does not expand variables: the text is literal
    if client.env_syntax == "${{{}}}":  # Claude Code, Gemini CLI: `${VAR}`, `${VAR:-default}`
        match = _CLAUDE_CODE_VARIABLE.fullmatch(body)
        if match is None and client.expands_bare:
            raise Unsupported(f"'${{{body}}}' is not a variable the gateway can resolve")
        if match is None:
            return _escape("${" + body + "}")  # Claude Code leaves what is not a variable as it is
        variable, default = match[1], match[2]
        passed = client.reference(variable, has_default=default is not None)
        assert passed is not None  # a client with a syntax for variables
        upstream.passthrough[variable] = passed
        if default is None:
            return f"${{{variable}}}"
        if "$" in default:
            raise Unsupported(f"the nested default in '${{{body}}}' cannot be written in upstreams.toml")
        return f"${{{variable}:-{default}}}"
    kind, _, argument = body.partition(":")
    if kind == "env" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", argument):
        upstream.passthrough[argument] = f"${{env:{argument}}}"
        return f"${{{argument}}}"
    if kind == "input" and client.name == "vscode" and argument:
        variable = "MCP_ARMOR_INPUT_" + re.sub(r"[^A-Za-z0-9]", "_", argument).upper()
        upstream.passthrough[variable] = f"${{input:{argument}}}"
        return f"${{{variable}}}"
    if body == "userHome":
        upstream.passthrough["HOME"] = "${userHome}"
        return "${HOME}"
    if body in ("pathSeparator", "/"):
        return os.sep
    if body in ("workspaceFolder", "workspaceFolderBasename") and project_dir is not None:
        return _escape(str(project_dir) if body == "workspaceFolder" else project_dir.name)
    raise Unsupported(f"'${{{body}}}' is a {client.title} variable the gateway cannot resolve")


def _literal_secrets(upstream: Upstream) -> Iterator[tuple[str, str, str]]:
    """(section, key, value) of each value in `env`/`headers` that is a secret written out in full."""
    for section in ("env", "headers"):
        for key, value in upstream.table.get(section, {}).items():
            if "${" not in value.replace("$${", "") and Redactor(b"import").redact({key: value}).masked:
                yield section, key, value


def _move_secrets(upstream: Upstream, taken: Mapping[str, str]) -> None:
    """Leave written-out secrets in the client (as the gateway entry's env); refer to them by variable."""
    for section, key, value in list(_literal_secrets(upstream)):
        plain = value.replace("$${", "${")
        variable = key if section == "env" else f"{upstream.name}_{key}"
        if taken.get(variable, plain) != plain or upstream.passthrough.get(variable, plain) != plain:
            variable = f"{upstream.name}_{key}"
        variable = re.sub(r"[^A-Za-z0-9_]", "_", variable).upper()
        upstream.table[section][key] = f"${{{variable}}}"
        upstream.passthrough[variable] = plain
        upstream.notes.append(
            f"upstream '{upstream.name}': the secret in {section} {key} stays in the client's file (the gateway's "
            f"entry passes it as {variable}); upstreams.toml refers to it as ${{{variable}}}"
        )


def _secret_notes(upstream: Upstream) -> list[str]:
    return [
        f"upstream '{upstream.name}': {section} {key} holds a secret written out in the client's file; it is "
        f"copied into upstreams.toml as is (better: '${{{key}}}' there, and the value in the gateway's environment)"
        for section, key, _ in _literal_secrets(upstream)
    ]


def without_moved(file: ClientFile, plan: ImportPlan) -> None:
    """Take the moved entries out of the client's file (the gateway now fronts them)."""
    for index, table in enumerate(file.tables()):
        for key in list(table):
            if (index, key) in plan.removals:
                del table[key]
