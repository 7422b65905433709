"""Connecting to the upstreams once (the commands, and starter policies): start, list, stop.

Held against `upstreams.lock` as serving would, so a command shows what the gateway would expose.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import anyio

from gateway.catalog.listing import Catalog, UpstreamListing
from gateway.catalog.pins import Assessment
from gateway.catalog.shared_pins import load_pins
from gateway.config.models import Config
from gateway.upstream.pool import UpstreamPool


@dataclass
class Upstreams:
    """What the upstreams offered when the command connected to them once."""

    catalog: Catalog = field(default_factory=Catalog)
    """What the gateway would expose: quarantined definitions left out."""
    down: dict[str, str] = field(default_factory=dict)
    listings: dict[str, UpstreamListing] = field(default_factory=dict)
    """Everything each upstream that answered offered, quarantined or not."""
    quarantined: dict[str, Assessment] = field(default_factory=dict)

    def report(self) -> None:
        for name, reason in self.down.items():
            print(f"mcp-armor: upstream '{name}' unavailable: {reason}", file=sys.stderr)
        for problem in self.catalog.problems:
            print(f"mcp-armor: {problem}", file=sys.stderr)


async def connect(config: Config, *, pinned: bool = True) -> Upstreams:
    """Start the upstreams once, hold their definitions against `upstreams.lock` as serving would (unless
    not `pinned`), and list them."""
    lock = await anyio.to_thread.run_sync(load_pins, config) if pinned else None
    pool = UpstreamPool(config, lock=lock)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        await pool.wait_settled(max(config.gateway.startup_timeout, 30.0))
        catalog = pool.catalog  # taken now: closing the upstreams withdraws their tools
        down = {up.name: up.last_error or "did not start in time" for up in pool.upstreams.values() if not up.is_up}
        listings = {up.name: up.listing for up in pool.upstreams.values() if up.listing is not None}
        quarantined = dict(pool.quarantined)
        tg.cancel_scope.cancel()
    return Upstreams(catalog, down, listings, quarantined)
