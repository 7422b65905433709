"""Who may open the console, and the guard in front of every one of its requests.

A browser cannot send a bearer header when it navigates, so the console is opened with a token in the
URL (`/console/?token=…`), exchanged once for a session cookie (HttpOnly, SameSite=Strict, Path=/console,
Secure over TLS) and a redirect that takes the token out of the address bar. Standalone, the token is a
random one printed at start; inside `serve --http`, it is the principal's own token, checked by the
gateway's authenticators again on every request so that a revocation ends the session. Every request's
`Host` must be one the console answers to (DNS rebinding), and a POST must carry the session's CSRF
token and the console's own `Origin`.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Protocol
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.audit.store import os_user
from gateway.downstream.http_edge import respond
from gateway.errors import Forbidden
from gateway.principals import Authenticator, Principal, Unauthenticated

PREFIX = "/console"
COOKIE = "mcpa_console"
SESSION_LIFETIME = 12 * 3600.0
"""Seconds a console session lasts; then the URL (or the principal's token) is needed again."""
SESSIONS_PER_VIEWER = 32
"""Sessions one viewer holds at once (each sign-in opens one): a new one past it closes their oldest."""
VIEWER_KEY = "mcp_armor.console_viewer"
"""The ASGI scope key under which the guard leaves the request's `Viewer`."""
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
)
"""Sent with every answer of the console's, whatever it is."""
APPROVER, VIEWER = "role:approver", "role:viewer"


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: the name decisions are recorded under, and whether they may decide."""

    name: str
    approver: bool
    credential: str = field(default="", repr=False)
    """The principal's own token (inside `serve --http`), to check again; empty standalone."""


class Gate(Protocol):
    """How a token becomes a viewer, and whether a viewer is still let in."""

    async def admit(self, token: str) -> Viewer | None:
        """The viewer `token` stands for; `None` for a token not accepted; raises `Forbidden` (403)."""
        ...

    async def still(self, viewer: Viewer) -> bool: ...


class AccessToken:
    """Standalone: one random token, printed at start; whoever holds it may approve, as the OS user."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(32)
        self._name = f"console ({os_user()})"

    async def admit(self, token: str) -> Viewer | None:
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return Viewer(self._name, approver=True)
        return None

    async def still(self, viewer: Viewer) -> bool:
        return True


class PrincipalGate:
    """Inside `serve --http`: the principal's own token, as the gateway's authenticators take it, with a
    console role (`role:approver` may decide, `role:viewer` may watch)."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = tuple(authenticators)

    async def admit(self, token: str) -> Viewer | None:
        principal = await self._principal(token)
        if principal is None:
            return None
        if APPROVER not in principal.attributes and VIEWER not in principal.attributes:
            raise Forbidden(f"principal '{principal.name}' has neither role:approver nor role:viewer")
        return Viewer(principal.name, approver=APPROVER in principal.attributes, credential=token)

    async def still(self, viewer: Viewer) -> bool:
        try:
            again = await self.admit(viewer.credential)
        except Forbidden:
            return False
        return again == viewer

    async def _principal(self, token: str) -> Principal | None:
        for authenticator in self._authenticators:
            try:
                principal = await authenticator.authenticate(token)
            except Unauthenticated:
                return None
            if principal is not None:
                return principal
        return None


@dataclass(slots=True)
class Session:
    viewer: Viewer
    csrf: str
    expires: float


