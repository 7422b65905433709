"""Streamable HTTP: the gateway served by the SDK's dual-era `Server` and its ASGI app.

`GatewayServer` registers the dispatcher's routes, and only those, as the SDK server's handlers;
its middleware refuses (and records) any other method before the SDK routes it. A handshake-era
session is its `mcp-session-id` (owned by the principal that opened it, `SessionOwners`); stateless
2026-07-28 requests are one session per authenticated principal, whatever client they declare. A
`ProtocolError` becomes the SDK's `MCPError`, and list changes reach handshake-era sessions as
notifications and 2026-07-28 peers on their `subscriptions/listen` streams.

A handshake-era session with no request in flight for `[gateway.http] session_idle_timeout` is
closed by the SDK (its id then answers 404) and its end recorded; SIGTERM or SIGINT stops the server
in order (open requests get `STOP_REQUESTS_GRACE` to finish), and the gateway then records the end
of every session still open.

HTTP binds 127.0.0.1 unless told otherwise, serves HTTPS with `[gateway.http] tls_certificate` and
`tls_key`, and checks `Host` and `Origin` against the bound address (DNS-rebinding protection); the
socket, the TLS files, the client's address and the guards in front of the app are
`gateway.downstream.http_edge`'s. The console (`gateway.console`) is mounted at `/console` beside `/mcp`,
for principals with `role:approver` or `role:viewer`.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, get_args

import anyio
import mcp_types as types
import uvicorn
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.caching import CacheableMethod, CacheHint
from mcp.server.connection import Connection
from mcp.server.models import InitializationOptions
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ServerEvent,
    ToolsListChanged,
)
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.types import ASGIApp

from gateway.calls import SessionInfo
from gateway.config.models import Config
from gateway.console.access import PrincipalGate
from gateway.console.app import Mounted, console_app
from gateway.core.gateway import Gateway, ListKind
from gateway.core.requests import RELAYED, Caller, Request, relay_for
from gateway.core.shared_sessions import SessionRecords
from gateway.downstream.http_edge import (
    LOOPBACK_NAMES,
    Authenticate,
    ClientAddress,
    Health,
    MessageGuard,
    SessionOwners,
    StoppingInOrder,
    UntilPrincipals,
    address_of,
    host_patterns,
    is_loopback,
    listening_socket,
)
from gateway.downstream.resource_server import RequireScopes, ResourceMetadata, challenge
from gateway.errors import ProtocolError, format_seconds
from gateway.principals import Authenticator, Principal, SharedToken, principal_in
from gateway.principals.store import LocalTokens
from gateway.store.postgres import database
from gateway.wire.results import dump

logger = logging.getLogger(__name__)

Context = ServerRequestContext[Any, Any]
STOP_REQUESTS_GRACE = 1
"""Seconds open HTTP requests have to finish once the gateway is stopping (a GET stream never does by
itself); then they are cancelled, and so are the calls they wait for."""
_EVENTS: dict[ListKind, ServerEvent] = {
    "tools": ToolsListChanged(),
    "prompts": PromptsListChanged(),
    "resources": ResourcesListChanged(),
}


class GatewayServer(Server[Any]):
    """The SDK server in front of a `Gateway`, advertising list-changed (the HTTP app builds its own options)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._bus = InMemorySubscriptionBus()
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.dispatcher = gateway.dispatcher
        super().__init__(
            gateway.name,
            version=gateway.version,
            # The catalogue can change at any moment and differs per caller: nothing is cacheable.
            cache_hints={method: CacheHint() for method in get_args(CacheableMethod)},
            on_subscriptions_listen=partial(_list_changes_only, ListenHandler(self._bus)),
            get_tool_input_schema=gateway.input_schema,
        )
        # Every method the gateway serves is the dispatcher's (the SDK answers the connection's own).
        for method, route in self.dispatcher.routes.items():
            self.add_request_handler(method, route.params, partial(self._dispatch, method))
        # Tracing middleware stays off unless someone installs it on purpose; the one below refuses
        # what the gateway does not serve and remembers handshake-era connections for list changes.
        self.middleware = [self._guard]
        self.on_close: list[Callable[[str], None]] = []
        """Told of each handshake-era session's close, however it closed (by id), to forget what they kept."""
        gateway.announcers.append(self._announce)

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        changes = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        return super().create_initialization_options(changes, experimental_capabilities, extensions)

    async def _guard(self, ctx: Context, call_next: Callable[[Context], Awaitable[Any]]) -> Any:
        method = ctx.method
        unserved = None
        if ctx.request_id is not None:  # a request: notifications pass to the SDK, which drops those it does not take
            unserved = self.dispatcher.unserved(method, ctx.protocol_version, ctx.params)
        if unserved is not None:
            # Refused here, before the SDK could route it: default deny, recorded.
            refusal = await self.dispatcher.refuse(self._session_of(ctx), method, ctx.params, unserved)
            raise MCPError(refusal.code, refusal.message, refusal.data)
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            # The SDK hands out a new session proxy per message; the connection behind it is stable.
            connection = getattr(ctx.session, "_connection", None)
            if isinstance(connection, Connection) and connection not in self._connections:
                self._connections.add(connection)
                self._end_when_idle(connection)
                if connection.session_id is not None:
                    for forget in self.on_close:
                        connection.exit_stack.callback(forget, connection.session_id)
        try:
            return await call_next(ctx)
        except ProtocolError as exc:
            raise MCPError(exc.code, exc.message, exc.data) from None

    def _end_when_idle(self, connection: Connection) -> None:
        """Record the end of this handshake-era session should the SDK close it for being idle (a client's
        `DELETE` and the gateway stopping record theirs elsewhere, with their own reasons)."""
        session_id = connection.session_id
        # The SDK keeps each session's transport only in its manager; the transport's idle scope,
        # cancelled once nothing has been in flight for the idle timeout, is what says why it closed.
        # Read defensively: an SDK that keeps them otherwise leaves idle ends recorded at shutdown instead.
        instances = getattr(self.session_manager, "_server_instances", None)
        transport = instances.get(session_id) if isinstance(instances, dict) and session_id is not None else None
        if session_id is None or transport is None or not hasattr(transport, "idle_scope"):
            return
        timeout = self.gateway.pool.config.gateway.http.session_idle_timeout
        reason = f"no request for {format_seconds(timeout)} ([gateway.http] session_idle_timeout)"

        def closed() -> None:
            if transport.idle_scope is not None and transport.idle_scope.cancel_called:
                self.gateway.sessions.end(session_id, reason)

        connection.exit_stack.callback(closed)

    async def _announce(self, changed: list[ListKind]) -> None:
        for kind in changed:
            await self._bus.publish(_EVENTS[kind])
        for connection in list(self._connections):
            for kind in changed:
                if kind == "tools":
                    await connection.send_tool_list_changed()
                elif kind == "prompts":
                    await connection.send_prompt_list_changed()
                else:
                    await connection.send_resource_list_changed()

    def _session_of(self, ctx: Context) -> SessionInfo:
        """One HTTP session: a handshake-era request's `mcp-session-id` (the SDK has checked it is one of its
        sessions, `SessionOwners` that this principal opened it); a stateless 2026-07-28 request's
        authenticated principal. The client a request declares is recorded with it, never its identity."""
        info = ctx.session.client_params.client_info if ctx.session.client_params is not None else None
        name, version = (info.name, info.version) if info is not None else ("", "")
        principal = principal_in(ctx.request.scope) if ctx.request is not None else None
        header = None
        if ctx.request is not None and ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            header = ctx.request.headers.get("mcp-session-id")
        session_id = header or principal_session(principal)
        address = address_of(ctx.request.scope) if ctx.request is not None else ""
        return self.gateway.session_info(session_id, ctx.protocol_version, name, version, principal, address)

    async def _dispatch(self, method: str, ctx: Context, params: Any) -> dict[str, Any]:
        return await self.dispatcher.dispatch(Request(self._caller(ctx), method, ctx.params, params))

    def _caller(self, ctx: Context) -> Caller:
        """Who sent this request, and how the gateway reaches back to their client on this connection."""
        progress = None
        if ctx.meta is not None and ctx.meta.get("progress_token") is not None:

            async def progress(progress: float, total: float | None, message: str | None) -> None:
                await ctx.session.report_progress(progress, total, message)

        async def elicit(message: str, schema: dict[str, Any]) -> dict[str, Any]:
            try:
                result = await ctx.session.elicit_form(message, schema, ctx.request_id)
            except MCPError as exc:
                raise ProtocolError(exc.error.code, exc.error.message, exc.error.data) from None
            dumped: dict[str, Any] = result.model_dump(by_alias=True, mode="json")
            return dumped

        async def ask(method: str, params: Mapping[str, Any], checked: Any) -> dict[str, Any]:
            models = RELAYED[method]
            try:
                result = await ctx.session.send_request(
                    models.request(params=checked),
                    models.result,
                    metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
                )
            except MCPError as exc:  # the client's error, or no channel to ask it on (stateless HTTP)
                raise ProtocolError(exc.error.code, exc.error.message, exc.error.data) from None
            except ValidationError:
                raise ProtocolError(
                    types.INVALID_PARAMS, f"the client answered {method} with a malformed result"
                ) from None
            return dump(result)

        async def send_log(params: dict[str, Any]) -> None:
            message = types.LoggingMessageNotification(params=types.LoggingMessageNotificationParams(**params))
            await ctx.session.send_notification(message, related_request_id=ctx.request_id)

        capabilities = ctx.session.client_capabilities
        modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        connection = getattr(ctx.session, "_connection", None)
        updated = None
        if not modern and isinstance(connection, Connection):
            updated = connection.send_resource_updated
        caller = Caller(
            self._session_of(ctx),
            modern=modern,
            can_elicit=capabilities is not None and capabilities.elicitation is not None,
            progress=progress,
            elicit=None if modern else elicit,
            relay=None if modern else relay_for(capabilities, ask),
            updated=updated,
        )
        return self.gateway.notices.with_logs(caller, ctx.method, ctx.params, send_log)


