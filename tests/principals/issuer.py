"""A real OAuth authorization server for tests, as far as a resource server sees one: its metadata
(RFC 8414) and its JWKS over loopback HTTP, keys made in the test, access tokens minted with PyJWT."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import jwt
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.types import Receive, Scope, Send

from gateway.downstream.http_edge import listening_socket

AUDIENCE = "https://gw.example/mcp"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Issuer:
    """The issuer at `url`: `publish` makes a key and lists it in the JWKS; `mint` signs a token."""

    url: str = ""
    private: dict[str, tuple[PrivateKey, str]] = field(default_factory=dict)
    published: list[dict[str, Any]] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    """The path of every request the issuer answered, in order."""
    metadata_issuer: str | None = None
    """What the metadata says the issuer is (the real `url` unless set)."""
    stalled: anyio.Event | None = None
    """When set, the JWKS is answered only once this event is."""

    def publish(self, kind: str = "RSA", kid: str | None = None) -> str:
        kid = kid or uuid.uuid4().hex[:12]
        key: PrivateKey
        if kind == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            algorithm = "RS256"
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            algorithm = "ES256"
        self.private[kid] = (key, algorithm)
        self.published.append({**jwk, "kid": kid, "use": "sig"})
        return kid

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, "jti": "jti-1"}
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not None}

    def mint(self, kid: str | None = None, headers: dict[str, Any] | None = None, **changes: Any) -> str:
        kid = kid or next(iter(self.private))
        key, algorithm = self.private[kid]
        return jwt.encode(self.claims(**changes), key, algorithm=algorithm, headers={"kid": kid, **(headers or {})})

    def public_pem(self, kid: str) -> bytes:
        """The public key `kid` as PEM: what a forger has to hand."""
        return (
            self.private[kid][0]
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    def jwks_fetches(self) -> int:
        return self.fetched.count("/jwks")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.fetched.append(scope["path"])
        documents: dict[str, Any] = {
            "/.well-known/oauth-authorization-server": {
                "issuer": self.metadata_issuer or self.url,
                "jwks_uri": f"{self.url}/jwks",
                "token_endpoint": f"{self.url}/token",
            },
            "/jwks": {"keys": self.published},
        }
        if scope["path"] == "/jwks" and self.stalled is not None:
            await self.stalled.wait()
        found = documents.get(scope["path"])
        body = json.dumps(found).encode() if found is not None else b"{}"
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found is not None else 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running_issuer() -> AsyncIterator[Issuer]:
    """An `Issuer` listening on a free loopback port, with one RSA key published."""
    issuer = Issuer()
    server = uvicorn.Server(uvicorn.Config(issuer, log_level="warning", lifespan="off"))
    with listening_socket("127.0.0.1", 0) as sock:
        issuer.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        issuer.publish()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])  # the socket listens already: connections wait in its backlog
            yield issuer
            server.should_exit = True
