"""The edge of the HTTP face: the listening socket, the ASGI guards in front of the SDK's app, and uvicorn
stopping in order.

HTTP binds 127.0.0.1 unless told otherwise; `host_patterns` gives the `Host` values the DNS-rebinding
protection accepts for the bound address. With credentials configured, `Authenticate` refuses any
request whose `Authorization: Bearer` credential no authenticator (`gateway.principals`) accepts with
401, and hands the principal it stands for to everything behind it; without them, `UntilPrincipals`
starts requiring it once a principal is added; an open stream ends once its request would no longer
be let in (`while_admitted`). `SessionOwners` keeps each handshake-era session to the principal
that opened it.
`MessageGuard` reads each POSTed message as the stdio face reads a line: over `[gateway]
max_message_size` it is answered 413, and malformed JSON-RPC (or numbers JSON cannot carry) is
answered with the error JSON-RPC names, before the SDK sees it; so is a message whose routing headers
(`Mcp-Method`, `Mcp-Name`) say something other than its body, in either era.
`ClientAddress` is the one place the client's address is settled (uvicorn's own proxy handling is off):
the TCP peer, or, when that peer is one of `[gateway.http] trusted_proxies`, the address it forwards.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import signal
import socket
import ssl
import stat
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import uvicorn
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    NAME_BEARING_METHODS,
    decode_header_value,
    find_duplicated_routing_header,
)
from mcp_types import HEADER_MISMATCH
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config.models import Config
from gateway.core.sessions import Sessions
from gateway.core.shared_sessions import SessionRecords
from gateway.downstream.messages import Unreadable, read_message
from gateway.downstream.shutdown import stopping
from gateway.errors import ConfigError, GatewayError
from gateway.policy.nesting import MAX_NESTING, cut_below, nests_deeper
from gateway.principals import SCOPE_KEY, Authenticator, Principal, Unauthenticated, principal_in
from gateway.principals.store import LocalTokens
from gateway.wire.framing import KEPT, Oversize

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SESSION_NOT_FOUND = {"code": -32600, "message": "Session not found"}
"""The SDK's answer (with 404) to a request for a session it does not know."""
SESSIONS_PER_PRINCIPAL = 1000
"""Handshake-era sessions one principal may hold open at once: a tenth of what the SDK holds in all
(10,000), so no one principal can take every place and leave the others refused."""
TOO_MANY_SESSIONS = {"code": -32603, "message": "Too many open sessions for this principal"}
STREAM_RECHECK = 2.0
"""Seconds between checks that an open GET stream's request would still be let in."""


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


