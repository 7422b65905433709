"""The edge of the HTTP face: the listening socket, the ASGI guards in front of the SDK's app, and uvicorn
stopping in order.

HTTP binds 127.0.0.1 unless told otherwise; `host_patterns` gives the `Host` values the DNS-rebinding
protection accepts for the bound address. With credentials configured, `Authenticate` refuses any
request whose `Authorization: Bearer` credential no authenticator (`gateway.principals`) accepts with
401, and hands the principal it stands for to everything behind it; without them, `UntilPrincipals`
starts requiring it once a principal is added. `SessionOwners` keeps each handshake-era session to
the principal that opened it.
`MessageGuard` reads each POSTed message as the stdio face reads a line: over `[gateway]
max_message_size` it is answered 413, and malformed JSON-RPC (or numbers JSON cannot carry) is
answered with the error JSON-RPC names, before the SDK sees it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.core.sessions import Sessions
from gateway.downstream.messages import Unreadable, read_message
from gateway.downstream.shutdown import stopping
from gateway.errors import GatewayError
from gateway.policy.nesting import MAX_NESTING, cut_below, nests_deeper
from gateway.principals import SCOPE_KEY, Authenticator, Unauthenticated, principal_in
from gateway.principals.store import LocalTokens
from gateway.wire.framing import KEPT, Oversize

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SESSION_NOT_FOUND = {"code": -32600, "message": "Session not found"}
"""The SDK's answer (with 404) to a request for a session it does not know."""


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


