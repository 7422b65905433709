"""The protocol state of one stdio connection: which era it speaks, who is calling, and what is admitted.

The first request decides the connection's era, as the MCP specification has it: `initialize` opens
a handshake-era connection, a request carrying the 2026-07-28 `_meta` envelope opens a 2026 one, and
a later claim from the other era is refused. In the handshake era nothing but `ping` passes before
`initialize` (or a bare `notifications/initialized`) opens the gate, and a repeated `initialize`
naming another client is refused; in the 2026 era every request
names its caller in its own envelope, and the first names the connection's client for good: a later
request naming another client (name or version) is refused, and recorded when it is a call, so that
policy's `clients` globs, the audit log's session and `policy replay` all speak of the one client
behind the pipe. A method the dispatcher does not serve, or the request's
version does not define, is admitted only to be refused (and recorded) by the dispatcher, ahead of
the gate, as the SDK server orders it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mcp_types as types
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from gateway.core.dispatch import INVALID_PARAMS, check_spec
from gateway.core.gateway import Gateway
from gateway.core.requests import Ask, Caller, Elicit, ToolRequest, relay_for
from gateway.display import escape
from gateway.downstream.messages import (
    checked_plain_call,
    envelope,
    has_modern_envelope,
    plain_call,
    unsupported,
)
from gateway.errors import ProtocolError
from gateway.wire.peer import RequestId
from gateway.wire.results import dump, shape

LEGACY = "handshake"
MODERN = "2026-07-28"


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request admitted to be served: id, method, parameters, the protocol version it speaks, who sent it."""

    id: RequestId
    method: str
    params: dict[str, Any] | None
    version: str
    caller: Caller | None
    """`None` only for a handshake-era request before `initialize` (only `ping` gets that far)."""
    call: ToolRequest | None = None
    """The plainest `tools/call`, checked and built already; else the parameters are checked when served."""
    refusal: ProtocolError | None = None
    """A method the gateway does not serve here: refused (and recorded) by the dispatcher, with this error."""
    misclaimed: bool = False
    """The refusal is of a request naming another client than the connection's (recorded by the gateway)."""