def tls_files(config: Config) -> tuple[Path, Path] | None:
    """The certificate and key `[gateway.http]` serves HTTPS with, checked as the server will load them,
    or `None` for plain HTTP; `ConfigError` naming the key and file for one that cannot serve."""
    settings = config.gateway.http
    if settings.tls_certificate is None or settings.tls_key is None:
        return None
    certificate, key = config.directory / settings.tls_certificate, config.directory / settings.tls_key
    where = f"{config.path}: [gateway.http]"
    for name, path in (("tls_certificate", certificate), ("tls_key", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{where} {name}: cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=certificate)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{where} tls_certificate: {certificate} holds no PEM certificate") from None
    try:
        # A password callback that gives none: an encrypted key fails here instead of prompting on a terminal.
        context.load_cert_chain(certificate, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{where} tls_key: {key} is not the key of the certificate {certificate}") from None
        raise ConfigError(f"{where} tls_key: {key} is not an unencrypted PEM private key") from None
    mode = key.stat().st_mode
    if mode & 0o077:
        # Warned, not refused: orchestrators mount secrets readable by the group (Kubernetes: 0644) by
        # default, where the container's user is the only one; on a shared host, it is the owner's to fix.
        logger.warning(
            "%s tls_key: %s can be read by others (mode %o); make it its owner's only (chmod 600)",
            where,
            key,
            stat.S_IMODE(mode),
        )
    return certificate, key


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_of(scope: Scope) -> str:
    """The client's address as `ClientAddress` settled it ("" when the server could not tell)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


HEALTH_PATH = "/healthz"


class Health:
    """ASGI middleware: `GET /healthz` (or `HEAD`) is answered 200 `ok` before anything else sees it, so a
    load balancer can tell a replica is serving without credentials and without a log line per check.
    It says nothing about the gateway beyond that it answers."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == HEALTH_PATH and scope["method"] in ("GET", "HEAD"):
            await respond(send, 200, b"ok\n", [(b"content-type", b"text/plain"), (b"cache-control", b"no-store")])
            return
        await self._app(scope, receive, send)


class ClientAddress:
    """ASGI middleware: `scope["client"]` becomes the client's address. That is the TCP peer's, unless the
    peer is a trusted proxy: then the right-most address its forwarding header names that is not itself a
    trusted proxy (addresses left of it were written by whoever sent the request, and prove nothing).

    A request from a trusted proxy carrying both `Forwarded` and `X-Forwarded-For` is recorded as the
    proxy's: which one the proxy wrote cannot be told, and the other is the client's to choose. An
    unreadable hop ends the walk at the last trusted one."""

    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[str]) -> None:
        self._app = app
        self._trusted = tuple(ipaddress.ip_network(value) for value in trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "client": self._client(scope)}
        await self._app(scope, receive, send)

    def _trusts(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def _client(self, scope: Scope) -> tuple[str, int] | None:
        peer = scope.get("client")
        if not peer:
            return None
        address = _peer_address(str(peer[0]))
        if address is None or not self._trusts(address):
            return (str(address or peer[0]), peer[1])
        forwarded = [value for key, value in scope["headers"] if key == b"forwarded"]
        listed = [value for key, value in scope["headers"] if key == b"x-forwarded-for"]
        if forwarded and listed:
            logger.warning(
                "a request through the trusted proxy %s carries both Forwarded and X-Forwarded-For; "
                "recorded as the proxy's (which one the proxy wrote cannot be told)",
                address,
            )
            return (str(address), peer[1])
        hops = _forwarded_for(forwarded) if forwarded else [_address(hop) for hop in _items(listed)]
        client = address
        for hop in reversed(hops):
            if hop is None:
                break
            client = hop
            if not self._trusts(hop):
                break
        return (str(client), peer[1] if client == address else 0)


def _items(values: list[bytes]) -> list[str]:
    """The comma-separated items of every copy of a header, in order."""
    return [item for value in values for item in value.decode("latin-1").split(",")]


def _forwarded_for(values: list[bytes]) -> list[IPAddress | None]:
    """The `for=` of each element of `Forwarded` (RFC 7239), `None` where an element has none readable."""
    hops: list[IPAddress | None] = []
    for element in _items(values):
        pairs = (pair.partition("=") for pair in element.split(";"))
        found = [value for key, _, value in pairs if key.strip().lower() == "for"]
        hops.append(_address(found[0]) if len(found) == 1 else None)
    return hops


@functools.lru_cache(maxsize=1024)
def _peer_address(text: str) -> IPAddress | None:
    """`_address` of a TCP peer, remembered: a client's requests come from the same few addresses."""
    return _address(text)


def _address(text: str) -> IPAddress | None:
    """An address as a forwarding header or the server writes it (`"[2001:db8::1]:4711"`, `192.0.2.1:80`),
    or `None` (`unknown`, an obfuscated name, garbage). An IPv4 address mapped into IPv6 reads as IPv4."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text, bracket, _ = text[1:].partition("]")
        if not bracket:
            return None
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class SessionOwners:
    """ASGI middleware: a handshake-era HTTP session belongs to the principal that opened it.

    The `mcp-session-id` the SDK issues in its answer to an opening request is noted with that
    request's principal; a request (POST, GET, DELETE) carrying the id from any other principal is
    answered as an unknown session is (404) before the SDK sees it, and logged. A `DELETE` ends the
    audit session (and drops its rate-limit counts) only once the SDK has accepted it (2xx): one it
    refuses, for a foreign `Host` say, leaves the session open. Without credentials every request is
    the same anonymous principal, so nothing tells sessions' owners apart. A principal holding
    `SESSIONS_PER_PRINCIPAL` sessions (or opening them) is refused another (503) until one closes.

    With a shared store (`records`), the sessions it opens and closes are recorded there, and a
    handshake-era request for a session another replica holds is answered 404 saying which replica
    that is: the load balancer in front must route by `mcp-session-id` (docs/deploy.md).
    """

    def __init__(self, app: ASGIApp, sessions: Sessions, records: SessionRecords | None = None) -> None:
        self._app = app
        self._sessions = sessions
        self._records = records
        self._owners: dict[str, str | None] = {}
        self._held: Counter[str | None] = Counter()
        """Per owner, its sessions open and its requests that may open one now."""

    def forget(self, session_id: str) -> None:
        """The session is closed (its id now answers 404 anyway)."""
        if session_id in self._owners:
            self._release(self._owners.pop(session_id))
            if self._records is not None:
                self._records.closed(session_id)

    def _release(self, owner: str | None) -> None:
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]

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
        if (
            presented is not None
            and presented not in self._owners
            and await self._elsewhere(scope, send, presented, owner)
        ):
            return
        opening = presented is None and _header(scope, b"mcp-protocol-version") in (None, *HANDSHAKE_PROTOCOL_VERSIONS)
        if opening:
            if self._held[owner] >= SESSIONS_PER_PRINCIPAL:
                logger.warning(
                    "%s has %d sessions open: a request opening another was answered 503",
                    f"principal {owner!r}" if owner is not None else "the anonymous principal",
                    SESSIONS_PER_PRINCIPAL,
                )
                await _answer(send, 503, {"jsonrpc": "2.0", "id": None, "error": TOO_MANY_SESSIONS})
                return
            self._held[owner] += 1  # held while it is answered, so that simultaneous openings count too
        status = 0
        kept = False

        async def watched(message: Message) -> None:
            nonlocal status, kept
            if message["type"] == "http.response.start":
                status = message["status"]
                issued = next((value for key, value in message.get("headers", ()) if key == b"mcp-session-id"), None)
                if opening and issued is not None and status < 400:
                    self._owners[issued.decode("latin-1")] = owner
                    kept = True
                    if self._records is not None:
                        self._records.opened(issued.decode("latin-1"), owner)
            await send(message)

        try:
            await self._app(scope, receive, watched)
        finally:
            if opening and not kept:
                self._release(owner)
        if scope["method"] == "DELETE" and presented is not None and 200 <= status < 300:
            self.forget(presented)
            self._sessions.end(presented, "the client ended the session")

    async def _elsewhere(self, scope: Scope, send: Send, presented: str, owner: str | None) -> bool:
        """Whether a handshake-era request for a session this replica does not hold was answered 404 here
        because the store says another replica holds it (a stateless 2026-07-28 request's id names nothing)."""
        if self._records is None or _header(scope, b"mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS:
            return False
        holder = await self._records.holder(presented, owner)
        if holder is None:
            return False
        logger.warning(
            "a request for a session held by replica %s reached replica %s: the load balancer must route "
            "requests by mcp-session-id (docs/deploy.md); answered 404",
            holder,
            self._records.replica,
        )
        message = (
            f"Session not found: it lives on replica {holder}, and the load balancer must route requests "
            "by mcp-session-id (docs/deploy.md)"
        )
        error = {**SESSION_NOT_FOUND, "message": message}
        await _answer(send, 404, {"jsonrpc": "2.0", "id": None, "error": error})
        return True


def _header(scope: Scope, name: bytes) -> str | None:
    value = next((value for key, value in scope["headers"] if key == name), None)
    return value.decode("latin-1") if value is not None else None


class Authenticate:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <credential>` that one of
    the authenticators accepts; the principal it stands for is left in the scope (`SCOPE_KEY`) for
    everything behind. Anything else is answered 401 with `WWW-Authenticate: <challenge>`; a request
    carrying more than one `Authorization` header is answered 400 `invalid_request` (RFC 6750)."""

    def __init__(self, app: ASGIApp, authenticators: Sequence[Authenticator], challenge: str) -> None:
        self._app = app
        self._authenticators = tuple(authenticators)
        self._challenge = challenge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        supplied = [value for key, value in scope["headers"] if key == b"authorization"]
        if len(supplied) > 1:
            # Which one counts is for each reader to guess (a proxy in front may read the last): none does.
            why = "the request carries more than one Authorization header"
            logger.warning("an HTTP request from %s was refused: %s", address_of(scope) or "an unknown address", why)
            await _answer(send, 400, {"error": "invalid_request", "error_description": why})
            return
        scheme, _, credential = (supplied[0] if supplied else b"").decode("latin-1").partition(" ")
        credential = credential.strip()
        why = "a valid bearer token is required"
        principal = None
        if scheme.lower() == "bearer" and credential:
            try:
                principal = await self._authenticate(credential)
            except Unauthenticated as refused:
                why = str(refused)
        if principal is not None:
            name = principal.name

            async def admitted() -> bool:
                try:
                    again = await self._authenticate(credential)
                except Unauthenticated:
                    return False
                return again is not None and again.name == name

            await while_admitted(self._app, {**scope, SCOPE_KEY: principal}, receive, send, admitted)
            return
        logger.warning("an HTTP request from %s was refused: %s", address_of(scope) or "an unknown address", why)
        error = "invalid_token" if credential else "unauthorized"
        body = json.dumps({"error": error, "error_description": why}).encode()
        challenge = self._challenge + (', error="invalid_token"' if credential else "")
        await respond(
            send,
            401,
            body,
            [(b"content-type", b"application/json"), (b"www-authenticate", challenge.encode("latin-1"))],
        )

    async def _authenticate(self, credential: str) -> Principal | None:
        """The principal `credential` stands for, `None` when no authenticator knows its kind; raises
        `Unauthenticated` when the one that does refuses it."""
        for authenticator in self._authenticators:
            principal = await authenticator.authenticate(credential)
            if principal is not None:
                return principal
        return None


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
        if scope["type"] == "http" and not self._requires():
            await while_admitted(self._app, scope, receive, send, self._unguarded)
            return
        await self._guarded(scope, receive, send)

    def _requires(self) -> bool:
        """Whether requests must authenticate: from the first principal on, for good."""
        if not self._required:
            try:
                self._required = self._principals.holds_principals()
            except GatewayError:
                self._required = True
        return self._required

    async def _unguarded(self) -> bool:
        return not self._requires()


async def while_admitted(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, admitted: Callable[[], Awaitable[bool]]
) -> None:
    """Serve a request whose answer can outlast the check it passed (a GET stream, a 2026-07-28 listen
    stream, a long call's events) only while `admitted()`, asked every `STREAM_RECHECK` seconds while
    the app waits on the client and before each event of a streamed answer: once refused (a token
    revoked or expired, a first principal added), the client reads as gone and nothing more is sent."""
    refused = False
    started = completed = False

    async def check() -> bool:
        nonlocal refused
        if not refused and not await admitted():
            refused = True
            logger.warning(
                "an open HTTP stream from %s would no longer be let in: ended",
                address_of(scope) or "an unknown address",
            )
        return not refused

    async def receiving() -> Message:
        while not refused:
            with anyio.move_on_after(STREAM_RECHECK):
                return await receive()
            await check()
        return {"type": "http.disconnect"}

    async def sending(message: Message) -> None:
        nonlocal started, completed
        if message["type"] == "http.response.body" and message.get("more_body", False) and not await check():
            return  # what the stream would carry next is not sent
        started = started or message["type"] == "http.response.start"
        completed = message["type"] == "http.response.body" and not message.get("more_body", False)
        await send(message)

    await app(scope, receiving, sending)
    if refused and started and not completed:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


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
            logger.warning(
                "an HTTP client at %s sent %s; answered with error %s", address_of(scope), message.why, error["code"]
            )
            status = 413 if isinstance(body, Oversize) else 400
            await _answer(send, status, {"jsonrpc": "2.0", "id": message.id, "error": error})
            return
        misrouted = _misrouted(scope["headers"], message)
        if misrouted is not None:
            logger.warning(
                "an HTTP client at %s sent %s; answered with error %s", address_of(scope), misrouted, HEADER_MISMATCH
            )
            error = {"code": HEADER_MISMATCH, "message": f"Header mismatch: {misrouted}"}
            await _answer(send, 400, {"jsonrpc": "2.0", "id": message.get("id"), "error": error})
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


def _misrouted(headers: Sequence[tuple[bytes, bytes]], message: dict[str, Any]) -> str | None:
    """What is wrong with the message's routing headers, if anything: `Mcp-Method` must name the body's
    method and `Mcp-Name` the tool, prompt or resource it names, and neither may come twice. Whoever routes
    or filters on them in front of the gateway must see what the gateway serves. Present, they are checked
    in either era; a 2026-07-28 request without them is refused by the SDK, which requires them."""
    named = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in headers]
    duplicated = find_duplicated_routing_header(named)
    if duplicated is not None:
        return f"the {duplicated} header appears more than once"
    method = message.get("method")
    if method is None:  # a response to the gateway's own request: nothing routes on it
        return None
    given = dict(named)
    if MCP_METHOD_HEADER in given and given[MCP_METHOD_HEADER] != method:
        return f"the {MCP_METHOD_HEADER} header does not name the body's method"
    key = NAME_BEARING_METHODS.get(method)
    params = message.get("params")
    if key is not None and MCP_NAME_HEADER in given:
        value = params.get(key) if isinstance(params, dict) else None
        if decode_header_value(given[MCP_NAME_HEADER]) != value:
            return f"the {MCP_NAME_HEADER} header does not name the body's params.{key}"
    return None


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


async def respond(send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Answer a request the app is not to see: `status`, `headers` and `body` (its length added)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _answer(send: Send, status: int, message: dict[str, object]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()  # compact, as the SDK answers
    await respond(send, status, body, [(b"content-type", b"application/json")])


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
