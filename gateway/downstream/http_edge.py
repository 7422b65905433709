"""The edge of the HTTP face: the listening socket, the ASGI guards in front of the SDK's app, and uvicorn
stopping in order.

HTTP binds 127.0.0.1 unless told otherwise; `host_patterns` gives the `Host` values the DNS-rebinding
protection accepts for the bound address. With `[gateway.http] token` set, `BearerTokenGuard` refuses
any request that does not carry `Authorization: Bearer <token>` (compared in constant time) with 401.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.core.sessions import Sessions
from gateway.downstream.shutdown import stopping
from gateway.errors import GatewayError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before serving, so the address is taken (and a chosen port 0 known) up front.

    The socket is made with its protocol named (`IPPROTO_TCP`, not 0): the connections it accepts
    inherit it, and asyncio turns Nagle's algorithm off (`TCP_NODELAY`) only on sockets that say they
    are TCP. Without it a response's body, written after its headers, waits for the client's delayed
    ACK: about 40 ms for every request after the first on a keep-alive connection.
    """
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise GatewayError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_patterns(host: str, port: int) -> list[str]:
    if is_loopback(host):
        return [f"{name}:{port}" for name in LOOPBACK_NAMES]
    return [f"{host}:{port}"]


class SessionEnds:
    """ASGI middleware: a `DELETE` of an MCP session (the client hanging up) ends its audit session."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self._app = app
        self._sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
        if scope["type"] == "http" and scope["method"] == "DELETE":
            session = next((value for key, value in scope["headers"] if key == b"mcp-session-id"), None)
            if session is not None:
                self._sessions.end(session.decode("latin-1"), "the client ended the session")


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


class StoppingInOrder(uvicorn.Server):
    """uvicorn, stopping in order on SIGTERM or SIGINT, but without raising the signal again once stopped
    (which would end the process before the gateway records the end of every session and commits it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            stopping(sig)
        super().handle_exit(sig, frame)
