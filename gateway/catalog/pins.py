"""Pinning upstream definitions (`upstreams.lock`) and quarantining what changed or looks poisoned.

`mcp-armor lock` records, for every upstream, its server name, version and a hash of its
instructions, and for every tool, prompt, resource and resource template a SHA-256 over a canonical JSON form
of what a model reads of it (for a tool: name, title, description, input and output schemas,
annotations), together with that form, so a later change can be shown as a diff. The file is TOML,
meant to be committed like a package lock.

While serving, every listing (at start-up, after a reconnect, after a list-changed notification)
is screened before it is exposed. In `enforce` mode a definition that is not in the lock (new),
differs from it (changed), or carries a high-severity poisoning finding is quarantined: hidden from
the agent and refused if called, until a person approves it (`mcp-armor pins approve`), which
writes its digest into the lock; the running gateway reads the lock again when it changes. An
upstream whose server (name, version, instructions) is not the one the lock recorded has all its
definitions quarantined until `mcp-armor pins approve UPSTREAM` records the new server: an upgrade
is reviewed like a changed definition, even when every definition reads the same. A lock that
records no server for an upstream (written before servers were recorded) holds only its definitions. `warn`
reports the same and quarantines nothing; `off` does neither. Without a lock file nothing is
pinned, and only poisoning findings quarantine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import mcp_types as types
import tomli_w

from gateway.catalog.listing import Naming, UpstreamListing, naming
from gateway.catalog.scan import Finding, Severity, scan_definition
from gateway.config.models import Config
from gateway.errors import LockError
from gateway.schema import canonical_text, digest

logger = logging.getLogger(__name__)

LOCK_VERSION = 1
_HEADER = """\
# upstreams.lock: the upstream tool, prompt, resource and resource-template definitions approved for use.
# Written by `mcp-armor lock` and `mcp-armor pins approve`; commit it, and review changes to it like code.
# A definition that differs from its pin is quarantined until approved (see `mcp-armor pins status`).

"""


class Mode(StrEnum):
    ENFORCE = "enforce"
    WARN = "warn"
    OFF = "off"


class Kind(StrEnum):
    TOOL = "tool"
    PROMPT = "prompt"
    RESOURCE = "resource"
    TEMPLATE = "resource template"


_SECTIONS = {Kind.TOOL: "tools", Kind.PROMPT: "prompts", Kind.RESOURCE: "resources", Kind.TEMPLATE: "templates"}
_FIELDS = {
    Kind.TOOL: ("name", "title", "description", "inputSchema", "outputSchema", "annotations"),
    Kind.PROMPT: ("name", "title", "description", "arguments"),
    Kind.RESOURCE: ("uri", "name", "title", "description", "mimeType"),
    Kind.TEMPLATE: ("uriTemplate", "name", "title", "description", "mimeType"),
}


def pinned_form(kind: Kind, definition: Mapping[str, Any]) -> dict[str, Any]:
    """What a model reads of a definition: the fields the pin covers (others, like `_meta`, are not)."""
    return {key: definition[key] for key in _FIELDS[kind] if definition.get(key) is not None}


@dataclass(frozen=True)
class Item:
    """One definition an upstream offers, in pinned form."""

    upstream: str
    kind: Kind
    name: str
    form: Mapping[str, Any]
    digest: str

    @property
    def label(self) -> str:
        return f"{self.upstream}.{self.name}"


def listing_items(listing: UpstreamListing) -> list[Item]:
    """Every tool, prompt and resource template of one upstream's listing, in pinned form."""
    items = []
    raws: list[tuple[Kind, str, Mapping[str, Any]]] = [(Kind.TOOL, t.name, t.definition) for t in listing.tools]
    raws += [(Kind.PROMPT, prompt.name, _wire(prompt)) for prompt in listing.prompts]
    raws += [(Kind.RESOURCE, str(resource.uri), _wire(resource)) for resource in listing.resources]
    raws += [(Kind.TEMPLATE, template.uri_template, _wire(template)) for template in listing.templates]
    for kind, name, definition in raws:
        form = pinned_form(kind, definition)
        items.append(Item(listing.upstream, kind, name, form, digest(form)))
    return items


