"""OAuth access tokens against a real issuer the test runs: what is accepted, as which principal with
which attributes, and every forgery and mistake refused; the issuer's keys fetched, rotated, kept."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest

from gateway.config.models import OAuthSettings, load_config
from gateway.errors import ConfigError
from gateway.principals import Principal, Unauthenticated
from gateway.principals import oauth as oauth_module
from gateway.principals.oauth import IssuerKeys, OAuthBearer
from tests.principals.issuer import AUDIENCE, Issuer, running_issuer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with running_issuer() as running:
        yield running


def bearer(issuer: Issuer, **settings: Any) -> OAuthBearer:
    oauth = OAuthSettings(issuer=issuer.url, audience=AUDIENCE, **settings)
    return OAuthBearer(oauth, IssuerKeys(oauth, unknown_kid_cooldown=settings.pop("cooldown", 30.0)))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any], kid: str) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def _hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """Signed by hand: PyJWT itself refuses to use a PEM public key as an HMAC secret."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    signed = f"{head}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"


def _tampered(token: str, **changes: Any) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join([head, _b64(json.dumps({**claims, **changes}).encode()), signature])


async def test_a_valid_token_is_its_subject_with_its_scopes_and_groups_as_attributes(issuer: Issuer) -> None:
    token = issuer.mint(scope="tools.read tools.write", groups=["admins", "ci"], jti="t-42")
    principal = await bearer(issuer).authenticate(token)
    assert principal == Principal(
        "alice",
        frozenset({"scope:tools.read", "scope:tools.write", "group:admins", "group:ci"}),
        via="oauth",
        credential="t-42",
    )


async def test_an_ec_key_a_scp_list_an_audience_list_and_configured_claims_are_accepted(issuer: Issuer) -> None:
    kid = issuer.publish("EC")
    token = issuer.mint(kid, aud=["other", AUDIENCE], scp=["a", "b"], email="bob@example", roles="x y", jti=None)
    principal = await bearer(issuer, principal_claim="email", groups_claim="roles").authenticate(token)
    assert principal == Principal("bob@example", frozenset({"scope:a", "scope:b", "group:x", "group:y"}), via="oauth")


async def test_a_credential_that_is_not_a_jwt_is_left_to_other_authenticators(issuer: Issuer) -> None:
    oauth = bearer(issuer)
    for credential in ("mcpa_0123456789abcdef", "a.b", "not.base64!.x", "bm90IGpzb24.e30.", "WzFd.e30.sig"):
        assert await oauth.authenticate(credential) is None, credential
    assert issuer.fetched == []  # nothing asked of the issuer for someone else's credential


WHY = {
    "expired": "it has expired",
    "another audience": "it is for another audience",
    "another issuer": "it is from another issuer",
    "unsigned": "algorithm 'none' is not accepted",
    "HS256 with the public key": "algorithm 'HS256' is not accepted",
    "tampered payload": "its signature does not verify",
    "no principal claim": "'sub' claim names no principal",
    "empty principal claim": "'sub' claim names no principal",
    "principal claim not a string": "Subject must be a string",
    "the shared token's principal": "the shared token's principal",
    "no exp": 'missing the "exp" claim',
    "not valid yet (nbf)": "it is not valid yet",
    "issued in the future (iat)": "it is not valid yet",
    "an RSA kid with an EC signature": "the issuer's key does not sign with ES256",
    "critical header": "critical header parameters",
    "a kid that is a path": "not one of the issuer's keys",
    "oversized": "longer than 16384 characters",
}
"""Why each of `_refusals` is refused: the check meant to catch it, not another one by accident."""


