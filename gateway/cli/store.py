"""`mcp-armor store migrate`: create or update the shared store's schema."""

from __future__ import annotations

from gateway.config.models import Config
from gateway.errors import GatewayError
from gateway.store.postgres import database


def migrate(config: Config) -> int:
    shared = database(config)
    if shared is None:
        raise GatewayError(f"{config.path}: [gateway] store is not set: there is no shared store to migrate")
    found, now = shared.migrate()
    if found == now:
        print(f"{shared.shown}: the store's schema is current (version {now})")
    else:
        print(f"{shared.shown}: the store's schema is now version {now} (was {found or 'not there'})")
    return 0