def _wire(model: types.Prompt | types.Resource | types.ResourceTemplate) -> dict[str, Any]:
    data: dict[str, Any] = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    return data


@dataclass(frozen=True)
class Pin:
    digest: str
    definition: Mapping[str, Any]


@dataclass(frozen=True)
class UpstreamPins:
    server: Mapping[str, str] = field(default_factory=dict)
    """`name`, `version` and `instructions_sha256` of the server as it was pinned."""
    pins: Mapping[tuple[Kind, str], Pin] = field(default_factory=dict)


@dataclass(frozen=True)
class Lock:
    upstreams: Mapping[str, UpstreamPins] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Lock | None:
        """The lock file, or `None` if there is none; `LockError` (one line) if it is damaged."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise LockError(f"{path}: cannot be read: {exc}") from None
        return cls.loads(text, str(path))

    @classmethod
    def loads(cls, text: str, label: str) -> Lock:
        """A lock document (TOML) named `label` in messages; `LockError` (one line) if it is damaged."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise LockError(f"{label}: not valid TOML: {exc}") from None
        return cls.parse(data, label)

    @classmethod
    def parse(cls, data: Mapping[str, Any], label: str) -> Lock:
        if data.get("version") != LOCK_VERSION:
            raise LockError(f"{label}: version: expected {LOCK_VERSION}, got {data.get('version')!r}")
        unknown = set(data) - {"version", "upstreams"}
        if unknown:
            raise LockError(f"{label}: top level {sorted(unknown)[0]}: unknown key")
        tables = data.get("upstreams", {})
        if not isinstance(tables, dict):
            raise LockError(f"{label}: upstreams: expected a table")
        return cls({name: _parse_upstream(table, f"{label}: [upstreams.{name}]") for name, table in tables.items()})

    def render(self) -> str:
        data: dict[str, Any] = {"version": LOCK_VERSION, "upstreams": {}}
        for name in sorted(self.upstreams):
            pins = self.upstreams[name]
            table: dict[str, Any] = {}
            if pins.server:
                table["server"] = dict(pins.server)
            for kind, section in _SECTIONS.items():
                entries = {
                    item: {"sha256": pin.digest, "definition": canonical_text(pin.definition)}
                    for (pin_kind, item), pin in sorted(pins.pins.items())
                    if pin_kind is kind
                }
                if entries:
                    table[section] = entries
            data["upstreams"][name] = table
        return _HEADER + tomli_w.dumps(data)

    def pinning(self, upstream: str, items: Iterable[Item], server: Mapping[str, str] | None = None) -> Lock:
        """This lock with these items (and the server's identity) pinned as they are now."""
        current = self.upstreams.get(upstream, UpstreamPins())
        pins = dict(current.pins)
        pins.update({(item.kind, item.name): Pin(item.digest, item.form) for item in items})
        entry = UpstreamPins(dict(server) if server is not None else current.server, pins)
        return Lock({**self.upstreams, upstream: entry})


def _parse_upstream(table: Any, where: str) -> UpstreamPins:
    if not isinstance(table, dict):
        raise LockError(f"{where}: expected a table")
    unknown = set(table) - {"server", *_SECTIONS.values()}
    if unknown:
        raise LockError(f"{where} {sorted(unknown)[0]}: unknown key")
    server = table.get("server", {})
    if not isinstance(server, dict) or not all(isinstance(value, str) for value in server.values()):
        raise LockError(f"{where} server: expected a table of strings")
    pins: dict[tuple[Kind, str], Pin] = {}
    for kind, section in _SECTIONS.items():
        entries = table.get(section, {})
        if not isinstance(entries, dict):
            raise LockError(f"{where} {section}: expected a table")
        for name, entry in entries.items():
            pins[(kind, name)] = _parse_pin(entry, f"{where} {section}.{name}")
    return UpstreamPins(server, pins)


