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
    anyio.run(serve_http, config, *address(parser, "--http", http, "127.0.0.1:8765"))
    return 0


def address(parser: argparse.ArgumentParser, option: str, text: str, example: str) -> tuple[str, int]:
    """HOST:PORT as an option gives it (HOST defaults to 127.0.0.1); a usage error for anything else."""
    host, _, port_text = text.rpartition(":")
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        parser.error(f"{option}: expected HOST:PORT (e.g. {example}), got {text!r}")
    return host or "127.0.0.1", int(port_text)
