"""The requests upstream servers send the gateway: which are answered, which go to the agent's client.

Every request an upstream sends reaches `answer_upstream_request` (`UpstreamListener.upstream_request`):
`ping` is answered; sampling and elicitation go to the client of the call they came with; anything
else, or a request with no call whose client can take it, is refused. Each relayed request is
recorded, however it ended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import mcp_types as types

from gateway.calls import RELAYED_METHODS, ToolCall
from gateway.errors import ProtocolError

logger = logging.getLogger(__name__)

Record = Callable[[str, str, ToolCall | None, str, str | None], None]
"""Records one sampling or elicitation request an upstream sent (`GatewayEvents.relayed`): upstream, method,
the call it went to (`None`: none could take it), how it ended (`relayed`: the client answered; `refused`;
`cancelled`: withdrawn by the upstream, or its connection ended, before the client answered), and why."""


async def answer_upstream_request(
    upstream: str, method: str, params: Mapping[str, Any], call: ToolCall | None, *, record: Record
) -> dict[str, Any]:
    """`upstream`'s request answered, or refused with `ProtocolError`. `call`: the latest call in flight to
    that upstream whose client can take relayed requests (stdio upstreams cannot say which call a request
    belongs to), the one a sampling or elicitation request goes to; `None`: there is none."""
    if method == "ping":
        return {}
    if method not in RELAYED_METHODS:
        raise ProtocolError(types.METHOD_NOT_FOUND, f"mcp-armor does not serve '{method}' to upstream servers")
    if call is None or call.relay is None:
        message = f"no call to '{upstream}' is in flight from a client that can answer {method}"
        _relayed(record, upstream, method, None, "refused", message)
        raise ProtocolError(types.INVALID_REQUEST, message)
    try:
        result = await call.relay(method, params)
    except ProtocolError as exc:
        _relayed(record, upstream, method, call, "refused", exc.message)
        raise
    except anyio.get_cancelled_exc_class():
        _relayed(record, upstream, method, call, "cancelled", "withdrawn before the client answered")
        raise
    _relayed(record, upstream, method, call, "relayed", None)
    return result


def _relayed(
    record: Record, upstream: str, method: str, call: ToolCall | None, outcome: str, detail: str | None
) -> None:
    if outcome == "refused":
        logger.warning("upstream '%s' asked %s: refused (%s)", upstream, method, detail)
    record(upstream, method, call, outcome, detail)
