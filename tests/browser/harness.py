"""A gateway with a real agent, the console beside it, and headless Chromium looking at the console:
shared by the browser tests and `scripts/screenshots`."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
import tomli_w
from mcp import Client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import NOTES_NEED_APPROVAL, REPO, fixture_upstream, gateway_client, write_config

os.environ.setdefault("SE_OFFLINE", "true")  # selenium finds nothing online: the system chromedriver is given

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 20.0
"""Seconds a browser-side condition may take before a test fails."""

POLICY = NOTES_NEED_APPROVAL

T = TypeVar("T")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = " and ".join(str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists())
    return f"{missing} not installed (Debian: apt-get install chromium chromium-driver)" if missing else None


@contextmanager
def browser(profile: Path) -> Iterator[WebDriver]:
    """Headless Chromium through the system chromedriver, with a profile of its own; quit at the end."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def until(driver: WebDriver, condition: Callable[[WebDriver], T | bool | None], what: str) -> T:
    """Wait (up to WAIT seconds) for `condition` to be truthy and return its value; `what` names it on failure."""
    result: T = WebDriverWait(driver, WAIT).until(condition, message=f"waited {WAIT:.0f}s for {what}")
    return result


def poll(condition: Callable[[], T | bool | None], what: str, seconds: float = WAIT) -> T:
    """Poll an outside process's state until `condition` is truthy, with a deadline."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:.0f}s for {what}")
        time.sleep(0.1)  # an outside process: look again shortly, until the deadline
    return result  # type: ignore[return-value]


def process_env(state: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "XDG_STATE_HOME": str(state)}


class Console:
    """`mcp-armor console --listen 127.0.0.1:PORT` as a process; `url` is the address with the token it prints."""

    def __init__(self, config: Path, port: int, state: Path) -> None:
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        command = [sys.executable, "-m", "gateway", "console", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=process_env(state)
        )
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()
        try:
            self.url = self._wait_for_url()
        except BaseException:
            self.stop()
            raise
        self.origin = self.url.split("/console/", 1)[0]

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the console printed no URL within 30s: {''.join(self.output)}") from None
            if line is None:
                raise AssertionError(f"the console exited ({self.process.wait()}): {''.join(self.output)}")
            self.output.append(line)
            if match := re.search(r"https?://127\.0\.0\.1:\d+/console/\?token=[^\s\"'>]+", line):
                return match[0]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._pumping.join(timeout=20)  # it reads to the end of the output, then the pipe can be closed
        assert self.process.stdout is not None
        self.process.stdout.close()


class Agent:
    """A real MCP client of a real stdio gateway process, driven from synchronous code through a portal."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: Client) -> None:
        self.portal = portal
        self.client = client
        self.started: list[Future[Any]] = []

    def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        return self.portal.call(lambda: self.client.call_tool(tool, arguments))

    def start(self, tool: str, arguments: dict[str, Any]) -> Future[Any]:
        """Start a call that will wait (for an approval) and return at once; cancelled when the scene closes
        if it is still waiting then (a failed test leaves no call behind)."""
        started = self.portal.start_task_soon(lambda: self.client.call_tool(tool, arguments))
        self.started.append(started)
        return started

    def tools(self) -> set[str]:
        return {tool.name for tool in self.portal.call(self.client.list_tools).tools}


class Scene:
    """One config directory: a toolbox upstream (`box`, its `write_note` asked about) and a shifty one
    (`shifty`, pinned in upstreams.lock by its first start, its `reads` described as `changed_description`
    from every later start: quarantined by the gateways, shown for review by the console); agents on it,
    and the console."""

    def __init__(self, directory: Path, state: Path, port: int, changed_description: str) -> None:
        self.directory = directory
        self.state = state
        self.record = directory / "box-calls.jsonl"
        self.stack = ExitStack()
        try:
            self._start(directory, state, port, changed_description)
        except BaseException:
            self.stack.close()
            raise

    def _start(self, directory: Path, state: Path, port: int, changed_description: str) -> None:
        self.portal = self.stack.enter_context(anyio.from_thread.start_blocking_portal("asyncio"))
        self.upstreams = {
            "box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(self.record)),
            "shifty": fixture_upstream(
                "shifty.py",
                SHIFTY_STATE=str(directory / "shifty-starts"),
                SHIFTY_CHANGE_AT="2",
                SHIFTY_CHANGED=changed_description,
            ),
        }
        self.config = write_config(directory, self.upstreams, policy=POLICY)
        locked = subprocess.run(
            [sys.executable, "-m", "gateway", "lock", "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=process_env(state),
            timeout=120,
        )
        assert locked.returncode == 0, locked.stderr
        self.console = Console(self.config, port, state)
        self.stack.callback(self.console.stop)

    def agent(self, config_name: str = "upstreams.toml", **gateway: Any) -> Agent:
        """Start a gateway process on this directory (a second config file in it when `gateway` settings are
        given: same state, policies and lock) with a connected agent; stopped when the scene closes."""
        config = self.directory / config_name
        if gateway:
            data = {"gateway": {"startup_timeout": "20s", **gateway}, "upstreams": self.upstreams}
            config.write_text(tomli_w.dumps(data), encoding="utf-8")
        os.environ["XDG_STATE_HOME"] = str(self.state)  # gateway_params passes it on
        client = self.stack.enter_context(self.portal.wrap_async_context_manager(gateway_client(config)))
        agent = Agent(self.portal, client)
        self.stack.callback(lambda: [call.cancel() for call in agent.started])
        return agent

    def close(self) -> None:
        self.stack.close()


def approval_showing(driver: WebDriver, text: str) -> WebElement | None:
    """The pending approval in `#approvals` whose arguments show `text`, if there is one."""
    for item in driver.find_elements("css selector", "#approvals li.approval"):
        if text in item.find_element("css selector", ".approval-args").text:
            return item
    return None
