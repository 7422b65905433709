"""What the upstream pool tells the layer above it: one listener, attached with `UpstreamPool.listen`.

The pool decides nothing an upstream asks of the agent's client: it hands every request an upstream
sends over to `UpstreamListener.upstream_request`, and refuses them all while no listener is attached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gateway.calls import ToolCall
from gateway.catalog.listing import Catalog
from gateway.catalog.pins import Assessment


class UpstreamListener(Protocol):
    """Told of the pool's changes, and asked to answer the requests upstreams send."""

    async def catalog_changed(self, catalog: Catalog) -> None:
        """The merged catalogue was rebuilt (an upstream came, went, re-listed, or the pins changed)."""

    def upstream_changed(self, upstream: str, up: bool, description: str) -> None:
        """An upstream came up or went down (`description`: its transport and tools, or why it is down)."""

    def assessed(self, assessments: list[Assessment]) -> None:
        """At every publish: how each definition on offer was judged against the lock and the scan."""

    async def upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any], calls: Sequence[ToolCall]
    ) -> dict[str, Any]:
        """A request `upstream` sent the gateway (a `ping`, sampling, elicitation, anything): its result in
        wire form, or `ProtocolError` to refuse it. `calls`: every call in flight to that upstream, oldest
        first (a stdio upstream cannot say which call a request belongs to)."""

    async def upstream_notification(
        self,
        upstream: str,
        method: str,
        params: Mapping[str, Any],
        calls: Sequence[ToolCall],
        principal: str | None = None,
    ) -> None:
        """A log message or resource update `upstream` sent; `calls`: every call in flight on its connection
        when it arrived, oldest first; `principal`: whose connection it came on (`None`: the shared one)."""
