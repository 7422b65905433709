"""`console`: the audit log and the approval queue in the browser (see gateway/console)."""

from __future__ import annotations

import argparse

import anyio

from gateway.cli.serve import address
from gateway.config.models import Config


def console(parser: argparse.ArgumentParser, config: Config, listen: str) -> int:
    from gateway.console.serve import serve_console  # the web stack loads only for the console

    anyio.run(serve_console, config, *address(parser, "--listen", listen, "127.0.0.1:8766"))
    return 0
