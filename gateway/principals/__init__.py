"""Who is calling over HTTP: the authenticated principal of a request, and how it is found.

A `Principal` is a name the gateway vouches for (a token it issued with `mcp-armor principal add`,
the single `[gateway.http] token`, or an OAuth access token from the configured issuer) together with
the attributes rules can match (`scope:NAME`, `group:NAME`, `role:NAME`). The HTTP edge authenticates
every request before anything else reads it and leaves the principal in the ASGI scope under
`SCOPE_KEY`; the session, the policy and the audit take it from there, never from what the client says.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import Unauthenticated as Unauthenticated  # re-exported: authenticators raise it

SCOPE_KEY = "mcp_armor.principal"
"""The ASGI scope key under which the HTTP edge leaves the request's authenticated `Principal`."""
SHARED_TOKEN_PRINCIPAL = "token"
"""The principal a request carrying `[gateway.http] token` is: one name for everyone who holds it."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    attributes: frozenset[str] = field(default_factory=frozenset)
    """What rules can match besides the name: `scope:NAME` and `group:NAME` from an access token,
    `role:NAME` given with `mcp-armor principal add --role`."""
    via: str = ""
    """How the request was authenticated: `token` (a principal's token), `shared-token`
    (`[gateway.http] token`) or `oauth`; recorded with the session."""
    credential: str = ""
    """Which credential: a token's id, or the access token's `jti` when it has one (never the secret)."""


def principal_in(scope: Mapping[str, Any]) -> Principal | None:
    """The request's authenticated principal; `None` when the gateway serves without credentials."""
    found = scope.get(SCOPE_KEY)
    return found if isinstance(found, Principal) else None


class Authenticator(Protocol):
    """One way of turning a bearer credential into a principal."""

    async def authenticate(self, token: str) -> Principal | None:
        """The principal `token` stands for; `None` when it is not a credential of this kind (the next
        authenticator is asked); raises `Unauthenticated` when it is one and is refused."""
        ...


class SharedToken:
    """`[gateway.http] token`: everyone who holds it is the one principal `SHARED_TOKEN_PRINCIPAL`."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def authenticate(self, token: str) -> Principal | None:
        if hmac.compare_digest(token.encode(), self._expected):
            return Principal(SHARED_TOKEN_PRINCIPAL, via="shared-token")
        return None
