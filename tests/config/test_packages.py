"""Upstream commands that fetch their code as they start, and which leave its version open."""

from __future__ import annotations

import pytest

from gateway.config.packages import unpinned_package


@pytest.mark.parametrize(
    ("command", "args", "open_version"),
    [
        ("npx", ["-y", "@modelcontextprotocol/server-everything"], "@modelcontextprotocol/server-everything@X.Y.Z"),
        ("/usr/local/bin/npx", ["--yes", "pkg@latest"], "pkg@X.Y.Z"),
        ("pnpm", ["dlx", "pkg@^1.2.0"], "pkg@X.Y.Z"),
        ("uvx", ["mcp-server-git"], "mcp-server-git==X.Y.Z"),
        ("uvx", ["mcp-server-git>=1"], "mcp-server-git==X.Y.Z"),
        ("pipx", ["run", "black"], "black==X.Y.Z"),
        ("uv", ["tool", "run", "ruff"], "ruff==X.Y.Z"),
        ("uvx", ["--with", "dep==1.0", "tool"], "tool==X.Y.Z"),  # an option's value is not the package
        ("uvx", ["--python", "3.12", "tool"], "tool==X.Y.Z"),
        ("uvx", ["tool==1.*"], "tool==X.Y.Z"),  # a wildcard is not an exact version
        ("C:\\tools\\npx.cmd", ["-y", "pkg"], "pkg@X.Y.Z"),
        ("pnpm", ["--silent", "dlx", "pkg"], "pkg@X.Y.Z"),
    ],
)
def test_a_package_fetched_with_its_version_open_is_named(command: str, args: list[str], open_version: str) -> None:
    found = unpinned_package(command, args)
    assert found is not None and found[1] == open_version


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("npx", ["-y", "@modelcontextprotocol/server-everything@2025.1.1", "stdio"]),
        ("npx", ["-p", "pkg@1.0.0", "pkg-bin"]),
        ("uvx", ["mcp-server-git==1.2.0"]),
        ("uvx", ["--from", "mcp-server-git==1.0.0", "mcp-server-git"]),
        ("pipx", ["run", "--spec", "black==24.1.0", "black"]),
        ("mcp-server-time", ["--local-timezone", "UTC"]),  # installed: nothing fetched
        ("python", ["-m", "server"]),
        ("pipx", ["install", "black"]),
        ("npx", ["--registry", "https://registry.example", "pkg@1.2.3"]),
        ("uvx", ["tool@1.2.3"]),  # uv's own spelling of an exact version
        ("uvx", ["--from=tool==1.0.0", "tool"]),
    ],
)
def test_an_exact_version_or_nothing_fetched_is_not_named(command: str, args: list[str]) -> None:
    assert unpinned_package(command, args) is None
