"""2026-07-28 listen streams on the stdio face: `subscriptions/listen` requests held open, each told of
the list changes it asked to follow.

A stream is acknowledged at once (`notifications/subscriptions/acknowledged`, stamped with its
subscription id) and stays open until the client cancels the request that opened it; it is never
answered. At most `MAX_LISTEN_STREAMS` are open at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types

from gateway.core.gateway import ListKind
from gateway.errors import ProtocolError
from gateway.wire.peer import RequestId
from gateway.wire.results import dump

SUBSCRIPTION_ID_META_KEY = "io.modelcontextprotocol/subscriptionId"
MAX_LISTEN_STREAMS = 1024
_LIST_FILTER: dict[ListKind, str] = {
    "tools": "toolsListChanged",
    "prompts": "promptsListChanged",
    "resources": "resourcesListChanged",
}

Notify = Callable[[str, dict[str, Any]], None]
"""Writes one notification (method, params) to the client."""


class ListenStreams:
    """The listen streams open on one connection, by the id of the request that opened each."""

    def __init__(self, notify: Notify) -> None:
        self._notify = notify
        self._open: dict[RequestId, tuple[dict[str, Any], frozenset[ListKind]]] = {}
        """Each stream's `_meta` stamp and the lists it follows."""

    def ids(self) -> list[RequestId]:
        return list(self._open)

    async def listen(self, request_id: RequestId, params: types.SubscriptionsListenRequestParams) -> dict[str, Any]:
        """Acknowledge the stream, then hold it open until cancelled."""
        if len(self._open) >= MAX_LISTEN_STREAMS:
            raise ProtocolError(types.INTERNAL_ERROR, "Subscription limit reached")
        asked = params.notifications
        honored = types.SubscriptionFilter(
            tools_list_changed=True if asked.tools_list_changed else None,
            prompts_list_changed=True if asked.prompts_list_changed else None,
            resources_list_changed=True if asked.resources_list_changed else None,
        )  # resource subscriptions are not honoured on listen streams: the gateway would have nothing to send
        meta = {SUBSCRIPTION_ID_META_KEY: request_id}
        wire = dump(honored)
        followed = frozenset(kind for kind, key in _LIST_FILTER.items() if key in wire)
        self._notify("notifications/subscriptions/acknowledged", {"notifications": wire, "_meta": meta})
        self._open[request_id] = entry = (meta, followed)
        try:
            await anyio.sleep_forever()
        finally:
            # Only its own: a stream the client cancelled and opened again under the same id in one read
            # has its successor's entry here by the time it ends.
            if self._open.get(request_id) is entry:
                del self._open[request_id]
        return {"_meta": meta}  # pragma: no cover (a listen stream ends only by cancellation)

    def announce(self, changed: list[ListKind]) -> None:
        """Tell each stream following a changed list."""
        for meta, followed in list(self._open.values()):
            for kind in changed:
                if kind in followed:
                    self._notify(f"notifications/{kind}/list_changed", {"_meta": meta})