class Eras:
    """One connection's era, its handshake-era caller and negotiated version, and what it advertises."""

    def __init__(self, gateway: Gateway, *, ask: Ask, elicit: Elicit) -> None:
        self.gateway = gateway
        self._ask = ask
        self._elicit = elicit
        self.era: str | None = None
        self.version = LATEST_HANDSHAKE_VERSION
        """The handshake era's negotiated version (the latest until `initialize` says otherwise)."""
        self.claimed: tuple[str, str] | None = None
        """The 2026 era's client, as the connection's first request named it (name, version)."""
        self.legacy: Caller | None = None
        """The handshake-era caller, once `initialize` (or a bare `notifications/initialized`) opened the gate."""
        self.capabilities = {
            era: dump(
                types.ServerCapabilities(
                    prompts=types.PromptsCapability(list_changed=True),
                    # 2026-07-28: listen streams (whose acknowledgement honours list changes only).
                    resources=types.ResourcesCapability(subscribe=True, list_changed=True),
                    tools=types.ToolsCapability(list_changed=True),
                    logging=types.LoggingCapability(),
                    completions=types.CompletionsCapability(),
                )
            )
            for era in (LEGACY, MODERN)
        }
        self.server_info = {"name": gateway.name, "version": gateway.version}

    def opened_by(self, method: str, params: dict[str, Any] | None) -> None:
        """The first request decides the era."""
        if self.era is None:
            self.era = MODERN if method != "initialize" and has_modern_envelope(params) else LEGACY

    def initialized(self) -> None:
        """`notifications/initialized`: with the handshake skipped, the gate opens for a client that named nobody."""
        if self.legacy is None:
            session = self.gateway.session_info(self.gateway.stdio_session, self.version, "", "")
            self.legacy = Caller(session, modern=False, can_elicit=False, elicit=self._elicit)

    def initialize(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """The handshake: its result, shaped; the connection is open from here on. Raises `ProtocolError`,
        and for a repeated one naming another client than the connection's."""
        try:
            check_spec("initialize", self.version, params)
            init = types.InitializeRequestParams.model_validate(params or {}, by_name=False)
        except ValidationError:
            raise INVALID_PARAMS from None
        info = init.client_info
        known = (self.legacy.session.client_name, self.legacy.session.client_version) if self.legacy else None
        if known is not None and (info.name, info.version) != known:
            raise _misclaim(known, (info.name, info.version))  # a repeated handshake may not change the client
        negotiated = init.protocol_version
        if negotiated not in HANDSHAKE_PROTOCOL_VERSIONS:
            negotiated = LATEST_HANDSHAKE_VERSION
        result = {
            "protocolVersion": negotiated,
            "capabilities": self.capabilities[LEGACY],
            "serverInfo": dict(self.server_info),
        }
        shaped = shape("initialize", self.version, result)
        self.version = negotiated
        session = self.gateway.session_info(self.gateway.stdio_session, negotiated, info.name, info.version)
        can_elicit = init.capabilities.elicitation is not None
        relay = relay_for(init.capabilities, self._ask)
        self.legacy = Caller(session, modern=False, can_elicit=can_elicit, elicit=self._elicit, relay=relay)
        return shaped

    def admit(self, request_id: RequestId, method: str, params: dict[str, Any] | None) -> Admitted:
        """The request, ready to serve in a task of its own (`initialize` is not one: see `initialize`).

        Raises `ProtocolError` for a request refused before it runs.
        """
        if self.era == LEGACY:
            if has_modern_envelope(params):
                raise ProtocolError(
                    types.INVALID_REQUEST,
                    "this connection serves the handshake protocol era; "
                    "requests carrying the 2026-07-28 envelope are not accepted on it",
                )
            if method == "tools/call" and self.legacy is not None and (plain := plain_call(params)) is not None:
                return Admitted(request_id, method, params, self.version, self.legacy, plain)
            request = Admitted(request_id, method, params, self.version, self.legacy)
        else:
            if method == "initialize":
                raise ProtocolError(
                    types.UNSUPPORTED_PROTOCOL_VERSION,
                    "connection is serving the 2026-07-28 protocol; the initialize handshake is not accepted",
                    unsupported((params or {}).get("protocolVersion")),
                )
            version, info, capabilities = envelope(params)
            claim = (str(info.get("name", "")), str(info.get("version", "")))
            if self.claimed is None:
                self.claimed = claim
            name, client_version = self.claimed
            session = self.gateway.session_info(self.gateway.stdio_session, version, name, client_version)
            caller = Caller(session, modern=True, can_elicit=capabilities.get("elicitation") is not None)
            request = Admitted(request_id, method, params, version, caller)
            if claim != self.claimed:
                return replace(request, refusal=_misclaim(self.claimed, claim), misclaimed=True)
        refusal = self.gateway.dispatcher.unserved(method, request.version, params)
        if refusal is not None:
            return replace(request, refusal=refusal)
        check_spec(method, request.version, params)
        if method == "tools/call" and request.call is None and (plain := checked_plain_call(params)) is not None:
            request = replace(request, call=plain)  # a 2026 call the specification's model has just passed
        if request.caller is None and method != "ping":
            raise INVALID_PARAMS  # the handshake-era gate: nothing but ping before initialize
        return request

    def discover(self) -> dict[str, Any]:
        """`server/discover`'s result (2026-07-28)."""
        return {"supportedVersions": list(MODERN_PROTOCOL_VERSIONS), "capabilities": self.capabilities[MODERN]}


_SHOWN_CLAIM = 100
"""Characters of a claimed client name or version an error repeats (the rest is the sender's to know)."""


def _misclaim(first: tuple[str, str], claim: tuple[str, str]) -> ProtocolError:
    """The error for a request naming another client than the connection's first request did."""

    def named(who: tuple[str, str]) -> str:
        name, version = (escape(part[:_SHOWN_CLAIM], quotes=False) for part in who)
        return f"'{name}' version '{version}'"

    return ProtocolError(
        types.INVALID_REQUEST,
        f"this connection's client is {named(first)}, as its first request said; a request naming client "
        f"{named(claim)} is refused (one stdio connection serves one client)",
    )
