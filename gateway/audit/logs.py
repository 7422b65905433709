"""Which audit log a config names, opened for reading or for appending: the SQLite file in the state
directory, or the shared store's chain (`[gateway] store`)."""

from __future__ import annotations

from contextlib import closing
from typing import Any

from gateway.audit.chain import canonical
from gateway.audit.journal import open_settled
from gateway.audit.shared import SharedAuditStore
from gateway.audit.store import AuditStore
from gateway.config.models import IN_MEMORY, Config
from gateway.errors import AuditError, GatewayError
from gateway.store.postgres import database

AuditLog = AuditStore | SharedAuditStore
"""An audit log opened for reading (or appending outside a running gateway)."""


def open_reading(config: Config) -> AuditLog:
    """The config's audit log for reading: complete (what gone gateways left is moved in first, for a file)."""
    shared = database(config)
    return SharedAuditStore.open_reader(shared) if shared is not None else open_settled(config.audit_path)


def open_appending(config: Config) -> AuditLog:
    """The config's audit log for appending outside a running gateway (a command recording its change)."""
    shared = database(config)
    if shared is not None:
        return SharedAuditStore.open_writer(shared)
    return AuditStore.open_writer(config.audit_path, sync=config.gateway.audit_sync)


def record_first(config: Config, bodies: list[dict[str, Any]], refused: type[GatewayError]) -> None:
    """Record a change in the audit log before its store commits it; if it cannot be recorded, `refused` is
    raised, so nothing changes."""
    if (config.gateway.store is None and str(config.audit_path) == IN_MEMORY) or not bodies:
        return
    try:
        with closing(open_appending(config)) as log:
            log.append_waiting([canonical(body) for body in bodies])
    except AuditError as exc:
        raise refused(f"the change cannot be recorded in the audit log, so nothing changed: {exc}") from None
