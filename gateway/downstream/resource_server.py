"""The HTTP face as an OAuth protected resource (RFC 9728, RFC 6750), for `[gateway.http.oauth]`.

`ResourceMetadata` serves the protected resource metadata document without credentials (a client
learns from it where to get a token); `challenge` is what a 401 says (`resource_metadata=` pointing at
that document, as the MCP authorization spec asks); `RequireScopes` answers an access token lacking a
scope of `scopes_required` with 403 `insufficient_scope`.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config.models import OAuthSettings
from gateway.downstream.http_edge import respond
from gateway.principals import principal_in

WELL_KNOWN = "/.well-known/oauth-protected-resource"
SERVED_PATH = "/mcp"


def metadata_url(audience: str) -> str:
    """Where a client looks for the metadata of the resource `audience` (RFC 9728 section 3.1: the
    well-known path goes between the host and the resource's path)."""
    parts = urlsplit(audience)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{path}"


def challenge(settings: OAuthSettings) -> str:
    """The `WWW-Authenticate` challenge of a request without an acceptable access token."""
    scope = f', scope="{" ".join(settings.scopes_required)}"' if settings.scopes_required else ""
    return f'Bearer resource_metadata="{metadata_url(settings.audience)}"{scope}'


def metadata(settings: OAuthSettings) -> dict[str, object]:
    """The protected resource metadata document (RFC 9728 section 2)."""
    document: dict[str, object] = {
        "resource": settings.audience,
        "authorization_servers": [settings.issuer],
        "bearer_methods_supported": ["header"],
    }
    if settings.scopes_required:
        document["scopes_supported"] = list(settings.scopes_required)
    return document


class ResourceMetadata:
    """ASGI middleware: `GET /.well-known/oauth-protected-resource` (and the same followed by the
    resource's path, or `/mcp`) answers the metadata document, to anyone whose `Host` and `Origin` the
    MCP endpoint accepts; every other request goes on to the app (and its authentication)."""

    def __init__(self, app: ASGIApp, settings: OAuthSettings, security: TransportSecuritySettings) -> None:
        self._app = app
        self._body = json.dumps(metadata(settings)).encode()
        resource_path = urlsplit(settings.audience).path.rstrip("/")
        self._paths = {WELL_KNOWN, WELL_KNOWN + resource_path, WELL_KNOWN + SERVED_PATH}
        self._security = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in self._paths:
            await self._app(scope, receive, send)
            return
        refused = await self._security.validate_request(Request(scope), is_post=False)
        if refused is not None:
            await refused(scope, receive, send)
            return
        if scope["method"] != "GET":
            await respond(send, 405, b"", [(b"allow", b"GET")])
            return
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"max-age=3600")]
        await respond(send, 200, self._body, headers)


class RequireScopes:
    """ASGI middleware behind authentication: a request authenticated by an access token lacking any of
    `scopes_required` is answered 403 `insufficient_scope` (RFC 6750 section 3.1), naming the scopes, so
    the client can ask for them. Credentials of other kinds carry no scopes and are not held to them."""

    def __init__(self, app: ASGIApp, settings: OAuthSettings) -> None:
        self._app = app
        self._required = frozenset(f"scope:{name}" for name in settings.scopes_required)
        self._challenge = challenge(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_in(scope) if scope["type"] == "http" else None
        if principal is None or principal.via != "oauth" or self._required <= principal.attributes:
            await self._app(scope, receive, send)
            return
        missing = sorted(name.removeprefix("scope:") for name in self._required - principal.attributes)
        body = json.dumps(
            {"error": "insufficient_scope", "error_description": f"the access token lacks scope {' '.join(missing)}"}
        ).encode()
        header = self._challenge + ', error="insufficient_scope"'
        await respond(
            send, 403, body, [(b"content-type", b"application/json"), (b"www-authenticate", header.encode("latin-1"))]
        )