def _parse_pin(entry: Any, where: str) -> Pin:
    if not isinstance(entry, dict) or set(entry) != {"sha256", "definition"}:
        raise LockError(f"{where}: expected exactly the keys sha256 and definition")
    recorded, text = entry["sha256"], entry["definition"]
    if not isinstance(recorded, str) or not isinstance(text, str):
        raise LockError(f"{where}: sha256 and definition must be strings")
    try:
        definition = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LockError(f"{where} definition: not valid JSON: {exc.msg}") from None
    if not isinstance(definition, dict) or digest(definition) != recorded:
        raise LockError(f"{where} sha256: does not match its definition (the lock was edited by hand or damaged)")
    return Pin(recorded, definition)


def load_lock(config: Config, read: Callable[[], Lock | None] | None = None) -> Lock | None:
    """The pins to enforce (from `read`, when given: the shared store's). A damaged lock stops start-up
    where any upstream enforces pinning (trusting everything instead would be the silent failure a lock
    exists to prevent)."""
    enforcing = any(config.pinning(name) == "enforce" for name in config.upstreams)
    try:
        lock = Lock.read(config.lock_path) if read is None else read()
    except LockError as exc:
        if enforcing:
            raise LockError(f"{exc} (pinning is enforced: fix it, or recreate it with `mcp-armor lock`)") from None
        logger.error("%s; no definition is pinned", exc)
        return None
    if lock is None and enforcing:
        logger.info(
            "no %s: tool definitions are not pinned (only poisoned ones are quarantined); "
            "pin them with `mcp-armor lock --config %s`",
            config.lock_path.name,
            config.path,
        )
    return lock


def server_identity(listing: UpstreamListing) -> dict[str, str]:
    """What the lock records of a server: its name, its version and a hash of its instructions."""
    server = listing.server
    identity = {"name": str(server.get("name", "")), "version": str(server.get("version", ""))}
    if server.get("instructions"):
        identity["instructions_sha256"] = hashlib.sha256(str(server["instructions"]).encode()).hexdigest()
    return identity


def server_change(lock: Lock | None, listing: UpstreamListing) -> str:
    """How the upstream's server differs from the one the lock recorded (`version '1' -> '2'`); empty
    when it is the same, or when the lock records no server for it (nothing to hold it against)."""
    pins = lock.upstreams.get(listing.upstream) if lock is not None else None
    if pins is None or not pins.server:
        return ""
    before, now = pins.server, server_identity(listing)
    keys = sorted(set(before) | set(now))
    return ", ".join(
        f"{key} {_shown(key, before.get(key))} -> {_shown(key, now.get(key))}"
        for key in keys
        if before.get(key) != now.get(key)
    )


def _shown(key: str, value: str | None) -> str:
    if value is None:
        return "(none)"
    return repr(value[:12] + "...") if key.endswith("sha256") else repr(value)


# Screening --------------------------------------------------------------------------------------


class Verdict(StrEnum):
    PINNED = "pinned"
    NEW = "new"
    CHANGED = "changed"
    POISONED = "findings"
    """Not pinned (or no lock at all) and carrying a high-severity finding."""
    UNCHECKED = "unchecked"
    """No lock file and nothing found: there is nothing to hold it against."""
    SERVER = "server changed"
    """Pinned as offered, but served by a server that is not the one pinned."""


