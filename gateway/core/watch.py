"""Reloading the policies while serving (when a policy file changes, and on SIGHUP), and noticing a
changed file (`upstreams.lock`).

The new set replaces the old one only if every file of it loads and compiles; otherwise the old set
stays in force and the error is logged and reported (the gateway audits both). Changes are noticed
by polling the directory's file stamps
(once a second: no extra dependency, works on every filesystem the gateway runs on).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from gateway.errors import PolicyError
from gateway.policy.engine import PolicySet
from gateway.policy.files import load_policies

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0

Install = Callable[[PolicySet, str], Awaitable[None]]
"""Puts a new set in force; called with the set and what triggered the reload."""
Failed = Callable[[str, str], None]
"""Reports a reload that failed: the trigger and the error."""


async def watch_policies(directory: Path, current: Callable[[], str], install: Install, failed: Failed) -> None:
    """Reload on change or SIGHUP until cancelled; `current` gives the revision in force."""
    async with anyio.create_task_group() as tg:
        if hasattr(signal, "SIGHUP"):
            tg.start_soon(_on_hangup, directory, current, install, failed)

        async def changed() -> None:
            await reload_policies(directory, current, install, failed, "a policy file changed")

        await _poll(lambda: _stamps(directory), changed)


async def reload_policies(
    directory: Path, current: Callable[[], str], install: Install, failed: Failed, trigger: str
) -> bool:
    """Load the directory afresh and install it if it compiles and differs; `False` if it did not load."""
    try:
        policies = load_policies(directory)
    except PolicyError as exc:
        logger.error("policy reload (%s) failed; revision %s stays in force: %s", trigger, current(), exc)
        failed(trigger, str(exc))
        return False
    if policies.revision != current():
        await install(policies, trigger)
        logger.info(
            "policies reloaded (%s): revision %s, %d rules from %d files",
            trigger,
            policies.revision,
            len(policies.rules),
            len(policies.files),
        )
    return True


async def _on_hangup(directory: Path, current: Callable[[], str], install: Install, failed: Failed) -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            await reload_policies(directory, current, install, failed, "SIGHUP")


def _stamps(directory: Path) -> frozenset[tuple[str, int, int]]:
    """Name, modification time and size of every file under the directory (a missing one: none)."""
    stamps = set()
    try:
        for path in directory.rglob("*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            if path.is_file():
                stamps.add((str(path.relative_to(directory)), stat.st_mtime_ns, stat.st_size))
    except OSError:
        return frozenset()
    return frozenset(stamps)


async def watch_file(path: Path, changed: Callable[[], Awaitable[None]]) -> None:
    """Call `changed` whenever the file at `path` appears, changes or disappears, until cancelled."""
    await _poll(lambda: _stamp(path), changed)


async def _poll(stamp: Callable[[], object], changed: Callable[[], Awaitable[None]]) -> None:
    before = stamp()
    while True:
        await anyio.sleep(POLL_SECONDS)
        now = stamp()
        if now != before:
            before = now
            await changed()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size
