"""One gateway (with a real agent) and one console per module, and headless Chromium on the console."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.harness import Agent, Scene, browser
from tests.conftest import free_port

MARKUP = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
"""Markup an agent or an upstream might send, hoping the console inserts it as HTML."""


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """A config with an `ask` rule on box__write_note and a pinned upstream whose tool will change to carry
    markup; `mcp-armor console` running on it."""
    directory = tmp_path_factory.mktemp("console")
    state = tmp_path_factory.mktemp("console-state")
    built = Scene(directory, state, free_port(), f"Read a value. {MARKUP}")
    try:
        yield built
    finally:
        built.close()


@pytest.fixture(scope="module")
def driver(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Chromium signed in to the console (its token URL opened once)."""
    with browser(tmp_path_factory.mktemp("profile")) as opened:
        opened.get(scene.console.url)
        yield opened


@pytest.fixture
def fresh_profile(tmp_path: Path) -> Iterator[WebDriver]:
    """A second Chromium that never saw the token."""
    with browser(tmp_path / "profile") as opened:
        yield opened


@pytest.fixture(scope="module")
def agent(scene: Scene) -> Agent:
    """A real MCP client of a stdio gateway process serving the scene's config."""
    return scene.agent()
