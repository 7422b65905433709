"""A gateway process serving HTTP as an OAuth resource server of a real issuer the test runs: a valid
access token is served as its subject, every bad one is answered 401 with the RFC 9728 challenge, the
metadata document is served without credentials, scopes are required when configured, and the
agent's token never travels to an upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server, ServerRequestContext
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.downstream.http_edge import listening_socket
from tests.conftest import calls, events, fixture_upstream, http_gateway, text_of, write_config
from tests.principals.issuer import AUDIENCE, Issuer, running_issuer
from tests.principals.test_oauth import _hs256, _tampered, _unsigned

pytestmark = pytest.mark.anyio
METADATA_URL = "https://gw.example/.well-known/oauth-protected-resource/mcp"
CHALLENGE = f'Bearer resource_metadata="{METADATA_URL}"'
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}},
}
JSON_OR_SSE = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with running_issuer() as running:
        yield running


def oauth_config(
    directory: Path, issuer: Issuer, upstreams: dict[str, Any] | None = None, token: str | None = None, **oauth: Any
) -> Path:
    http: dict[str, Any] = {"oauth": {"issuer": issuer.url, "audience": AUDIENCE, **oauth}}
    if token is not None:
        http["token"] = token
    return write_config(directory, upstreams or {"box": fixture_upstream("toolbox.py")}, http=http)


@asynccontextmanager
async def client_with(url: str, token: str, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


async def _post(http: httpx2.AsyncClient, url: str, token: str | None) -> httpx2.Response:
    authorization = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await http.post(url, json=INITIALIZE, headers={**JSON_OR_SSE, **authorization})


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_valid_access_token_is_served_and_audited_as_its_subject(
    tmp_path: Path, issuer: Issuer, mode: str
) -> None:
    config = oauth_config(tmp_path, issuer)
    async with http_gateway(config) as url, client_with(url, issuer.mint(sub="alice@example")) as client:
        assert text_of(await client.call_tool("box__echo", {"text": "with a token"})) == "with a token"
    decision = calls(config.parent)["box__echo"]["decision"]
    assert decision["principal"] == "alice@example"
    started = [event for event in events(config.parent) if event["kind"] == "session_start"]
    assert started and {event["principal"] for event in started} == {"alice@example"}


async def test_every_bad_access_token_is_401_with_the_resource_metadata_challenge(
    tmp_path: Path, issuer: Issuer
) -> None:
    rsa_kid = next(iter(issuer.private))
    public_pem = issuer.public_pem(rsa_kid)
    bad = {
        "expired": issuer.mint(exp=1_000_000, iat=999_000),
        "another audience": issuer.mint(aud="https://elsewhere.example/mcp"),
        "another issuer": issuer.mint(iss="https://evil.example"),
        "unsigned": _unsigned(issuer.claims(), rsa_kid),
        "HS256 with the public key": _hs256(issuer.claims(), public_pem, rsa_kid),
        "tampered payload": _tampered(issuer.mint(), sub="root"),
        "no principal claim": issuer.mint(sub=None),
        "unknown kid": issuer.mint(headers={"kid": "never-published"}),
        "not a credential of any kind": "no-such-token",
    }
    async with http_gateway(oauth_config(tmp_path, issuer)) as url, httpx2.AsyncClient(timeout=10) as http:
        missing = await _post(http, url, None)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == CHALLENGE
        for case, token in bad.items():
            refused = await _post(http, url, token)
            assert refused.status_code == 401, case
            assert refused.headers["www-authenticate"] == f'{CHALLENGE}, error="invalid_token"', case
        assert (await _post(http, url, issuer.mint())).status_code == 200


async def test_the_protected_resource_metadata_is_served_without_credentials(tmp_path: Path, issuer: Issuer) -> None:
    config = oauth_config(tmp_path, issuer, scopes_required=["tools.call"])
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=10) as http:
        base = url.removesuffix("/mcp")
        expected = {
            "resource": AUDIENCE,
            "authorization_servers": [issuer.url],
            "bearer_methods_supported": ["header"],
            "scopes_supported": ["tools.call"],
        }
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            answer = await http.get(base + path)
            assert answer.status_code == 200, path
            assert answer.json() == expected
        foreign = await http.get(base + "/.well-known/oauth-protected-resource", headers={"Host": "evil.example"})
        assert foreign.status_code == 421
        assert (await http.post(base + "/.well-known/oauth-protected-resource")).status_code == 405
        missing = await _post(http, url, None)
        assert missing.headers["www-authenticate"] == f'{CHALLENGE}, scope="tools.call"'


async def test_a_token_lacking_a_required_scope_is_403_insufficient_scope(tmp_path: Path, issuer: Issuer) -> None:
    """The shared `[gateway.http] token` carries no scopes and is not held to them."""
    shared = "shared-token-0123456789"
    config = oauth_config(tmp_path, issuer, token=shared, scopes_required=["tools.call"])
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=10) as http:
        lacking = await _post(http, url, issuer.mint(scope="tools.read"))
        assert lacking.status_code == 403
        assert lacking.headers["www-authenticate"] == (f'{CHALLENGE}, scope="tools.call", error="insufficient_scope"')
        assert lacking.json()["error"] == "insufficient_scope"
        assert (await _post(http, url, issuer.mint(scope="tools.read tools.call"))).status_code == 200
        assert (await _post(http, url, shared)).status_code == 200


async def test_a_rotated_issuer_key_is_accepted_and_invented_kids_do_not_hammer_the_issuer(
    tmp_path: Path, issuer: Issuer
) -> None:
    async with http_gateway(oauth_config(tmp_path, issuer)) as url, httpx2.AsyncClient(timeout=10) as http:
        assert (await _post(http, url, issuer.mint())).status_code == 200
        rotated = issuer.publish("EC")
        assert (await _post(http, url, issuer.mint(rotated))).status_code == 200
        assert issuer.jwks_fetches() == 2
        for index in range(20):
            invented = issuer.mint(rotated, headers={"kid": f"invented-{index}"})
            assert (await _post(http, url, invented)).status_code == 401
        assert issuer.jwks_fetches() == 2


def _recording(app: ASGIApp, seen: list[dict[str, str]]) -> ASGIApp:
    async def recorded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append({key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]})
        await app(scope, receive, send)

    return recorded


@asynccontextmanager
async def recording_upstream(seen: list[dict[str, str]]) -> AsyncIterator[str]:
    """A real MCP server over streamable HTTP that keeps the headers of every request it receives."""

    async def list_tools(ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        schema = {"type": "object", "properties": {"text": {"type": "string"}}}
        return types.ListToolsResult(tools=[types.Tool(name="echo", input_schema=schema)])

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        text = str((params.arguments or {}).get("text", ""))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    server = Server("recorder", on_list_tools=list_tools, on_call_tool=call_tool)
    app = _recording(server.streamable_http_app(host="127.0.0.1"), seen)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    with listening_socket("127.0.0.1", 0) as sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(uvicorn_server.serve, [sock])
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            uvicorn_server.should_exit = True


async def test_the_agents_access_token_never_reaches_a_url_upstream(tmp_path: Path, issuer: Issuer) -> None:
    seen: list[dict[str, str]] = []
    token = issuer.mint()
    async with recording_upstream(seen) as upstream:
        config = oauth_config(tmp_path, issuer, {"rec": {"url": upstream, "timeout": "30s"}})
        async with http_gateway(config) as url, client_with(url, token) as client:
            assert text_of(await client.call_tool("rec__echo", {"text": "relayed"})) == "relayed"
    assert any(headers.get("content-type", "").startswith("application/json") for headers in seen)
    assert len(seen) >= 2  # the gateway's initialize and the relayed call, at least
    for headers in seen:
        assert "authorization" not in headers, headers
        assert not any(token in value or token.split(".")[1] in value for value in headers.values()), headers