@dataclass(frozen=True)
class Assessment:
    item: Item
    verdict: Verdict
    findings: tuple[Finding, ...] = ()
    mode: Mode = Mode.ENFORCE
    server: str = ""
    """How its upstream's server differs from the one pinned (see `server_change`); empty: it does not."""

    @property
    def suspect(self) -> bool:
        """Whether a person has to approve it before it may be used."""
        return bool(self.server) or self.verdict in (Verdict.NEW, Verdict.CHANGED, Verdict.POISONED)

    @property
    def quarantined(self) -> bool:
        return self.suspect and self.mode is Mode.ENFORCE

    @property
    def cause(self) -> str:
        """Why it is held, in a few words (what the audit log records): the verdict, and the server's change."""
        if not self.server:
            return str(self.verdict)
        change = f"server changed ({self.server})"
        return change if self.verdict is Verdict.SERVER else f"{self.verdict}; {change}"

    def reason(self) -> str:
        what = {
            Verdict.NEW: "it is not in upstreams.lock",
            Verdict.CHANGED: "its definition changed since it was pinned",
            Verdict.POISONED: "its definition looks poisoned ("
            + "; ".join(f.detail[:80] for f in self.findings if f.severity is Severity.HIGH)[:200]
            + ")",
        }.get(self.verdict, "")
        # A server change is approved for the whole upstream at once, so the commands name the upstream.
        target = self.item.upstream if self.server else self.item.label
        if self.server:
            server = f"upstream '{self.item.upstream}' is not the server pinned ({self.server})"
            what = f"{server}, and {what}" if what else server
        return (
            f"{self.item.kind} '{self.item.label}' is quarantined: {what}; review it with "
            f"`mcp-armor pins diff {target}` and approve it with `mcp-armor pins approve {target}`"
        )


def assess(
    listings: Sequence[UpstreamListing], lock: Lock | None, modes: Mapping[str, Mode], names: Naming | str
) -> list[Assessment]:
    """Hold every definition of these listings against the lock and the poisoning scan."""
    names = naming(names)
    tool_names = {
        listing.upstream: {name for t in listing.tools for name in (t.name, names.exposed(t.upstream, t.name))}
        for listing in listings
    }
    assessments = []
    for listing in listings:
        mode = modes.get(listing.upstream, Mode.ENFORCE)
        if mode is Mode.OFF:
            continue
        others = [name for upstream, names in tool_names.items() if upstream != listing.upstream for name in names]
        pins = lock.upstreams.get(listing.upstream) if lock is not None else None
        server = server_change(lock, listing)
        for item in listing_items(listing):
            pin = pins.pins.get((item.kind, item.name)) if pins is not None else None
            if pin is not None and pin.digest == item.digest:
                assessments.append(
                    Assessment(item, Verdict.SERVER if server else Verdict.PINNED, mode=mode, server=server)
                )
                continue
            findings = tuple(scan_definition(str(item.kind), item.label, item.form, others))
            if pin is not None:
                verdict = Verdict.CHANGED
            elif lock is not None:
                verdict = Verdict.NEW
            elif any(finding.severity is Severity.HIGH for finding in findings):
                verdict = Verdict.POISONED
            else:
                verdict = Verdict.UNCHECKED
            assessments.append(Assessment(item, verdict, findings, mode, server))
    return assessments


def screened(listings: Sequence[UpstreamListing], assessments: Iterable[Assessment]) -> list[UpstreamListing]:
    """The listings without what is quarantined."""
    held = {(a.item.upstream, a.item.kind, a.item.name) for a in assessments if a.quarantined}
    if not held:
        return list(listings)
    result = []
    for listing in listings:
        result.append(
            replace(
                listing,
                tools=tuple(t for t in listing.tools if (listing.upstream, Kind.TOOL, t.name) not in held),
                prompts=tuple(p for p in listing.prompts if (listing.upstream, Kind.PROMPT, p.name) not in held),
                resources=tuple(
                    r for r in listing.resources if (listing.upstream, Kind.RESOURCE, str(r.uri)) not in held
                ),
                templates=tuple(
                    t for t in listing.templates if (listing.upstream, Kind.TEMPLATE, t.uri_template) not in held
                ),
            )
        )
    return result


def select(assessments: Iterable[Assessment], selector: str | None) -> list[Assessment]:
    """`UPSTREAM` or `UPSTREAM.NAME` (upstream names have no dots, so the first one splits)."""
    if not selector:
        return list(assessments)
    upstream, _, name = selector.partition(".")
    return [a for a in assessments if a.item.upstream == upstream and (not name or a.item.name == name)]
