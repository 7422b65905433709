"""Running the gateway downstream: over stdio (the default), or streamable HTTP at `/mcp`.

HTTP binds 127.0.0.1 unless told otherwise, checks `Host` and `Origin` against the bound address
(DNS-rebinding protection), and with `[gateway.http] token` set, refuses any request that does not
carry `Authorization: Bearer <token>` (compared in constant time) with 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit import CallAudit, Recorder
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.pins import load_lock
from gateway.policy_files import load_engine
from gateway.server import Gateway
from gateway.stdio import serve_stdio_connection
from gateway.upstreams import UpstreamPool

logger = logging.getLogger(__name__)

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STOP_GRACE = 3.0
"""Seconds a signalled gateway has to stop in order before it exits regardless."""


async def serve_stdio(config: Config) -> None:
    """Serve one agent over this process's stdin/stdout until it hangs up (or SIGTERM / SIGINT)."""
    async with gateway_for(config, transport="stdio") as gateway, anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        await tg.start(gateway.run)
        await serve_stdio_connection(gateway)
        gateway.audit.end_session(gateway.stdio_session, "the client disconnected")
        tg.cancel_scope.cancel()


async def serve_http(config: Config, host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp until cancelled (port 0 picks a free port)."""
    async with gateway_for(config, transport="http") as gateway:
        await _serve_http(gateway, config, host, port)


async def _serve_http(gateway: Gateway, config: Config, host: str, port: int) -> None:
    settings = config.gateway.http
    if not _is_loopback(host) and settings.token is None:
        logger.warning("serving on %s without [gateway.http] token: anyone who can reach it can use every tool", host)
    with _listen(host, port) as sock:
        port = sock.getsockname()[1]
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*_host_patterns(host, port), *settings.allowed_hosts],
            allowed_origins=[*(f"http://{name}:*" for name in _LOOPBACK_NAMES), *settings.allowed_origins],
        )
        app: ASGIApp = gateway.server.streamable_http_app(host=host, transport_security=security)
        app = SessionEnds(app, gateway.audit)
        if settings.token is not None:
            app = BearerTokenGuard(app, settings.token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run)
            logger.info("serving streamable HTTP at http://%s:%d/mcp", host, port)
            await server.serve(sockets=[sock])
            tg.cancel_scope.cancel()


@asynccontextmanager
async def gateway_for(config: Config, *, transport: str) -> AsyncIterator[Gateway]:
    """Load the policies (a broken set stops start-up with one line), open the audit log, assemble the gateway.

    The audit recorder outlives everything that serves, so calls cancelled at shutdown still get
    their outcome recorded; then every session still open is recorded as ended.
    """
    engine = load_engine(config)
    if engine.monitor_mode:
        logger.warning("monitor mode: policy decisions are recorded, nothing is refused")
    lock = load_lock(config)
    async with Recorder(config.audit_path, sync=config.gateway.audit_sync).running() as recorder:
        audit = CallAudit(recorder, engine)
        try:
            yield Gateway(UpstreamPool(config, lock=lock), engine, audit, transport=transport)
        finally:
            audit.end_all("the gateway shut down")


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM or SIGINT: stop serving in order (calls in flight are recorded as cancelled).

    Input that is not a pipe (a terminal, a file) is read by the SDK's transport in a worker thread
    that only returns when a line or the end of input arrives; should shutting down stall on it, the
    process exits after a grace period anyway.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("%s received: shutting down", signal.Signals(received).name)
            scope.cancel()
            deadline = threading.Timer(STOP_GRACE, os._exit, (128 + received,))
            deadline.daemon = True
            deadline.start()
            return


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so the address is taken (and a chosen port 0 known) up front."""
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_patterns(host: str, port: int) -> list[str]:
    if _is_loopback(host):
        return [f"{name}:{port}" for name in _LOOPBACK_NAMES]
    return [f"{host}:{port}"]


class SessionEnds:
    """ASGI middleware: a `DELETE` of an MCP session (the client hanging up) ends its audit session."""

    def __init__(self, app: ASGIApp, audit: CallAudit) -> None:
        self._app = app
        self._audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "DELETE":
            session = next((value for key, value in scope["headers"] if key == b"mcp-session-id"), None)
            if session is not None:
                self._audit.end_session(session.decode("latin-1"), "the client ended the session")


class BearerTokenGuard:
    """ASGI middleware: every HTTP request must carry the configured bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        supplied = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        if hmac.compare_digest(supplied, self._expected):
            await self._app(scope, receive, send)
            return
        body = json.dumps({"error": "unauthorized", "error_description": "a valid bearer token is required"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer realm="mcp-armor"'),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
