"""The one way in: every request a downstream client sends, on either face and in either era, is routed here.

A method has a route (its parameter model and the handler that serves it), or is one the connection
answers itself (`CONNECTION_METHODS`: the handshake, liveness, discovery and the change stream, none of
which carries anything to or from an upstream), or is refused: default deny. A refused method is
recorded in the audit log (a decision `deny` and an outcome `refused`, naming the method) and answered
with JSON-RPC's "Method not found" (-32601), the error the specification names for a method a server
does not serve.

Every result leaves through `gateway.wire.results.shape`, shaped for the caller's protocol version: the
faces write it as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from pydantic import BaseModel

from gateway.calls import SessionInfo
from gateway.core.gateway import Gateway
from gateway.core.requests import Request, ToolRequest
from gateway.errors import ProtocolError
from gateway.wire.results import shape

CONNECTION_METHODS = frozenset({"initialize", "ping", "server/discover", "subscriptions/listen"})
"""Answered by the connection itself: they reach no upstream and carry no agent data."""

Serve = Callable[[Request, Any], Awaitable[BaseModel | Mapping[str, Any]]]
"""A route's handler: the request and its checked parameters; the result (a model, or wire form)."""


@dataclass(frozen=True, slots=True)
class Route:
    """How one method is served: the model its parameters must fit, and the handler."""

    params: type[BaseModel]
    serve: Serve


class Dispatcher:
    """Routes each downstream request to its handler; a method without one is refused and recorded."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routes: dict[str, Route] = {
            "tools/list": Route(types.PaginatedRequestParams, self._list_tools),
            "tools/call": Route(types.CallToolRequestParams, self._call_tool),
            "prompts/list": Route(types.PaginatedRequestParams, self._list_prompts),
            "prompts/get": Route(types.GetPromptRequestParams, self._get_prompt),
            "resources/list": Route(types.PaginatedRequestParams, self._list_resources),
            "resources/templates/list": Route(types.PaginatedRequestParams, self._list_resource_templates),
            "resources/read": Route(types.ReadResourceRequestParams, self._read_resource),
        }

    def serves(self, method: str) -> bool:
        """Whether `method` is routed here or answered by the connection (anything else is refused)."""
        return method in self.routes or method in CONNECTION_METHODS

    async def refuse(self, session: SessionInfo, method: str, params: Mapping[str, Any] | None) -> ProtocolError:
        """Record a request for a method the gateway does not serve; the error to answer it with."""
        await self.gateway.audit.unrouted(session, method, params or {})
        return ProtocolError(types.METHOD_NOT_FOUND, "Method not found", method)

    async def dispatch(self, request: Request, server_info: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Serve one request; its result in wire form, shaped for the caller's version (with `server_info`
        stamped on a 2026-07-28 result, when given).

        Raises `ProtocolError` for a request refused or failed, and pydantic's `ValidationError` for
        parameters that do not fit the method's model.
        """
        route = self.routes.get(request.method)
        if route is None:
            raise await self.refuse(request.caller.session, request.method, request.params)
        parsed = request.parsed
        if parsed is None:
            parsed = route.params.model_validate(request.params or {}, by_name=False)
        result = await route.serve(request, parsed)
        return shape(request.method, request.version, result, server_info)

    async def _list_tools(self, request: Request, params: types.PaginatedRequestParams) -> BaseModel:
        return await self.gateway.list_tools(request.caller.session)

    async def _call_tool(
        self, request: Request, params: ToolRequest | types.CallToolRequestParams
    ) -> Mapping[str, Any]:
        call = params if isinstance(params, ToolRequest) else ToolRequest.of(params)
        return await self.gateway.call_tool(request.caller, call)

    async def _list_prompts(self, request: Request, params: types.PaginatedRequestParams) -> BaseModel:
        return await self.gateway.list_prompts()

    async def _get_prompt(self, request: Request, params: types.GetPromptRequestParams) -> Mapping[str, Any]:
        return await self.gateway.get_prompt(params)

    async def _list_resources(self, request: Request, params: types.PaginatedRequestParams) -> BaseModel:
        return await self.gateway.list_resources()

    async def _list_resource_templates(self, request: Request, params: types.PaginatedRequestParams) -> BaseModel:
        return await self.gateway.list_resource_templates()

    async def _read_resource(self, request: Request, params: types.ReadResourceRequestParams) -> Mapping[str, Any]:
        return await self.gateway.read_resource(params)
