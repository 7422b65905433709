"""A gateway keeps in memory only the code it serves with: no other command's, no OAuth's or notices' unless asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVING = "import sys, gateway.launch, gateway.cli.serve, gateway.downstream.serve, gateway.downstream.http\n"
STDIO = "import sys, gateway.launch, gateway.cli.serve, gateway.downstream.serve, gateway.downstream.stdio\n"


def _loaded(code: str, prefixes: tuple[str, ...]) -> list[str]:
    listing = f"print(','.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    found = subprocess.run([sys.executable, "-c", code + listing], capture_output=True, text=True, cwd=REPO, check=True)
    return [name for name in found.stdout.strip().split(",") if name]


def test_serving_http_without_oauth_loads_no_jwt_library() -> None:
    assert _loaded(SERVING, ("jwt", "gateway.principals.oauth")) == []


def test_serving_loads_no_other_command_of_the_cli() -> None:
    assert _loaded(SERVING, ("gateway.cli.", "gateway.setup.")) == [
        "gateway.cli.parser",
        "gateway.cli.serve",
        "gateway.setup.clients",  # the parser's list of clients `register` knows
    ]


def test_serving_stdio_without_notices_loads_no_http_client_and_no_console() -> None:
    assert _loaded(STDIO, ("httpx", "gateway.core.notify", "gateway.console", "starlette")) == []


def test_serving_without_a_store_loads_no_database_driver() -> None:
    assert _loaded(SERVING, ("psycopg",)) == []
    assert _loaded(STDIO, ("psycopg",)) == []