class SessionOwners:
    """ASGI middleware: a handshake-era HTTP session belongs to the principal that opened it.

    The `mcp-session-id` the SDK issues in its answer to an opening request is noted with that
    request's principal; a request (POST, GET, DELETE) carrying the id from any other principal is
    answered as an unknown session is (404) before the SDK sees it, and logged. A `DELETE` ends the
    audit session (and drops its rate-limit counts) only once the SDK has accepted it (2xx): one it
    refuses, for a foreign `Host` say, leaves the session open. Without credentials every request is
    the same anonymous principal, so nothing tells sessions' owners apart.
    """

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self._app = app
        self._sessions = sessions
        self._owners: dict[str, str | None] = {}

    def forget(self, session_id: str) -> None:
        """The session is closed (its id now answers 404 anyway)."""
        self._owners.pop(session_id, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        principal = principal_in(scope)
        owner = principal.name if principal is not None else None
        presented = _header(scope, b"mcp-session-id")
        if presented is not None and presented in self._owners and self._owners[presented] != owner:
            logger.warning(
                "an HTTP request from %s carried the session id of another principal's session: answered 404",
                f"principal {owner!r}" if owner is not None else "an unauthenticated client",
            )
            await _answer(send, 404, {"jsonrpc": "2.0", "id": None, "error": SESSION_NOT_FOUND})
            return
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                issued = next((value for key, value in message.get("headers", ()) if key == b"mcp-session-id"), None)
                if presented is None and issued is not None and status < 400:
                    self._owners[issued.decode("latin-1")] = owner
            await send(message)

        await self._app(scope, receive, watched)
        if scope["method"] == "DELETE" and presented is not None and 200 <= status < 300:
            self.forget(presented)
            self._sessions.end(presented, "the client ended the session")


def _header(scope: Scope, name: bytes) -> str | None:
    value = next((value for key, value in scope["headers"] if key == name), None)
    return value.decode("latin-1") if value is not None else None


class Authenticate:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <credential>` that one of
    the authenticators accepts; the principal it stands for is left in the scope (`SCOPE_KEY`) for
    everything behind. Anything else is answered 401 with `WWW-Authenticate: <challenge>`."""

    def __init__(self, app: ASGIApp, authenticators: Sequence[Authenticator], challenge: str) -> None:
        self._app = app
        self._authenticators = tuple(authenticators)
        self._challenge = challenge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        supplied = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        scheme, _, credential = supplied.decode("latin-1").partition(" ")
        credential = credential.strip()
        why = "a valid bearer token is required"
        if scheme.lower() == "bearer" and credential:
            try:
                for authenticator in self._authenticators:
                    principal = await authenticator.authenticate(credential)
                    if principal is not None:
                        await self._app({**scope, SCOPE_KEY: principal}, receive, send)
                        return
            except Unauthenticated as refused:
                why = str(refused)
                logger.warning("an HTTP request was refused: %s", why)
        error = "invalid_token" if credential else "unauthorized"
        body = json.dumps({"error": error, "error_description": why}).encode()
        challenge = self._challenge + (', error="invalid_token"' if credential else "")
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", challenge.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class UntilPrincipals:
    """ASGI middleware for a gateway started with no credentials: requests pass unauthenticated while the
    principals store names no one; from the first `mcp-armor principal add` on, every request goes
    through `guarded` (the running gateway needs no restart). A store that cannot be read guards too."""

    def __init__(self, app: ASGIApp, guarded: ASGIApp, principals: LocalTokens) -> None:
        self._app = app
        self._guarded = guarded
        self._principals = principals
        self._required = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._required and scope["type"] == "http":
            try:
                self._required = self._principals.holds_principals()
            except GatewayError:
                self._required = True
        await (self._guarded if self._required else self._app)(scope, receive, send)


class MessageGuard:
    """ASGI middleware: a POSTed body is read (up to `limit` bytes) and checked as a JSON-RPC message;
    one over the limit is answered 413, a malformed one 400 with JSON-RPC's error, each with a JSON-RPC
    error body; what passes goes on to the app, as it was read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        body = await self._read(scope, receive)
        message = read_message(body, self._limit)
        if isinstance(message, Unreadable):
            error = message.error or {"code": -32602, "message": f"Invalid request parameters: {message.why}"}
            logger.warning("an HTTP client sent %s; answered with error %s", message.why, error["code"])
            status = 413 if isinstance(body, Oversize) else 400
            await _answer(send, status, {"jsonrpc": "2.0", "id": message.id, "error": error})
            return
        assert isinstance(body, bytes)
        cut = _cut_deep_arguments(message, body)
        if cut is not body:
            headers = [(key, value) for key, value in scope["headers"] if key != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(cut)).encode())]}
            body = cut
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes | Oversize:
        """The body, or its size and ends once it is over the limit (no more of it is kept)."""
        declared = next((value for key, value in scope["headers"] if key == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self._limit:
            return Oversize(int(declared), b"", b"")
        parts: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                break
            chunk = event.get("body", b"")
            if size <= self._limit:
                parts.append(chunk)
            size += len(chunk)
            if size > self._limit and len(parts) > 1:
                parts = [b"".join(parts)[:KEPT]]  # what is kept to find the id by; the rest is dropped
            if not event.get("more_body", False):
                break
        if size > self._limit:
            return Oversize(size, parts[0][:KEPT] if parts else b"", b"")
        return b"".join(parts)


def _cut_deep_arguments(message: dict[str, Any], body: bytes) -> bytes:
    """The body to pass on: as read, unless a request's arguments nest deeper than the gateway accepts.
    The SDK's reader stops at its own depth (a few hundred levels) and answers -32700, recording nothing;
    cut just below the limit, the arguments are still too deep, and the call is refused and recorded as
    on stdio. Nothing of them is forwarded either way."""
    params = message.get("params")
    if not isinstance(params, dict):
        return body
    arguments = params.get("arguments")
    if not isinstance(arguments, dict) or not nests_deeper(arguments):
        return body
    cut = {**message, "params": {**params, "arguments": cut_below(arguments, MAX_NESTING)}}
    return json.dumps(cut, ensure_ascii=False).encode()


async def _answer(send: Send, status: int, message: dict[str, object]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()  # compact, as the SDK answers
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
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
