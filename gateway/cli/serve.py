"""`serve`: the gateway over stdio, or over streamable HTTP with `--http`."""

from __future__ import annotations

import argparse

import anyio

from gateway.config.models import Config


def serve(parser: argparse.ArgumentParser, config: Config, http: str | None) -> int:
    from gateway.downstream.serve import serve_http, serve_stdio

    if http is None:
        anyio.run(serve_stdio, config)
        return 0
    host, _, port_text = http.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        parser.error(f"--http: expected HOST:PORT (e.g. 127.0.0.1:8765), got {http!r}")
    anyio.run(serve_http, config, host or "127.0.0.1", int(port_text))
    return 0