def _refusals(issuer: Issuer) -> dict[str, str]:
    rsa_kid = next(iter(issuer.private))
    public_pem = issuer.public_pem(rsa_kid)
    ec_kid = issuer.publish("EC")
    ec_key = issuer.private[ec_kid][0]
    good = issuer.mint()
    return {
        "expired": issuer.mint(exp=1_000_000, iat=999_000),
        "another audience": issuer.mint(aud="https://elsewhere.example/mcp"),
        "another issuer": issuer.mint(iss="https://evil.example"),
        "unsigned": _unsigned(issuer.claims(), rsa_kid),
        "HS256 with the public key": _hs256(issuer.claims(), public_pem, rsa_kid),
        "tampered payload": _tampered(good, sub="root"),
        "no principal claim": issuer.mint(sub=None),
        "empty principal claim": issuer.mint(sub="  "),
        "principal claim not a string": issuer.mint(sub=["alice"]),
        "the shared token's principal": issuer.mint(sub="token"),
        "no exp": issuer.mint(exp=None),
        "not valid yet (nbf)": issuer.mint(nbf=2_000_000_000),
        "issued in the future (iat)": issuer.mint(iat=2_000_000_000, exp=2_000_000_300),
        "an RSA kid with an EC signature": jwt.encode(
            issuer.claims(), ec_key, algorithm="ES256", headers={"kid": rsa_kid}
        ),
        "critical header": issuer.mint(headers={"crit": ["exp"], "exp": 1}),
        "a kid that is a path": issuer.mint(headers={"kid": "../../jwks"}),
        "oversized": issuer.mint(padding="x" * 20_000),
    }


async def test_forged_expired_and_misaddressed_tokens_are_refused(issuer: Issuer) -> None:
    oauth = bearer(issuer)
    assert await oauth.authenticate(issuer.mint()) is not None
    for case, token in _refusals(issuer).items():
        with pytest.raises(Unauthenticated) as refused:
            await oauth.authenticate(token)
            pytest.fail(f"accepted: {case}")
        assert WHY[case] in str(refused.value), (case, str(refused.value))


async def test_keys_a_token_points_at_are_never_fetched_or_used(issuer: Issuer) -> None:
    """`jku`, `x5u` and an embedded `jwk` name the forger's own key: the token must still verify with a
    key from the issuer's JWKS, and nothing it names is fetched."""
    forger = Issuer(url=issuer.url)
    kid = forger.publish()
    oauth = bearer(issuer)
    embedded = forger.published[0]
    for headers in ({"jku": f"{issuer.url}/forged"}, {"x5u": f"{issuer.url}/forged"}, {"jwk": embedded}):
        with pytest.raises(Unauthenticated, match="not one of the issuer's keys"):
            await oauth.authenticate(forger.mint(kid, headers=headers))
    same_kid = next(iter(issuer.private))
    forger.private[same_kid] = forger.private[kid]
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        await oauth.authenticate(forger.mint(same_kid, headers={"jwk": embedded}))
    assert "/forged" not in issuer.fetched


async def test_a_rotated_key_is_fetched_for_its_unknown_kid_and_a_flood_of_kids_fetches_once(issuer: Issuer) -> None:
    oauth = bearer(issuer)
    assert await oauth.authenticate(issuer.mint()) is not None
    assert issuer.jwks_fetches() == 1
    rotated = issuer.publish("EC")
    assert (await oauth.authenticate(issuer.mint(rotated))) is not None
    assert issuer.jwks_fetches() == 2
    for index in range(50):
        with pytest.raises(Unauthenticated, match="not one of the issuer's keys"):
            await oauth.authenticate(issuer.mint(rotated, headers={"kid": f"invented-{index}"}))
    assert issuer.jwks_fetches() == 2  # within the cooldown the invented kids cost the issuer nothing


async def test_the_last_good_keys_serve_while_the_issuer_is_down(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oauth_module, "KEYS_MAX_AGE", 0.0)
    monkeypatch.setattr(oauth_module, "RETRY_AFTER_FAILURE", 0.0)
    oauth = bearer(issuer)
    assert await oauth.authenticate(issuer.mint()) is not None
    issuer.published.clear()  # the JWKS now holds no key: a failed fetch
    assert await oauth.authenticate(issuer.mint()) is not None
    assert issuer.jwks_fetches() == 2


