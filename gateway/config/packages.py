"""Upstream commands that fetch their code as they start (`npx -y pkg`, `uvx pkg`, `pipx run pkg`), and
which of them leave the version open: the code behind the pins can then change with no definition
changing, so `mcp-armor lock` and `policy check` say so. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath

_NPM_RUNNERS = frozenset({"npx", "bunx", "pnpx"})
_PYTHON_RUNNERS = frozenset({"uvx"})
_CARRIERS = ("--package", "-p", "--from", "--spec")
"""Options whose value names the package (npx -p, uvx --from, pipx run --spec)."""
_EXACT = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]+)?")


def unpinned_package(command: str, args: Sequence[str]) -> tuple[str, str] | None:
    """The package `command args` fetches with its version left open, and how to name it pinned
    (`pkg@X.Y.Z`, `pkg==X.Y.Z`); `None` when it names an exact version or fetches nothing."""
    name, rest = PurePath(command).name, list(args)
    if name in _NPM_RUNNERS or (name == "pnpm" and rest[:1] == ["dlx"]):
        npm = True
        rest = rest[1:] if name == "pnpm" else rest
    elif (
        name in _PYTHON_RUNNERS
        or (name == "pipx" and rest[:1] == ["run"])
        or (name == "uv" and rest[:2] == ["tool", "run"])
    ):
        npm = False
        rest = rest[1:] if name == "pipx" else rest[2:] if name == "uv" else rest
    else:
        return None
    package = _package(rest)
    if package is None or (_npm_exact(package) if npm else "==" in package):
        return None
    if npm:
        base = "@" + package[1:].partition("@")[0] if package.startswith("@") else package.partition("@")[0]
        return package, f"{base}@X.Y.Z"
    return package, re.split(r"[<>=!~\[;@ ]", package)[0] + "==X.Y.Z"


def _package(args: list[str]) -> str | None:
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in _CARRIERS and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(tuple(f"{carrier}=" for carrier in _CARRIERS)):
            return arg.partition("=")[2]
        if not arg.startswith("-"):
            return arg
        index += 1
    return None


def _npm_exact(spec: str) -> bool:
    version = (spec[1:] if spec.startswith("@") else spec).partition("@")[2]
    return _EXACT.fullmatch(version) is not None
