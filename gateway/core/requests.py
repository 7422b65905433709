"""What a downstream request is, as the core acts on it: who sent it (`Caller`), the method-neutral
`Request` every route takes, and the parts of a `tools/call` (`ToolRequest`).

Built by the faces (`gateway.downstream`) from what they parsed, and handed to the dispatcher; nothing
here knows a transport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import mcp_types as types
from pydantic import BaseModel, TypeAdapter, ValidationError

from gateway.calls import LogFn, ProgressFn, Relay, SessionInfo
from gateway.core.approvals import REQUEST_KEY
from gateway.errors import ProtocolError

Elicit = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Sends `elicitation/create` (form mode) to the client and returns its result in wire form."""
Updated = Callable[[str], Awaitable[None]]
"""Tells the client's connection that a resource it subscribed to changed (`notifications/resources/updated`)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, and what their connection can do."""

    session: SessionInfo
    modern: bool
    """A 2026-07-28 request: approval goes by input-required round trips, never by a request to the client."""
    can_elicit: bool
    """The client declared the elicitation capability."""
    progress: ProgressFn | None = None
    """Relays progress to the caller; `None` when the request carried no progress token."""
    elicit: Elicit | None = None
    relay: Relay | None = None
    """Passes an upstream's sampling and elicitation requests to this caller's client (handshake era)."""
    log: LogFn | None = None
    """Relays upstream log messages to this request's caller, at the level it chose; `None`: it takes none."""
    log_level: str | None = None
    """The level this request asked for itself (2026-07-28's per-request opt-in), which upstreams are asked for."""
    updated: Updated | None = None
    """Reaches this caller's connection outside any request, for its resource subscriptions (handshake era)."""


class Relayed(NamedTuple):
    """One request an upstream may have the caller's client asked: the client capability that takes it,
    and its models."""

    capability: Literal["sampling", "elicitation"]
    params: TypeAdapter[Any]
    result: type[BaseModel]
    request: type[types.CreateMessageRequest] | type[types.ElicitRequest]
    """The whole request, as the SDK's server sends it (streamable HTTP)."""


RELAYED: dict[str, Relayed] = {
    "sampling/createMessage": Relayed(
        "sampling",
        TypeAdapter(types.CreateMessageRequestParams),
        types.CreateMessageResult,
        types.CreateMessageRequest,
    ),
    "elicitation/create": Relayed(
        "elicitation", TypeAdapter(types.ElicitRequestParams), types.ElicitResult, types.ElicitRequest
    ),
}
"""The upstream requests a handshake-era caller's client may be asked ."""

Ask = Callable[[str, Mapping[str, Any], Any], Awaitable[dict[str, Any]]]
"""Sends the caller's client one request (method, parameters as the upstream sent them, the same checked);
returns its result, checked against the method's result model, in wire form."""


def relay_for(capabilities: types.ClientCapabilities | None, ask: Ask) -> Relay:
    """Passes an upstream's sampling and elicitation requests on through `ask`, as far as the client
    declared it takes them, with their parameters checked first."""
    declared = {
        method: capabilities is not None and getattr(capabilities, models.capability) is not None
        for method, models in RELAYED.items()
    }

    async def relay(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if not declared.get(method, False):
            raise ProtocolError(types.INVALID_REQUEST, f"the agent's client does not take {method}")
        try:
            checked = RELAYED[method].params.validate_python(params, by_name=False)
        except ValidationError:
            raise ProtocolError(types.INVALID_PARAMS, f"{method} with malformed parameters") from None
        return await ask(method, params, checked)

    return relay


@dataclass(frozen=True, slots=True)
class RoundTrip:
    """A 2026-07-28 retry's approval state and answer, on any request that can be input-required
    (`tools/call`, `resources/read`, `prompts/get`)."""

    request_state: str | None = None
    answer: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, params: types.ReadResourceRequestParams | types.GetPromptRequestParams) -> RoundTrip:
        answer = (params.input_responses or {}).get(REQUEST_KEY)
        return cls(params.request_state, answer.model_dump(by_alias=True, mode="json") if answer is not None else None)


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A `tools/call` as the gateway acts on it, whichever transport and protocol version carried it."""

    name: str
    arguments: Mapping[str, Any]
    request_state: str | None = None
    """A 2026-07-28 retry's approval state (`requestState`), as the gateway issued it."""
    answer: Mapping[str, Any] | None = None
    """A 2026-07-28 retry's answer to the gateway's approval request (its input response, wire form)."""

    @classmethod
    def of(cls, params: types.CallToolRequestParams) -> ToolRequest:
        """From the parameters as the specification's model has checked and built them."""
        answer = (params.input_responses or {}).get(REQUEST_KEY)
        return cls(
            params.name,
            params.arguments or {},
            params.request_state,
            answer.model_dump(by_alias=True, mode="json") if answer is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Request:
    """One request from a downstream client, whatever its method: the flow object the dispatcher routes.

    A tool call is one kind: its route resolves the tool and runs the pipeline's `ToolCall`.
    """

    caller: Caller
    method: str
    params: Mapping[str, Any] | None
    """The parameters as the client sent them (wire form)."""
    parsed: Any = None
    """The parameters already checked and built by the face (the SDK's model over HTTP, or a plain
    `tools/call`'s `ToolRequest` on stdio); `None`: the route's model checks them."""

    @property
    def version(self) -> str:
        """The protocol version the request speaks."""
        return self.caller.session.protocol_version
