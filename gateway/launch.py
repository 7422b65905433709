"""The `mcp-armor` command's entry point: `serve` starts its upstream servers before the rest loads.

Loading the gateway (the MCP SDK above all) takes about half a second, and so does starting a
Python upstream server. Started here, from the config alone, the upstreams boot while the gateway
loads; the pool adopts each process whose command, environment and directory are still what it
would start (anything else it starts afresh, and stops what was left unadopted). Any problem here
is left for the normal start-up to meet and report.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["serve"] and "--help" not in words and "-h" not in words:
        _prestart(words)
    from gateway.cli import main as cli_main

    return cli_main(words)


def _prestart(words: list[str]) -> None:
    from gateway.config import DEFAULT_CONFIG, load_config
    from gateway.errors import GatewayError
    from gateway.pipes import command_line, prestart

    path = DEFAULT_CONFIG
    for index, word in enumerate(words):
        if word == "--config" and index + 1 < len(words):
            path = words[index + 1]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
    try:
        config = load_config(path)
        config.log_dir.mkdir(parents=True, exist_ok=True)
    except (GatewayError, OSError):
        return
    for spec in config.enabled_upstreams():
        if spec.command is None:
            continue
        try:
            argv = command_line(spec.command, spec.args, spec.env)
            with config.log_path(spec.name).open("a", encoding="utf-8") as log:
                prestart(argv, env=spec.env, cwd=spec.cwd, stderr=log)
        except OSError:
            continue
