"""Reviewing pins: what the upstreams offer now held against `upstreams.lock`, and approving it.

`mcp-armor pins status | diff | approve` and the console both review this way: connect to the upstreams
once, assess every definition (and each server) against the lock, show a definition's change as a
unified diff with hidden characters made visible, and approve by recording who approved what in the
audit log first (if it cannot be recorded, nothing is approved), then writing the new lock. A running
gateway picks the lock up by itself.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from gateway.audit.logs import record_first
from gateway.audit.store import event
from gateway.catalog.listing import Naming, UpstreamListing
from gateway.catalog.pins import Assessment, Lock, Mode, assess, select, server_change, server_identity
from gateway.catalog.scan import visible
from gateway.catalog.shared_pins import pins_needed, read_pins, write_pins
from gateway.config.models import Config
from gateway.errors import ConfigError
from gateway.upstream.connect import Upstreams, connect


@dataclass(frozen=True, slots=True)
class Review:
    """The lock as it is, what the upstreams offer, and every definition on offer assessed against it."""

    lock: Lock | None
    upstreams: Upstreams
    assessments: list[Assessment]


async def review(config: Config) -> Review:
    current = await anyio.to_thread.run_sync(read_pins, config)
    upstreams = await connect(config, pinned=False)
    return Review(current, upstreams, assess_all(config, upstreams, current))


def assess_all(config: Config, upstreams: Upstreams, current: Lock | None) -> list[Assessment]:
    listings: Sequence[UpstreamListing] = list(upstreams.listings.values())
    modes = {name: Mode(config.pinning(name)) for name in config.upstreams}
    return assess(listings, current, modes, Naming.of(config))


def servers(config: Config, current: Lock | None, upstreams: Upstreams) -> list[dict[str, Any]]:
    """Each answering upstream's server held against the one the lock recorded (`unrecorded`: a lock
    written before servers were recorded; its definitions are held, its version is not)."""
    found = []
    for name, listing in upstreams.listings.items():
        pins = current.upstreams.get(name) if current is not None else None
        if pins is None:
            continue  # not in the lock at all: everything of it is new
        mode = Mode(config.pinning(name))
        change = server_change(current, listing)
        state = "unrecorded" if not pins.server else "pinned" if not change else _HELD[mode]
        found.append(
            {
                "upstream": name,
                "state": state,
                "mode": str(mode),
                "pinned": dict(pins.server),
                "offered": server_identity(listing),
                "change": change,
            }
        )
    return found


_HELD = {Mode.ENFORCE: "quarantined", Mode.WARN: "warned", Mode.OFF: "ignored"}


def server_diff(server: dict[str, Any]) -> list[str]:
    """The pinned and the offered server identity as a unified diff, hidden characters shown."""
    lines = difflib.unified_diff(
        pretty(server["pinned"]), pretty(server["offered"]), "pinned", "offered now", lineterm=""
    )
    return [visible(line) for line in lines]


def definition_diff(current: Lock | None, assessment: Assessment) -> list[str]:
    """The pinned definition (none, for a new one) and the one offered now, hidden characters shown."""
    item = assessment.item
    pins = current.upstreams.get(item.upstream) if current is not None else None
    pin = pins.pins.get((item.kind, item.name)) if pins is not None else None
    before = pretty(pin.definition) if pin is not None else []
    lines = difflib.unified_diff(
        before,
        pretty(item.form),
        fromfile=f"pinned ({pin.digest[:12]})" if pin is not None else "(not pinned)",
        tofile=f"offered now ({item.digest[:12]})",
        lineterm="",
    )
    return [visible(line) for line in lines]


@dataclass(frozen=True, slots=True)
class Approved:
    chosen: list[Assessment]
    server_change: str
    """How the upstream's server differs from the one pinned, approved with it; empty: it did not."""
    written: str
    """Where the new lock went: the lock file, or the store (and its revision)."""


def approve(config: Config, found: Review, selector: str, *, who: str, via: str) -> Approved:
    """Pin what is offered now for `selector` (an upstream, or UPSTREAM.NAME), recorded in the audit log
    as approved by `who` through `via` before the lock is written (blocks); `ConfigError` (one line) when
    there is nothing to approve or it cannot be approved as asked. With a store, the approval is applied
    to the store's lock as it is when written (another replica's approval made meanwhile stays)."""
    pins_needed(config)
    current, upstreams = found.lock, found.upstreams
    upstream = selector.partition(".")[0]
    if upstream not in config.upstreams:
        raise ConfigError(f"there is no upstream named '{upstream}' (write UPSTREAM or UPSTREAM.NAME)")
    if upstream not in upstreams.listings:
        raise ConfigError(f"upstream '{upstream}' did not answer; nothing can be approved unseen")
    chosen = [a for a in select(found.assessments, selector) if a.suspect]
    whole = "." not in selector
    changed = server_change(current, upstreams.listings[upstream])
    if changed and not whole:
        raise ConfigError(
            f"upstream '{upstream}' is not the server pinned ({changed}): review it with `mcp-armor pins diff "
            f"{upstream}` and approve the server and its definitions at once with `mcp-armor pins approve {upstream}`"
        )
    if not chosen and not whole:
        raise ConfigError(f"nothing to approve for {selector}: it is pinned as offered, or not offered at all")
    identity = server_identity(upstreams.listings[upstream]) if whole else None
    server = (upstream, identity["name"], changed) if identity and changed else None
    _record_approval(config, chosen, server, f"approved by {who} ({via})")
    items = [a.item for a in chosen]
    written = write_pins(config, lambda now: (now or Lock()).pinning(upstream, items, identity))
    return Approved(chosen, changed if whole else "", written)


def _record_approval(
    config: Config, chosen: Sequence[Assessment], server: tuple[str, str, str] | None, approved: str
) -> None:
    """Record who approved what before the lock changes; if that cannot be recorded, nothing is approved.
    `server`: the upstream, server name and change of a server approved with it."""
    bodies = []
    if server is not None:
        upstream, name, change = server
        reason = f"server changed ({change}); {approved}"
        bodies.append(
            event("pin", upstream=upstream, definition_kind="server", name=name, change="approved", reason=reason)
        )
    bodies += [
        event(
            "pin",
            upstream=a.item.upstream,
            tool=a.item.label if a.item.kind == "tool" else None,
            definition_kind=str(a.item.kind),
            name=a.item.name,
            change="approved",
            reason=f"{a.cause}; {approved}",
            tool_digest=a.item.digest,
        )
        for a in chosen
    ]
    record_first(config, bodies, ConfigError)


def pretty(definition: Any) -> list[str]:
    return json.dumps(definition, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
