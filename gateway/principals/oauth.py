"""OAuth 2.1 access tokens: the gateway as a resource server of one authorization server.

`OAuthBearer` recognises a JWT-shaped bearer credential and accepts it only when it is signed by one of
the issuer's keys (found by `kid` in the issuer's JWKS, with an algorithm the configuration allows and
the key's type fits), names the configured issuer, is for the gateway (`aud` holds `audience`, RFC 8707),
has not expired, and names its principal. Nothing a token says about where keys are (`jku`, `x5u`,
`jwk`, `x5c`) is ever followed: keys come only from the issuer's JWKS, fetched by `IssuerKeys`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import jwt

from gateway.config.models import OAuthSettings, served_url
from gateway.principals import SHARED_TOKEN_PRINCIPAL, Principal, Unauthenticated

logger = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 16 * 1024
"""A longer credential is refused unread: real access tokens are a few KB at most."""
MAX_DOCUMENT_SIZE = 512 * 1024
"""The largest metadata or JWKS document read from the issuer."""
FETCH_TIMEOUT = 5.0
"""Seconds for each step of a fetch (connecting, each read)."""
FETCH_DEADLINE = 15.0
"""Seconds for all of one fetch: discovery and the JWKS."""
KEYS_MAX_AGE = 600.0
"""Keys older than this are fetched again on the next use (rotation without restarting the gateway)."""
RETRY_AFTER_FAILURE = 30.0
"""After a failed fetch the last good keys serve this long before the issuer is asked again."""
UNKNOWN_KID_COOLDOWN = 30.0
"""At most one fetch this often for a token whose `kid` is not among the keys: a flood of invented `kid`s
costs the issuer one request per period, not one per token."""
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_MAX_KID = 256
_MAX_NAME = 256
_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    **{f"{family}{bits}": ("RSA", None) for family in ("RS", "PS") for bits in (256, 384, 512)},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
"""The key type (and curve) each algorithm signs with; EdDSA is `OKP` on Ed25519 or Ed448."""


def fits(algorithm: str, jwk: Mapping[str, Any]) -> bool:
    """Whether a key can verify `algorithm`: its type (and curve) is that algorithm's, and the key names
    no other algorithm. A token cannot make an RSA key verify an EC signature, or anything an HMAC."""
    if jwk.get("alg", algorithm) != algorithm:
        return False
    if algorithm == "EdDSA":
        return jwk.get("kty") == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448")
    kty, crv = _KEY_TYPES.get(algorithm, ("", None))
    return jwk.get("kty") == kty and (crv is None or jwk.get("crv") == crv)


class IssuerKeys:
    """The issuer's signing keys, fetched on first use and kept: fetched again once `KEYS_MAX_AGE` old
    or for an unknown `kid` (rate-limited); a failed fetch keeps the last good keys."""

    def __init__(self, settings: OAuthSettings, *, unknown_kid_cooldown: float = UNKNOWN_KID_COOLDOWN) -> None:
        self._settings = settings
        self._jwks_uri = settings.jwks_uri
        self._cooldown = unknown_kid_cooldown
        self._keys: dict[str, dict[str, jwt.PyJWK]] = {}
        """kid -> algorithm -> key; a key without `kid` is under ""."""
        self._next_refresh = 0.0
        self._last_unknown_kid_fetch = -float("inf")
        self._lock = anyio.Lock()

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key `kid` names for `algorithm`; raises `Unauthenticated` when there is none."""
        if time.monotonic() >= self._next_refresh:
            await self._refresh(self._next_refresh)
        found = self._lookup(kid)
        if found is None and kid is not None and self._keys and self._unknown_kid_allowed():
            await self._refresh(self._next_refresh, unknown_kid=True)
            found = self._lookup(kid)
        if not self._keys:
            # The detail (an address, a network error) is logged where the fetch failed, not told to the caller.
            issuer = self._settings.issuer
            raise Unauthenticated(f"no signing keys from the issuer {issuer} (the gateway's log says why)")
        if found is None and kid is None:
            raise Unauthenticated("the access token names no key (kid) and the issuer has several")
        if found is None:
            raise Unauthenticated("the token's signing key (kid) is not one of the issuer's keys")
        if algorithm not in found:
            raise Unauthenticated(f"the issuer's key does not sign with {algorithm}")
        return found[algorithm]

    def _lookup(self, kid: str | None) -> dict[str, jwt.PyJWK] | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without `kid` is only usable when the issuer has exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _unknown_kid_allowed(self) -> bool:
        return time.monotonic() - self._last_unknown_kid_fetch >= self._cooldown

    async def _refresh(self, seen: float, *, unknown_kid: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            if unknown_kid:
                if now - self._last_unknown_kid_fetch < self._cooldown:
                    return  # another request just fetched for an unknown kid
                self._last_unknown_kid_fetch = now
            elif self._next_refresh != seen:
                return  # another request fetched while this one waited
            try:
                keys = await self._fetch()
            except _FetchFailed as failed:
                self._next_refresh = time.monotonic() + RETRY_AFTER_FAILURE
                kept = f"; keeping the {len(self._keys)} key(s) fetched before" if self._keys else ""
                logger.warning("fetching the OAuth issuer's keys failed: %s%s", failed, kept)
                return
            self._keys = keys
            self._next_refresh = time.monotonic() + KEYS_MAX_AGE

    async def _fetch(self) -> dict[str, dict[str, jwt.PyJWK]]:
        # The per-read timeout alone would let an issuer trickling bytes hold every request waiting on keys.
        with anyio.move_on_after(FETCH_DEADLINE):
            async with httpx2.AsyncClient(timeout=httpx2.Timeout(FETCH_TIMEOUT), follow_redirects=False) as http:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover(http)
                return self._read_keys(await _get_json(http, self._jwks_uri))
        raise _FetchFailed(f"the issuer's metadata and keys took longer than {FETCH_DEADLINE:g} s")

    def _read_keys(self, document: dict[str, Any]) -> dict[str, dict[str, jwt.PyJWK]]:
        listed = document.get("keys")
        if not isinstance(listed, list):
            raise _FetchFailed(f"{self._jwks_uri} is not a JWKS (no 'keys' list)")
        keys: dict[str, dict[str, jwt.PyJWK]] = {}
        for jwk in listed:
            usable = self._usable(jwk)
            if usable:
                keys.setdefault(str(jwk.get("kid", "")), {}).update(usable)
        if not keys:
            wanted = ", ".join(self._settings.algorithms)
            raise _FetchFailed(f"{self._jwks_uri} holds no public signing key for {wanted}")
        return keys

    def _usable(self, jwk: object) -> dict[str, jwt.PyJWK]:
        """The algorithms a JWKS entry verifies, each with its key: none for an encryption key, a
        symmetric one (`oct`), or one the configured algorithms do not fit."""
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or "d" in jwk:
            return {}
        if not isinstance(jwk.get("kid", ""), str):
            return {}
        usable: dict[str, jwt.PyJWK] = {}
        for algorithm in self._settings.algorithms:
            if fits(algorithm, jwk):
                try:
                    usable[algorithm] = jwt.PyJWK(jwk, algorithm)
                except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
                    logger.warning("the OAuth issuer's key %r is unusable: %s", jwk.get("kid"), exc)
                    return {}
        return usable

    async def _discover(self, http: httpx2.AsyncClient) -> str:
        """The issuer's `jwks_uri`, from its authorization server metadata (RFC 8414), else its OpenID
        configuration; the document must name the configured issuer."""
        issuer = self._settings.issuer
        parts = urlsplit(issuer)
        origin, path = f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/")
        candidates = [f"{origin}/.well-known/oauth-authorization-server{path}"]
        if path:
            candidates.append(f"{origin}/.well-known/openid-configuration{path}")
        candidates.append(f"{origin}{path}/.well-known/openid-configuration")
        problems = []
        for url in candidates:
            try:
                metadata = await _get_json(http, url)
            except _FetchFailed as failed:
                problems.append(str(failed))
                continue
            if metadata.get("issuer") != issuer:
                raise _FetchFailed(f"{url} names issuer {metadata.get('issuer')!r}, not {issuer!r}")
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise _FetchFailed(f"{url} names no jwks_uri")
            try:
                return served_url(jwks_uri)
            except ValueError as exc:
                raise _FetchFailed(f"{url} names jwks_uri {jwks_uri!r}: {exc}") from None
        raise _FetchFailed("; ".join(problems))


class _FetchFailed(Exception):
    """The issuer's metadata or keys could not be had (said in one line)."""


async def _get_json(http: httpx2.AsyncClient, url: str) -> dict[str, Any]:
    """One JSON object from `url`, read no further than `MAX_DOCUMENT_SIZE`."""
    try:
        async with http.stream("GET", url, headers={"accept": "application/json"}) as response:
            if response.status_code != 200:
                raise _FetchFailed(f"{url} answered {response.status_code}")
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_SIZE:
                    raise _FetchFailed(f"{url} answered more than {MAX_DOCUMENT_SIZE} bytes")
    except httpx2.HTTPError as exc:
        raise _FetchFailed(f"{url}: {exc or type(exc).__name__}") from None
    try:
        document = json.loads(body)
    except ValueError:
        raise _FetchFailed(f"{url} answered something other than JSON") from None
    if not isinstance(document, dict):
        raise _FetchFailed(f"{url} answered JSON that is not an object")
    return document


class OAuthBearer:
    """Access tokens from `[gateway.http.oauth]`'s issuer: the principal is the `principal_claim`, the
    attributes `scope:NAME` for each granted scope and `group:NAME` for each group."""

    def __init__(self, settings: OAuthSettings, keys: IssuerKeys | None = None) -> None:
        self._settings = settings
        self._keys = keys or IssuerKeys(settings)

    async def authenticate(self, token: str) -> Principal | None:
        header = _jwt_header(token)
        if header is None:
            return None  # not a JWT: another authenticator's kind of credential
        claims = await self._verified(token, header)
        name = claims.get(self._settings.principal_claim)
        if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME or not name.isprintable():
            raise Unauthenticated(f"the access token's {self._settings.principal_claim!r} claim names no principal")
        if name == SHARED_TOKEN_PRINCIPAL:  # rules written for everyone holding the shared token are not its
            raise Unauthenticated(f"the access token names {name!r}, the shared token's principal")
        attributes = {f"scope:{scope}" for scope in self._scopes(claims)}
        attributes |= {f"group:{group}" for group in _names(claims.get(self._settings.groups_claim))}
        jti = claims.get("jti")
        return Principal(name, frozenset(attributes), via="oauth", credential=jti if isinstance(jti, str) else "")

    def _scopes(self, claims: Mapping[str, Any]) -> list[str]:
        granted = claims.get(self._settings.scope_claim)
        if granted is None and self._settings.scope_claim == "scope":
            granted = claims.get("scp")
        return _names(granted)

    async def _verified(self, token: str, header: Mapping[str, Any]) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(f"the access token is longer than {MAX_TOKEN_LENGTH} characters")
        if not _JWT.match(token):
            raise Unauthenticated("the access token is not a compact JWS (three base64url parts)")
        algorithm = header.get("alg")
        if algorithm not in self._settings.algorithms:
            raise Unauthenticated(f"the access token's algorithm {algorithm!r} is not accepted")
        if "crit" in header:
            raise Unauthenticated("the access token has critical header parameters the gateway does not implement")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > _MAX_KID):
            raise Unauthenticated("the access token's kid is not a key id")
        key = await self._keys.key(kid, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
                options={"require": ["exp", "iss", "aud"], "strict_aud": False},
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the access token is refused: {_why(exc)}") from None
        return claims


def _jwt_header(token: str) -> dict[str, Any] | None:
    """The decoded JOSE header when `token` is shaped as a JWT (three dot-separated parts, the first a
    JSON object), else `None`."""
    head = token.partition(".")[0]
    if token.count(".") != 2 or len(head) > MAX_TOKEN_LENGTH:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return None
    return decoded if isinstance(decoded, dict) else None


def _names(value: object) -> list[str]:
    """A claim holding names: a space-separated string, or a list of strings (others are ignored)."""
    listed = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    return [item for item in listed if isinstance(item, str) and item and item.isprintable()]


def _why(exc: jwt.InvalidTokenError) -> str:
    """One line for the log: which check failed, never the token."""
    reasons: dict[type[jwt.InvalidTokenError], str] = {
        jwt.ExpiredSignatureError: "it has expired",
        jwt.InvalidAudienceError: "it is for another audience",
        jwt.InvalidIssuerError: "it is from another issuer",
        jwt.ImmatureSignatureError: "it is not valid yet",
        jwt.MissingRequiredClaimError: str(exc),
        jwt.InvalidSignatureError: "its signature does not verify",
    }
    return next((reason for kind, reason in reasons.items() if isinstance(exc, kind)), str(exc) or type(exc).__name__)