class Sessions:
    """The console's sessions, in memory: a restart asks for the URL again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def open(self, viewer: Viewer) -> tuple[str, Session]:
        now = self._clock()
        for key in [key for key, session in self._sessions.items() if session.expires <= now]:
            del self._sessions[key]
        theirs = [key for key, session in self._sessions.items() if session.viewer.name == viewer.name]
        for key in theirs[: max(0, len(theirs) - SESSIONS_PER_VIEWER + 1)]:  # oldest first: dicts keep their order
            del self._sessions[key]
        key = secrets.token_urlsafe(32)
        session = Session(viewer, secrets.token_urlsafe(32), now + SESSION_LIFETIME)
        self._sessions[key] = session
        return key, session

    def get(self, key: str) -> Session | None:
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[key]
            return None
        return session

    def drop(self, key: str) -> None:
        self._sessions.pop(key, None)


class Guard:
    """ASGI middleware in front of the console app: Host, session or token exchange, CSRF and Origin on
    POST, and the security headers on every answer. The session is left in the scope (`VIEWER_KEY`)."""

    def __init__(
        self, app: ASGIApp, gate: Gate, allowed_hosts: Sequence[str], *, tls: bool, sessions: Sessions | None = None
    ) -> None:
        self._app = app
        self.gate = gate
        self.sessions = sessions or Sessions()
        self._hosts = frozenset(host.lower() for host in allowed_hosts)
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(HEADERS)]
                message = {**message, "headers": [*kept, *HEADERS]}
            await send(message)

        headers = _headers(scope)
        host = headers.get("host", [""])
        if len(host) != 1 or host[0].lower() not in self._hosts:
            await _plain(sending, 421, "this console does not answer to that Host")
            return
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            await self._exchange(scope, query["token"], sending)
            return
        bearer = headers.get("authorization", [])
        if bearer:
            await self._bearer(scope, receive, sending, bearer)
            return
        key = _cookie(headers)
        session = self.sessions.get(key) if key else None
        if session is None or not await self.gate.still(session.viewer):
            if session is not None:
                self.sessions.drop(key)
            await _plain(sending, 401, "sign in: open /console/?token=… (the URL printed at start, or your own token)")
            return
        # SameSite ignores ports: a page on another port of this host is same-site, and its <img> or <link>
        # carries the Strict cookie here. The browser says where a request comes from; only the console's
        # own pages (or the person, typing the address) may use the session.
        if headers.get("sec-fetch-site", ["same-origin"])[-1].lower() not in ("same-origin", "none"):
            await _plain(sending, 403, "refused: the request does not come from the console's own page")
            return
        if scope["method"] not in ("GET", "HEAD"):
            origin = headers.get("origin", [])
            own = f"{'https' if self._tls else 'http'}://{host[0].lower()}"
            csrf = headers.get("x-csrf-token", [""])
            if len(origin) != 1 or origin[0].lower() != own:
                await _plain(sending, 403, "refused: the request does not come from the console's own page (Origin)")
                return
            if len(csrf) != 1 or not hmac.compare_digest(csrf[0].encode(), session.csrf.encode()):
                await _plain(sending, 403, "refused: the request lacks the console's CSRF token")
                return
        scope = {**scope, VIEWER_KEY: (session, _Held(self.gate, self.sessions, key))}
        if path in (PREFIX, ""):
            await _redirect(sending, f"{PREFIX}/", None)
            return
        await self._app(scope, receive, sending)

    async def _bearer(self, scope: Scope, receive: Receive, send: Send, supplied: list[str]) -> None:
        """A request carrying the credential itself (a script, not a browser): let in for this request
        alone. No CSRF token is needed: a browser never adds an Authorization header on its own."""
        scheme, _, credential = supplied[0].partition(" ")
        if len(supplied) != 1 or scheme.lower() != "bearer" or not credential.strip():
            await _plain(send, 401, "expected one Authorization: Bearer <token>")
            return
        viewer = await self._admit(credential.strip(), send)
        if viewer is None:
            return
        session = Session(viewer, "", 0.0)
        await self._app({**scope, VIEWER_KEY: (session, self.gate)}, receive, send)

    async def _exchange(self, scope: Scope, tokens: list[str], send: Send) -> None:
        if scope["method"] != "GET" or len(tokens) != 1:
            await _plain(send, 400, "the console's token goes in one ?token= of a GET")
            return
        viewer = await self._admit(tokens[0], send)
        if viewer is None:
            return
        key, _ = self.sessions.open(viewer)
        cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path={PREFIX}; Max-Age={int(SESSION_LIFETIME)}"
        await _redirect(send, f"{PREFIX}/", cookie + ("; Secure" if self._tls else ""))

    async def _admit(self, token: str, send: Send) -> Viewer | None:
        """The viewer `token` stands for; `None` once refused (401 or 403 answered)."""
        try:
            viewer = await self.gate.admit(token)
        except Forbidden as refused:
            await _plain(send, 403, f"refused: {refused}")
            return None
        if viewer is None:
            await _plain(send, 401, "that token does not open this console")
        return viewer


class _Held:
    """A cookie session's gate: let in while the session lasts and the gate still lets its viewer in (a
    live stream outlasts the request that opened it)."""

    def __init__(self, gate: Gate, sessions: Sessions, key: str) -> None:
        self._gate, self._sessions, self._key = gate, sessions, key

    async def admit(self, token: str) -> Viewer | None:
        return await self._gate.admit(token)

    async def still(self, viewer: Viewer) -> bool:
        return self._sessions.get(self._key) is not None and await self._gate.still(viewer)


def viewer_of(scope: Scope) -> tuple[Session, Gate]:
    found = scope[VIEWER_KEY]
    assert isinstance(found, tuple)
    return found


def _headers(scope: Scope) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in scope["headers"]:
        found.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return found


def _cookie(headers: dict[str, list[str]]) -> str:
    for text in headers.get("cookie", []):
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(text)
        except CookieError:  # a malformed Cookie header: no session in it
            continue
        if COOKIE in jar:
            return jar[COOKIE].value
    return ""


async def _plain(send: Send, status: int, text: str) -> None:
    await respond(send, status, json.dumps({"error": text}).encode(), [(b"content-type", b"application/json")])


async def _redirect(send: Send, location: str, cookie: str | None) -> None:
    headers = [(b"location", location.encode())]
    if cookie is not None:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await respond(send, 303, b"", headers)
