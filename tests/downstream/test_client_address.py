"""`ClientAddress`: the client's address from the TCP peer, or from a trusted proxy's forwarding header."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from gateway.downstream.http_edge import ClientAddress, _peer_address, address_of

pytestmark = pytest.mark.anyio


async def _settled(peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]], trusted: list[str]) -> Any:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    await ClientAddress(app, trusted)({"type": "http", "client": peer, "headers": headers}, None, None)  # type: ignore[arg-type]
    return seen[0]["client"]


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # Every copy of the header is read, in order: the proxy's own copy comes last.
        (
            ("10.0.0.1", 5),
            [(b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9")],
            ("203.0.113.9", 0),
        ),
        # A peer seen as an IPv4 address mapped into IPv6 (a dual-stack socket) is the IPv4 address.
        (("::ffff:10.0.0.1", 5), [(b"x-forwarded-for", b"203.0.113.9")], ("203.0.113.9", 0)),
        (("::ffff:192.0.2.7", 5), [(b"x-forwarded-for", b"203.0.113.9")], ("192.0.2.7", 5)),
        # An element naming `for` twice, or not at all, is unreadable: the walk stops at the proxy.
        (("10.0.0.1", 5), [(b"forwarded", b"for=203.0.113.9;for=198.51.100.1")], ("10.0.0.1", 5)),
        (("10.0.0.1", 5), [(b"forwarded", b"proto=https")], ("10.0.0.1", 5)),
        (("10.0.0.1", 5), [(b"x-forwarded-for", "\u00ff\u00fe".encode("latin-1"))], ("10.0.0.1", 5)),
        (("10.0.0.1", 5), [(b"x-forwarded-for", b"[2001:db8::1")], ("10.0.0.1", 5)),
        (None, [(b"x-forwarded-for", b"203.0.113.9")], None),
    ],
)
async def test_the_client_address_behind_a_trusted_proxy(
    peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None
) -> None:
    assert await _settled(peer, headers, ["10.0.0.0/8"]) == client


def test_address_of_a_scope_without_a_client_is_empty() -> None:
    assert address_of({"type": "http", "client": None}) == ""
    assert address_of({"type": "http", "client": ("192.0.2.1", 1)}) == "192.0.2.1"


async def test_a_peer_seen_before_is_not_parsed_again_and_reads_the_same() -> None:
    _peer_address.cache_clear()
    first = await _settled(("::ffff:192.0.2.8", 5), [], [])
    again = await _settled(("::ffff:192.0.2.8", 6), [], [])
    assert (first, again) == (("192.0.2.8", 5), ("192.0.2.8", 6))
    assert _peer_address.cache_info().hits == 1