async def test_no_keys_at_all_refuses_every_token(issuer: Issuer) -> None:
    token = issuer.mint()
    issuer.published.clear()
    with pytest.raises(Unauthenticated, match="no signing keys from the issuer"):
        await bearer(issuer).authenticate(token)
    unreachable = OAuthSettings(issuer="http://127.0.0.1:9", audience=AUDIENCE)
    with pytest.raises(Unauthenticated, match="no signing keys from the issuer"):
        await OAuthBearer(unreachable).authenticate(token)


async def test_a_stalled_or_oversized_jwks_yields_no_keys(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = issuer.mint()
    monkeypatch.setattr(oauth_module, "FETCH_DEADLINE", 0.5)
    issuer.stalled = anyio.Event()
    try:
        with pytest.raises(Unauthenticated, match="no signing keys from the issuer"):
            await bearer(issuer).authenticate(token)
    finally:
        issuer.stalled.set()
    assert "took longer than 0.5 s" in caplog.text
    issuer.stalled = None
    issuer.published.append({"kty": "oct", "k": "x" * oauth_module.MAX_DOCUMENT_SIZE})
    with pytest.raises(Unauthenticated, match="no signing keys from the issuer"):
        await bearer(issuer).authenticate(token)
    assert f"answered more than {oauth_module.MAX_DOCUMENT_SIZE} bytes" in caplog.text


async def test_metadata_naming_another_issuer_yields_no_keys(issuer: Issuer, caplog: pytest.LogCaptureFixture) -> None:
    issuer.metadata_issuer = "https://evil.example"
    with pytest.raises(Unauthenticated, match="no signing keys from the issuer"):
        await bearer(issuer).authenticate(issuer.mint())
    assert issuer.jwks_fetches() == 0
    assert "names issuer 'https://evil.example'" in caplog.text


async def test_a_configured_jwks_uri_is_used_without_discovery(issuer: Issuer) -> None:
    assert await bearer(issuer, jwks_uri=f"{issuer.url}/jwks").authenticate(issuer.mint()) is not None
    assert issuer.fetched == ["/jwks"]


async def test_only_configured_algorithms_are_accepted(issuer: Issuer) -> None:
    kid = issuer.publish("EC")
    with pytest.raises(Unauthenticated, match="algorithm 'ES256' is not accepted"):
        await bearer(issuer, algorithms=["RS256"]).authenticate(issuer.mint(kid))


@pytest.mark.parametrize(
    ("oauth", "message"),
    [
        (
            'issuer = "https://as.example"\naudience = "https://gw.example/mcp"\nalgorithms = ["RS256", "HS256"]',
            "[gateway.http.oauth] algorithms: 'HS256' not accepted: only public-key algorithms",
        ),
        (
            'issuer = "https://as.example"\naudience = "https://gw.example/mcp"\nalgorithms = ["none"]',
            "[gateway.http.oauth] algorithms: 'none' not accepted",
        ),
        (
            'issuer = "http://as.example"\naudience = "https://gw.example/mcp"',
            "[gateway.http.oauth] issuer: 'http://as.example' must be https (plain http only on a loopback host)",
        ),
        ('issuer = "https://as.example"', "[gateway.http.oauth] audience: required key is missing"),
        (
            'issuer = "https://as.example"\naudience = "https://gw.example/mcp"\nscopes_required = ["a b"]',
            "[gateway.http.oauth] scopes_required: 'a b' is not a scope name",
        ),
        (
            'issuer = "https://as.example"\naudience = "https://gw.example/mcp"\njwks = "x"',
            "[gateway.http.oauth] jwks: unknown key",
        ),
    ],
)
def test_a_bad_oauth_table_is_one_clear_line(tmp_path: Path, oauth: str, message: str) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(f"[gateway.http.oauth]\n{oauth}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
    assert message in str(caught.value)
