"""The downstream MCP server: the one place where MCP types and gateway types meet.

It answers both protocol eras (the SDK's dual-era `Server`), over stdio or streamable HTTP. A
`tools/call` is resolved to its upstream tool, turned into a `ToolCall`, run through the pipeline,
and its `Outcome` returned as the `CallToolResult`. Errors become MCP results or JSON-RPC errors here
and nowhere else; an unexpected exception never reaches the wire with its text.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import anyio
import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.caching import CacheableMethod, CacheHint
from mcp.server.connection import Connection
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from gateway import __version__
from gateway.approvals import REQUEST_KEY, REQUESTED_SCHEMA, ApprovalDesk
from gateway.audit import CallAudit
from gateway.calls import Approval, Approver, Decision, ProgressFn, SessionInfo, ToolCall
from gateway.catalog import Catalog, ExposedTool
from gateway.errors import GatewayError, UpstreamError
from gateway.pins import Lock, LockError
from gateway.pipeline import Handler, build_pipeline
from gateway.policy import PolicyEngine, PolicySet
from gateway.upstreams import UpstreamPool
from gateway.watch import watch_file, watch_policies

logger = logging.getLogger(__name__)

Context = ServerRequestContext[Any, Any]
Elicit = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Sends `elicitation/create` (form mode) to the client and returns its result in wire form."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a `tools/call`, and what their connection can do."""

    session: SessionInfo
    modern: bool
    """A 2026-07-28 request: approval goes by input-required round trips, never by a request to the client."""
    can_elicit: bool
    """The client declared the elicitation capability."""
    progress: ProgressFn | None = None
    """Relays progress to the caller; `None` when the request carried no progress token."""
    elicit: Elicit | None = None


