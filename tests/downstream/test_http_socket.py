"""The HTTP face's sockets: every accepted connection sends small writes at once (TCP_NODELAY).

Served the way `serve --http` serves (its listening socket handed to uvicorn), a connection whose
socket leaves Nagle's algorithm on holds a response body back until the client's delayed ACK: ~40 ms
per request on a keep-alive connection. Checked on the accepted socket itself, not by timing.
"""

from __future__ import annotations

import socket

import anyio
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.downstream.http_edge import listening_socket


async def _hello(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("[::1]", id="ipv6")])
async def test_accepted_connections_have_nodelay(host: str) -> None:
    if host == "[::1]" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    with listening_socket(host, 0) as sock:
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(_hello, log_level="warning", lifespan="off"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):  # the socket already listens: the connection waits to be accepted
                client = await anyio.connect_tcp(host.strip("[]"), port)
                async with client:
                    request = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
                    await client.send(request)
                    assert (await client.receive()).startswith(b"HTTP/1.1 200")
                    (connection,) = server.server_state.connections
                    accepted = connection.transport.get_extra_info("socket")  # type: ignore[attr-defined]
                    assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            server.should_exit = True
