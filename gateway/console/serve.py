"""`mcp-armor console`: the console served on its own, on loopback unless TLS and principals guard it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import uvicorn

from gateway.config.models import Config
from gateway.console.access import PREFIX, AccessToken, Gate, PrincipalGate
from gateway.console.app import Mounted, console_app
from gateway.downstream.http_edge import host_patterns, is_loopback, listening_socket, tls_files
from gateway.errors import ConfigError
from gateway.principals.store import LocalTokens

logger = logging.getLogger(__name__)


def console_gate(config: Config, host: str) -> tuple[Gate, tuple[str, str] | None]:
    """How the console at `host` lets people in, and its TLS files: a printed random token on loopback;
    beyond it, only over TLS and only for principals with a console role (`ConfigError` otherwise)."""
    tls = tls_files(config)
    if is_loopback(host):
        return AccessToken(), (str(tls[0]), str(tls[1])) if tls is not None else None
    local = LocalTokens.open(config.principals_path)
    if tls is None or not local.holds_principals():
        raise ConfigError(
            f"--listen {host}: the console answers beyond loopback only over TLS ([gateway.http] tls_certificate "
            "and tls_key) and to principals (`mcp-armor principal add NAME --role approver`)"
        )
    return PrincipalGate([local]), (str(tls[0]), str(tls[1]))


async def serve_console(config: Config, host: str, port: int, *, announce: Callable[[str], None] | None = None) -> None:
    """Serve the console at http(s)://HOST:PORT/console/ until stopped, announcing the URL to open."""
    gate, tls = console_gate(config, host)
    with listening_socket(host, port) as sock:
        port = sock.getsockname()[1]
        scheme = "https" if tls is not None else "http"
        app = console_app(config, gate, host_patterns(host, port), tls=tls is not None)
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        url = f"{scheme}://{shown}:{port}{PREFIX}/"
        if isinstance(gate, AccessToken):
            url += f"?token={gate.token}"
        (announce or _print)(url)
        server = uvicorn.Server(
            uvicorn.Config(
                Mounted(app),
                log_level="warning",
                lifespan="off",
                proxy_headers=False,
                timeout_graceful_shutdown=1,
                ssl_certfile=tls[0] if tls is not None else None,
                ssl_keyfile=tls[1] if tls is not None else None,
            )
        )
        await server.serve(sockets=[sock])


def _print(url: str) -> None:
    print(f"mcp-armor console: open {url}", flush=True)
    print("(the token in it opens the console for 12 hours; keep it to yourself)", file=sys.stderr, flush=True)