def principal_session(principal: Principal | None) -> str:
    """The session of a principal's stateless 2026-07-28 requests (one fixed anonymous session when the
    gateway serves without credentials)."""
    key = f"principal\0{principal.name}" if principal is not None else "anonymous"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def _list_changes_only(
    listen: ListenHandler, ctx: Context, params: types.SubscriptionsListenRequestParams
) -> types.SubscriptionsListenResult:
    """A listen stream honours list changes; resource subscriptions are not honoured on it (no update
    would ever be sent there), so the acknowledgement does not claim them."""
    notifications = params.notifications.model_copy(update={"resource_subscriptions": None})
    return await listen(ctx, params.model_copy(update={"notifications": notifications}))


async def serve_streamable_http(
    gateway: Gateway,
    config: Config,
    host: str,
    port: int,
    principals: LocalTokens | None = None,
    *,
    tls: tuple[Path, Path] | None,
) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp, or https:// with `tls` (the certificate and key files
    `http_edge.tls_files` checked), until cancelled (port 0 picks a free port). Requests must authenticate
    when `[gateway.http] token` or `oauth` is set or the principals store names anyone (from the first
    principal added on, with the gateway running)."""
    settings = config.gateway.http
    scheme = "https" if tls is not None else "http"
    local = (
        principals if principals is not None else LocalTokens.open(config.principals_path)
    )  # one that cannot be read stops start-up
    credentials = settings.token is not None or settings.oauth is not None or local.holds_principals()
    if not is_loopback(host) and not credentials:
        logger.warning(
            "serving on %s without [gateway.http] token or any principal (`mcp-armor principal add`): "
            "anyone who can reach it can use every tool",
            host,
        )
    elif not is_loopback(host) and tls is None:
        logger.warning(
            "serving on %s without TLS ([gateway.http] tls_certificate): bearer tokens travel in clear text", host
        )
    with listening_socket(host, port) as sock:
        port = sock.getsockname()[1]
        origins = [f"{scheme}://{pattern}" for pattern in host_patterns(host, port)] if tls is not None else []
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*host_patterns(host, port), *settings.allowed_hosts],
            allowed_origins=[*(f"http://{name}:*" for name in LOOPBACK_NAMES), *origins, *settings.allowed_origins],
        )
        limit = config.gateway.max_message_size
        front = GatewayServer(gateway)
        app: ASGIApp = front.streamable_http_app(
            host=host,
            transport_security=security,
            session_idle_timeout=settings.session_idle_timeout,
            max_request_body_size=limit,
        )
        store = database(config)
        records = SessionRecords(store) if store is not None else None  # where each session lives, for the others
        owners = SessionOwners(MessageGuard(app, limit), gateway.sessions, records)
        front.on_close.append(owners.forget)
        app = owners
        authenticators: list[Authenticator] = []
        if settings.token is not None:
            authenticators.append(SharedToken(settings.token))
        if (oauth := settings.oauth) is not None:
            from gateway.principals.oauth import OAuthBearer  # PyJWT loads only for a gateway that takes its tokens

            authenticators.append(OAuthBearer(oauth))
            app = RequireScopes(app, oauth)
        authenticators.append(local)  # `principal add` ones, from the first principal on
        guarded = Authenticate(app, authenticators, 'Bearer realm="mcp-armor"' if oauth is None else challenge(oauth))
        # Credentials the file sets, or principals the store names at start, guard from the first request:
        # a store missing for a moment later on (moved aside, restored) must not open the gateway.
        app = guarded if credentials else UntilPrincipals(app, guarded, local)
        if oauth is not None:
            app = ResourceMetadata(app, oauth, security)  # before authentication: it tells where tokens come from
        # The console at /console: its own guard, for principals with a console role (the same authenticators).
        hosts = [*host_patterns(host, port), *settings.allowed_hosts]
        app = Mounted(console_app(config, PrincipalGate(authenticators), hosts, tls=tls is not None), app)
        # The client's address is settled in one place, `ClientAddress`: uvicorn's own reading of
        # X-Forwarded-For (on by default, for loopback peers) is off.
        app = ClientAddress(app, settings.trusted_proxies)
        app = Health(app)  # a load balancer's checks: no credentials, no log line
        server = StoppingInOrder(
            uvicorn.Config(
                app,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=STOP_REQUESTS_GRACE,
                proxy_headers=False,
                ssl_certfile=tls[0] if tls is not None else None,
                ssl_keyfile=tls[1] if tls is not None else None,
            )
        )
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run)
            if records is not None:
                await tg.start(records.run)
            logger.info("serving streamable HTTP at %s://%s:%d/mcp", scheme, host, port)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()
