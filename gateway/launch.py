"""The `mcp-armor` command's entry point: `serve` starts its upstream servers before the rest loads.

Loading the gateway (the MCP SDK above all) takes about half a second, and so does starting a
Python upstream server. Started here, from the file as written (gateway.config.source: the standard
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
    if words[:1] == ["serve"] and "-h" not in words and not any(_spells(word, "--help") for word in words):
        start_ahead(words)
    from gateway.cli import main as cli_main
    from gateway.upstream import processes

    try:
        return cli_main(words)
    finally:
        processes.discard_ahead()  # whatever was started ahead and not adopted (none unless serving)


def start_ahead(words: list[str]) -> None:
    from gateway.config.source import DEFAULT_CONFIG, early_starts
    from gateway.errors import GatewayError
    from gateway.upstream import processes

    path, serving_http = DEFAULT_CONFIG, False
    for index, word in enumerate(words):
        option, equals, value = word.partition("=")
        if _spells(option, "--config") and (equals or index + 1 < len(words)):
            path = value if equals else words[index + 1]
        elif _spells(option, "--http"):
            serving_http = True
    try:
        starts = early_starts(Path(path), os.environ, serving_http=serving_http)
    except (GatewayError, OSError, RecursionError):
        return
    for start in starts:
        try:
            argv = processes.command_line(start.command, start.args, start.env)
            start.log.parent.mkdir(parents=True, exist_ok=True)
            with start.log.open("a", encoding="utf-8") as log:
                processes.start_ahead(argv, env=start.env, cwd=start.cwd, stderr=log, passing=start.passing)
        except OSError:
            continue


def _spells(word: str, option: str) -> bool:
    """Whether argparse could read `word` as `option`: it accepts any prefix of a long option (`--ht`), and
    an ambiguous one (`--h`) is refused anyway, so starting nothing for it loses nothing."""
    return len(word) > 2 and option.startswith(word)
