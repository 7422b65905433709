"""Upstream commands that fetch their code as they start (`npx -y pkg`, `uvx pkg`, `pipx run pkg`), and
which of them leave the version open: the code behind the pins can then change with no definition
changing, so `mcp-armor lock` and `policy check` say so. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath

_NPM_CARRIERS = frozenset({"--package", "-p"})
_NPM_VALUES = frozenset({"--registry", "--cache", "--userconfig", "--prefix", "--workspace", "-w", "--node-options"})
_UV_CARRIERS = frozenset({"--from"})
_UV_VALUES = frozenset(
    {
        "--with", "--with-editable", "--with-requirements", "--python", "-p", "--index", "--index-url",
        "--extra-index-url", "--default-index", "--find-links", "-f", "--constraint", "--override",
        "--directory", "--project", "--cache-dir", "--config-file", "--env-file",
    }
)  # fmt: skip
_PIPX_CARRIERS = frozenset({"--spec"})
_PIPX_VALUES = frozenset({"--python", "--index-url", "-i", "--pip-args"})
_EXACT = re.compile(r"\d+(?:\.\d+)*(?:[-+.][0-9A-Za-z.+-]+)?")
_NPM_EXACT = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.+-]+)?")


def unpinned_package(command: str, args: Sequence[str]) -> tuple[str, str] | None:
    """The package `command args` fetches with its version left open, and how to name it pinned
    (`pkg@X.Y.Z`, `pkg==X.Y.Z`); `None` when it names an exact version or fetches nothing."""
    name = PurePath(command.replace("\\", "/")).name.lower().removesuffix(".cmd").removesuffix(".exe")
    rest = list(args)
    if name == "pnpm":
        rest = rest[rest.index("dlx") + 1 :] if "dlx" in rest else []
        return _npm(rest) if rest else None
    if name in ("npx", "bunx", "pnpx"):
        return _npm(rest)
    if name == "uvx":
        return _python(rest, _UV_CARRIERS, _UV_VALUES, at_version=True)
    if name == "uv" and rest[:2] == ["tool", "run"]:
        return _python(rest[2:], _UV_CARRIERS, _UV_VALUES, at_version=True)
    if name == "pipx" and rest[:1] == ["run"]:
        return _python(rest[1:], _PIPX_CARRIERS, _PIPX_VALUES, at_version=False)
    return None


def _npm(args: list[str]) -> tuple[str, str] | None:
    package = _package(args, _NPM_CARRIERS, _NPM_VALUES)
    if package is None:
        return None
    scoped = package.startswith("@")
    base, _, version = (package[1:] if scoped else package).partition("@")
    if _NPM_EXACT.fullmatch(version):
        return None
    base = "@" + base if scoped else base
    return package, f"{base}@X.Y.Z"


def _python(
    args: list[str], carriers: frozenset[str], values: frozenset[str], *, at_version: bool
) -> tuple[str, str] | None:
    package = _package(args, carriers, values)
    if package is None:
        return None
    base = re.split(r"[<>=!~\[;@ ]", package)[0]
    _, equals, version = package.partition("==")
    if equals and _EXACT.fullmatch(version.strip()):
        return None
    if at_version and "@" in package and _EXACT.fullmatch(package.partition("@")[2].strip()):
        return None  # uv takes `tool@1.2.3` for an exact version
    return package, f"{base}==X.Y.Z"


def _package(args: list[str], carriers: frozenset[str], values: frozenset[str]) -> str | None:
    """The package named by a carrying option (`--from pkg`), else the first argument that is not an
    option or an option's value."""
    index = 0
    while index < len(args):
        arg = args[index]
        option, equals, value = arg.partition("=")
        if option in carriers:
            return value if equals else (args[index + 1] if index + 1 < len(args) else None)
        if option in values:
            index += 1 if equals else 2
            continue
        if not arg.startswith("-"):
            return arg
        index += 1
    return None
