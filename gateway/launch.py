"""The `mcp-armor` command's entry point: `serve` starts its upstream servers before the rest loads.

Loading the gateway (the MCP SDK above all) takes about half a second, and so does starting a
Python upstream server. Started here, from the file as written (gateway.config_source: the standard
library only, no validation yet), the upstreams boot while the gateway loads. The pool adopts each
process whose command, environment and directory are what the validated config asks for; whatever
was started ahead and not adopted (the config turned out invalid, or said otherwise) is stopped
before the command ends. Any problem reading the file here is left for the full reading to report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["serve"] and "--help" not in words and "-h" not in words:
        _start_ahead(words)
    from gateway import children
    from gateway.cli import main as cli_main

    try:
        return cli_main(words)
    finally:
        children.discard_ahead()  # whatever was started ahead and not adopted (none unless serving)


def _start_ahead(words: list[str]) -> None:
    from gateway import children
    from gateway.config_source import DEFAULT_CONFIG, early_starts
    from gateway.errors import GatewayError

    path = DEFAULT_CONFIG
    for index, word in enumerate(words):
        if word == "--config" and index + 1 < len(words):
            path = words[index + 1]
        elif word.startswith("--config="):
            path = word.split("=", 1)[1]
    try:
        starts = early_starts(Path(path), os.environ)
    except (GatewayError, OSError, RecursionError):
        return
    for start in starts:
        try:
            argv = children.command_line(start.command, start.args, start.env)
            start.log.parent.mkdir(parents=True, exist_ok=True)
            with start.log.open("a", encoding="utf-8") as log:
                children.start_ahead(argv, env=start.env, cwd=start.cwd, stderr=log, passing=start.passing)
        except OSError:
            continue