class GatewayServer(Server[Any]):
    """The SDK server, advertising list-changed on every transport (the HTTP app builds its own options)."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        changes = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        return super().create_initialization_options(changes, experimental_capabilities, extensions)


class Gateway:
    """Serves the pool's catalogue downstream and routes every tool call through the pipeline."""

    def __init__(self, pool: UpstreamPool, engine: PolicyEngine, audit: CallAudit, *, transport: str) -> None:
        self.pool = pool
        self.engine = engine
        self.audit = audit
        self.transport = transport
        self.pipeline: Handler = build_pipeline(pool, engine, audit)
        self.desk = ApprovalDesk(pool.config.gateway.ask_timeout)
        engine.index_tools(pool.catalog.tools)
        self._startup_timeout = pool.config.gateway.startup_timeout
        self._started = False
        self.stdio_session = uuid.uuid4().hex
        self._bus = InMemorySubscriptionBus()
        self._listen = ListenHandler(self._bus)
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._published = pool.catalog
        pool.set_listener(self._catalog_changed, audit.upstream_changed, audit.assessed)
        self.server = GatewayServer(
            pool.config.gateway.name,
            version=__version__,
            # The catalogue can change at any moment and differs per caller: nothing is cacheable.
            cache_hints={method: CacheHint() for method in get_args(CacheableMethod)},
            on_list_tools=self._list_tools,
            on_list_prompts=self._list_prompts,
            on_list_resources=self._list_resources,
            on_list_resource_templates=self._list_resource_templates,
            on_subscriptions_listen=self._listen,
            get_tool_input_schema=self._input_schema,
        )
        # These answer in wire form: upstream results pass through without a round trip via models.
        self.server.add_request_handler("tools/call", types.CallToolRequestParams, self._call_tool)
        self.server.add_request_handler("prompts/get", types.GetPromptRequestParams, self._get_prompt)
        self.server.add_request_handler("resources/read", types.ReadResourceRequestParams, self._read_resource)
        # Tracing middleware stays off unless someone installs it on purpose; the one below
        # remembers handshake-era connections so list changes can reach them.
        self.server.middleware = [self._remember_connection]

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the upstream pool and the policy watcher until cancelled."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.pool.run)
            policy_dir = self.pool.config.policy_dir
            tg.start_soon(
                watch_policies, policy_dir, self._revision, self.install_policies, self.audit.policy_reload_failed
            )
            tg.start_soon(watch_file, self.pool.config.lock_path, self.reload_lock)
            task_status.started()

    async def reload_lock(self) -> None:
        """`upstreams.lock` changed (an approval, say): put its pins in force; a damaged one changes nothing."""
        path = self.pool.config.lock_path
        try:
            lock = Lock.read(path)
        except LockError as exc:
            logger.error("%s; the pins in force stay", exc)
            self.audit.lock_reloaded("error", f"{exc}; the pins in force stay")
            return
        if lock is None and self.pool.lock is not None:
            logger.error("%s disappeared; the pins in force stay until the gateway restarts", path)
            self.audit.lock_reloaded("error", "the lock file disappeared; the pins in force stay")
            return
        await self.pool.install_lock(lock)
        held = len(self.pool.quarantined)
        logger.info("pins reloaded from %s: %d tools quarantined", path, held)
        self.audit.lock_reloaded("ok", f"{held} tools quarantined")

    def _revision(self) -> str:
        return self.engine.policies.revision

    async def install_policies(self, policies: PolicySet, trigger: str) -> None:
        """Put a new policy set in force; which tools are visible may change, so clients are told."""
        self.engine.replace_policies(policies)
        self.audit.policy_reloaded(policies.revision, len(policies.rules), list(policies.files), trigger)
        if self._started:
            await self._announce([ToolsListChanged()])

    async def _remember_connection(self, ctx: Context, call_next: Callable[[Context], Awaitable[Any]]) -> Any:
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            # The SDK hands out a new session proxy per message; the connection behind it is stable.
            connection = getattr(ctx.session, "_connection", None)
            if isinstance(connection, Connection) and connection not in self._connections:
                self._connections.add(connection)
        return await call_next(ctx)

    async def _catalog_changed(self, catalog: Catalog) -> None:
        """Tell every downstream peer what changed: notifications (handshake era) and listen streams (2026)."""
        before, self._published = self._published, catalog
        self.engine.index_tools(catalog.tools)
        self.audit.catalog_changed(_tool_definitions(before), _tool_definitions(catalog))
        if not self._started:
            return  # nobody has listed yet: the first list, which waits for start-up, tells it all
        events: list[Any] = []
        if _tool_signature(before) != _tool_signature(catalog):
            events.append(ToolsListChanged())
        if set(before.prompts) != set(catalog.prompts):
            events.append(PromptsListChanged())
        if set(before.resources) != set(catalog.resources) or len(before.templates) != len(catalog.templates):
            events.append(ResourcesListChanged())
        await self._announce(events)

    async def _announce(self, events: list[Any]) -> None:
        for event in events:
            await self._bus.publish(event)
        for connection in list(self._connections):
            for event in events:
                if isinstance(event, ToolsListChanged):
                    await connection.send_tool_list_changed()
                elif isinstance(event, PromptsListChanged):
                    await connection.send_prompt_list_changed()
                else:
                    await connection.send_resource_list_changed()

    async def _wait_for_startup(self) -> None:
        """The first lists wait for upstreams still starting, up to `startup_timeout`."""
        if not self._started:
            await self.pool.wait_settled(self._startup_timeout)
            self._started = True

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        tool = self.pool.catalog.tools.get(name)
        return dict(tool.source.definition["inputSchema"]) if tool is not None else None

    async def _list_tools(self, ctx: Context, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        await self._wait_for_startup()
        session = self._session_of(ctx)
        return types.ListToolsResult(
            tools=[tool.model for tool in self.pool.catalog.tools.values() if self._visible(tool, session)]
        )

    def _visible(self, tool: ExposedTool, session: SessionInfo) -> bool:
        return self.engine.visible(tool.name, client=session.client_name, principal=session.principal)

    async def _call_tool(self, ctx: Context, params: types.CallToolRequestParams) -> dict[str, Any]:
        """`tools/call` as the SDK server delivers it (HTTP, and stdio requests the direct path hands over)."""
        progress = None
        if ctx.meta is not None and ctx.meta.get("progress_token") is not None:

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                await ctx.session.report_progress(progress, total, message)

        async def elicit(message: str, schema: dict[str, Any]) -> dict[str, Any]:
            result = await ctx.session.elicit_form(message, schema, ctx.request_id)
            return result.model_dump(by_alias=True, mode="json")

        capabilities = ctx.session.client_capabilities
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        caller = Caller(
            self._session_of(ctx),
            modern=modern,
            can_elicit=capabilities is not None and capabilities.elicitation is not None,
            progress=progress,
            elicit=None if modern else elicit,
        )
        return _wire(ctx, await self.call_tool(caller, params))

    async def call_tool(self, caller: Caller, params: types.CallToolRequestParams) -> Mapping[str, Any]:
        """One `tools/call`, on either path: resolve the tool, run the pipeline, return the result (wire form).

        A tool that does not exist, is hidden from this caller or is quarantined raises `MCPError`.
        """
        await self._wait_for_startup()
        session = caller.session
        tool = self.pool.catalog.tools.get(params.name)
        if tool is None and (held := self.pool.quarantined.get(params.name)) is not None:
            reason = held.reason()
            await self.audit.unknown_tool(session, params.name, params.arguments or {}, quarantine=reason)
            raise MCPError(types.INVALID_PARAMS, f"Tool {params.name} is refused: {reason}")
        if tool is None or not self._visible(tool, session):
            # A tool no rule lets this client call is hidden, and refused like one that does not exist.
            await self.audit.unknown_tool(session, params.name, params.arguments or {})
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        approver = self._approver(caller, params)
        call = ToolCall(session, tool, params.arguments or {}, progress=caller.progress, approver=approver)
        try:
            outcome = await self.pipeline(call)
        except GatewayError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # the boundary: an unexpected fault is logged, never sent with its text
            logger.exception("tool call %s to %s failed inside the gateway", call.id, tool.name)
            raise MCPError(types.INTERNAL_ERROR, f"internal gateway error (call {call.id})") from None
        return outcome.result

    def _approver(self, caller: Caller, params: types.CallToolRequestParams) -> Approver | None:
        """How this request can ask a person: elicitation now (handshake era) or input-required (2026)."""
        if not caller.can_elicit:
            return None
        desk = self.desk
        if caller.modern:
            responses = params.input_responses or {}
            answer = responses.get(REQUEST_KEY)

            async def by_round_trip(call: ToolCall, decision: Decision) -> Approval:
                if params.request_state is None and answer is None:
                    return desk.pending(call, decision)
                response = answer.model_dump(by_alias=True, mode="json") if answer is not None else None
                return desk.redeem(params.request_state, response, call)

            return by_round_trip
        elicit = caller.elicit
        if elicit is None:
            return None

        async def by_elicitation(call: ToolCall, decision: Decision) -> Approval:
            try:
                result = await elicit(desk.message(call, decision), REQUESTED_SCHEMA)
            except MCPError as exc:
                return Approval(False, f"the client could not ask a person ({exc.error.message})")
            return desk.answer(result)

        return by_elicitation

    def stdio_session_info(self, protocol_version: str, client_name: str, client_version: str) -> SessionInfo:
        """The stdio connection as the direct path sees it (noted in the audit log the first time)."""
        session = SessionInfo(self.stdio_session, "stdio", protocol_version, client_name, client_version)
        self.audit.session(session)
        return session

    def _session_of(self, ctx: Context) -> SessionInfo:
        """One downstream connection: the stdio pipe, the HTTP `mcp-session-id`, or for stateless HTTP the client."""
        info = ctx.session.client_params.client_info if ctx.session.client_params is not None else None
        name, version = (info.name, info.version) if info is not None else ("", "")
        session_id = self.stdio_session
        if self.transport == "http":
            header = ctx.request.headers.get("mcp-session-id") if ctx.request is not None else None
            session_id = header or hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:32]
        session = SessionInfo(session_id, self.transport, ctx.protocol_version, name, version)
        self.audit.session(session)
        return session

    async def _list_prompts(self, ctx: Context, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        await self._wait_for_startup()
        return types.ListPromptsResult(prompts=[prompt.model for prompt in self.pool.catalog.prompts.values()])

    async def _get_prompt(self, ctx: Context, params: types.GetPromptRequestParams) -> dict[str, Any]:
        await self._wait_for_startup()
        prompt = self.pool.catalog.prompts.get(params.name)
        if prompt is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        request: dict[str, Any] = {"name": prompt.upstream_name}
        if params.arguments:
            request["arguments"] = params.arguments
        return _wire(ctx, await self._forward(prompt.upstream, "prompts/get", request))

    async def _list_resources(
        self, ctx: Context, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        await self._wait_for_startup()
        return types.ListResourcesResult(resources=[resource for _, resource in self.pool.catalog.resources.values()])

    async def _list_resource_templates(
        self, ctx: Context, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        await self._wait_for_startup()
        templates = [template for _, _, template in self.pool.catalog.templates]
        return types.ListResourceTemplatesResult(resource_templates=templates)

    async def _read_resource(self, ctx: Context, params: types.ReadResourceRequestParams) -> dict[str, Any]:
        await self._wait_for_startup()
        upstream = self.pool.catalog.resource_upstream(params.uri)
        if upstream is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown resource: {params.uri}")
        return _wire(ctx, await self._forward(upstream, "resources/read", {"uri": params.uri}))

    async def _forward(self, upstream: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.pool.get(upstream).require_session().request(method, params)
        except UpstreamError as exc:
            raise MCPError(types.INTERNAL_ERROR, str(exc)) from None


def _wire(ctx: Context, result: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream's handshake-era result, shaped for the era this downstream request speaks."""
    wire = dict(result)
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        wire.setdefault("resultType", "complete")
    return wire


def _tool_definitions(catalog: Catalog) -> dict[str, tuple[str, str, Any]]:
    return {name: (tool.upstream, tool.source.digest, tool.source.definition) for name, tool in catalog.tools.items()}


def _tool_signature(catalog: Catalog) -> list[tuple[str, str]]:
    return [(name, tool.source.digest) for name, tool in catalog.tools.items()]
