"""`lock`, `pins status | diff | approve` and `scan`: the upstreams' definitions, pinned and reviewed.

Each command starts the upstreams once and holds what they offer against `upstreams.lock`, as a
serving gateway does. An approval is recorded in the audit log before the lock is written (if it
cannot be recorded, nothing is approved); a running gateway picks the new lock up by itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from gateway.audit.store import os_user
from gateway.catalog.listing import Catalog, Naming
from gateway.catalog.pins import Assessment, Lock, Verdict, select, server_identity
from gateway.catalog.scan import Finding, Severity, scan_definition
from gateway.catalog.shared_pins import pins_needed, read_pins, shared_pins
from gateway.cli.common import package_warnings, print_table
from gateway.config.models import Config
from gateway.errors import ConfigError, LockError
from gateway.setup.files import backup, write_atomically
from gateway.upstream import review
from gateway.upstream.connect import Upstreams, connect
from gateway.upstream.review import definition_diff, server_diff


async def scan(config: Config, as_json: bool) -> int:
    """Scan every definition the upstreams offer (quarantined or not); exit 1 if anything is high severity."""
    upstreams = await connect(config, pinned=False)
    catalog = Catalog.build(list(upstreams.listings.values()), Naming.of(config))
    findings: list[Finding] = []
    for tool in catalog.tools.values():
        others = [
            name
            for other in catalog.tools.values()
            if other.upstream != tool.upstream
            for name in (other.name, other.upstream_name)
        ]
        findings += scan_definition("tool", tool.name, tool.source.definition, others)
    for prompt in catalog.prompts.values():
        findings += scan_definition("prompt", prompt.name, prompt.model.model_dump(by_alias=True, exclude_none=True))
    for uri, (upstream, resource) in catalog.resources.items():
        definition = resource.model_dump(by_alias=True, mode="json", exclude_none=True)
        findings += scan_definition("resource", f"{upstream}: {uri}", definition)
    for upstream, _, template in catalog.templates:
        definition = template.model_dump(by_alias=True, exclude_none=True)
        findings += scan_definition("resource template", f"{upstream}: {template.uri_template}", definition)
    instructions = {name: listing.server.get("instructions") for name, listing in upstreams.listings.items()}
    for upstream, text in instructions.items():
        if text:
            findings += scan_definition("server", upstream, {"instructions": text})
    offered = len(catalog.tools) + len(catalog.prompts) + len(catalog.resources) + len(catalog.templates)
    scanned = offered + sum(map(bool, instructions.values()))
    if as_json:
        report = {"findings": [finding.to_record() for finding in findings], "unavailable": upstreams.down}
        print(json.dumps({**report, "scanned": scanned}))
    else:
        rows = [(finding.severity, finding.kind, finding.where, finding.detail) for finding in findings]
        print_table(("SEVERITY", "KIND", "WHERE", "FINDING"), rows, empty="(no findings)")
    upstreams.report()
    high = any(finding.severity is Severity.HIGH for finding in findings)
    return 1 if high or upstreams.down else 0


# lock -------------------------------------------------------------------------------------------


async def lock(config: Config, force: bool) -> int:
    """Write `upstreams.lock` (the store's lock, with a store) pinning every definition on offer, except
    those with high findings."""
    path, shared = config.lock_path, shared_pins(config)
    where = str(path) if shared is None else shared.label
    if shared is not None:
        shared.store.migrate()  # the first lock may well come before the first gateway, which sets it up
    try:
        existing = read_pins(config)
    except LockError as exc:
        if not force:
            kept = " (the old one is backed up)" if shared is None else ""
            raise LockError(f"{exc}; pass --force to write a new one{kept}") from None
        existing = None
    if existing is not None and not force:
        raise ConfigError(
            f"{where} exists: review what changed with `mcp-armor pins status` and `pins diff`, approve it with "
            "`pins approve`; or pass --force to pin everything as it is now"
        )
    upstreams = await connect(config, pinned=False)
    assessments = review.assess_all(config, upstreams, None)
    new_lock = Lock({name: pins for name, pins in (existing or Lock()).upstreams.items() if name in upstreams.down})
    held: list[Assessment] = []
    for name, listing in upstreams.listings.items():
        mine = [a for a in assessments if a.item.upstream == name]
        held += [a for a in mine if a.verdict is Verdict.POISONED]
        clean = [a.item for a in mine if a.verdict is not Verdict.POISONED]
        new_lock = new_lock.pinning(name, clean, server_identity(listing))
        print(f"{name}: {len(clean)} definition{'s' * (len(clean) != 1)} pinned")
    if shared is not None:
        print(f"{shared.label}: revision {shared.replace(new_lock)} written")
    else:
        if path.exists():
            saved = backup(path)
            print(f"the previous {path.name} is in {saved}")
        write_atomically(path, new_lock.render())
        print(f"{path}: written")
    for assessment in held:
        print(
            f"mcp-armor: not pinned: {assessment.item.kind} '{assessment.item.label}' has high-severity findings "
            f"(see `mcp-armor scan`); it stays quarantined unless approved with "
            f"`mcp-armor pins approve {assessment.item.label}`",
            file=sys.stderr,
        )
    for name in upstreams.down:
        print(f"mcp-armor: upstream '{name}' did not answer; its pins (if any) are kept as they were", file=sys.stderr)
    for warning in package_warnings(config):
        print(f"mcp-armor: warning: {warning}", file=sys.stderr)
    upstreams.report()
    return 1 if held or upstreams.down else 0


# pins status / diff / approve ---------------------------------------------------------------------


async def status(config: Config, as_json: bool) -> int:
    current, upstreams, assessments = await _current(config)
    rows: list[dict[str, Any]] = [
        {
            "upstream": a.item.upstream,
            "kind": str(a.item.kind),
            "name": a.item.name,
            "state": "quarantined" if a.quarantined else str(a.verdict),
            "verdict": str(a.verdict),
            "mode": str(a.mode),
            "findings": [finding.to_record() for finding in a.findings],
        }
        for a in assessments
    ]
    offered = {(a.item.upstream, a.item.kind, a.item.name) for a in assessments}
    for name, pins in (current.upstreams if current is not None else {}).items():
        if name not in upstreams.listings:
            continue
        for kind, item in pins.pins:
            if (name, kind, item) not in offered:
                rows.append({"upstream": name, "kind": str(kind), "name": item, "state": "missing", "findings": []})
    servers = review.servers(config, current, upstreams)
    notes = [_server_note(config, server) for server in servers if server["state"] != "pinned"]
    to_review = [server for server in servers if server["state"] in ("quarantined", "warned")]
    if as_json:
        report = {"lock": current is not None, "definitions": rows, "servers": servers, "notes": notes}
        print(json.dumps({**report, "unavailable": upstreams.down}))
    else:
        if current is None:
            print(f"(no {config.lock_path.name}: nothing is pinned; `mcp-armor lock` pins what is on offer now)")
        table = [
            (server["upstream"], "server", server["offered"]["name"], server["state"], server["change"])
            for server in to_review
        ]
        table += [
            (row["upstream"], row["kind"], row["name"], row["state"], _summary(row["findings"]))
            for row in rows
            if row["state"] != "pinned" or row["findings"]
        ]
        pinned = sum(1 for row in rows if row["state"] == "pinned")
        print_table(("UPSTREAM", "KIND", "NAME", "STATE", "FINDINGS"), table, empty="(nothing to review)")
        print(f"{pinned} pinned, {sum(1 for a in assessments if a.suspect)} to review")
        for text in notes:
            print(f"mcp-armor: note: {text}", file=sys.stderr)
    upstreams.report()
    return 1 if any(a.suspect for a in assessments) or to_review or upstreams.down else 0


def _server_note(config: Config, server: dict[str, Any]) -> str:
    name, approve = server["upstream"], f"`mcp-armor pins approve {server['upstream']}`"
    if server["state"] == "unrecorded":
        return f"upstream '{name}': {config.lock_path.name} records no server for it; {approve} records it"
    held = {"quarantined": "everything of it is quarantined", "warned": 'reported only (pinning = "warn")'}
    what = held.get(server["state"], 'not checked (pinning = "off")')
    return (
        f"upstream '{name}': the server is not the one pinned ({server['change']}): {what}; approve it with {approve}"
    )


async def diff(config: Config, selector: str | None) -> int:
    current, upstreams, assessments = await _current(config)
    chosen = [a for a in select(assessments, selector) if a.suspect]
    upstream = (selector or "").partition(".")[0]
    found = [s for s in review.servers(config, current, upstreams) if s["change"] and upstream in ("", s["upstream"])]
    if not chosen and not found:
        print("(nothing to review)" if not selector else f"(nothing to review for {selector})")
        return 0
    for server in found:
        print(f"== server {server['upstream']}: not the server pinned ({server['state']})")
        for line in server_diff(server):
            print(line)
    for assessment in chosen:
        print(f"== {assessment.item.kind} {assessment.item.label}: {assessment.verdict}")
        for line in definition_diff(current, assessment):
            print(line)
        for finding in assessment.findings:
            print(f"   {finding.severity}: {finding.kind}: {finding.where}: {finding.detail}")
    return 0


async def approve(config: Config, selector: str) -> int:
    pins_needed(config)  # before any upstream is started
    found = await review.review(config)
    upstream = selector.partition(".")[0]
    approved = review.approve(config, found, selector, who=os_user(), via=f"`pins approve {selector}`")
    for assessment in approved.chosen:
        print(
            f"approved {assessment.item.kind} '{assessment.item.label}' "
            f"({assessment.verdict}, {assessment.item.digest[:12]})"
        )
    if approved.server_change:
        print(f"approved the server of '{upstream}' ({approved.server_change})")
    elif not approved.chosen:
        print(f"nothing of '{upstream}' needed approving; its server identity is pinned as it is now")
    print(f"{approved.written}: written (a running gateway picks it up within a second or two)")
    return 0


async def _current(config: Config) -> tuple[Lock | None, Upstreams, list[Assessment]]:
    found = await review.review(config)
    return found.lock, found.upstreams, found.assessments


def _summary(findings: list[dict[str, str]]) -> str:
    return "; ".join(f"{f['severity']} {f['kind']}" for f in findings)
