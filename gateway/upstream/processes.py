"""Upstream server processes: how one is started, and the starts made ahead of the rest of the gateway.

A command upstream runs in a process group of its own (so that stopping it stops what it started),
with a minimal environment (the gateway's variables that `Passing` lets through, then its own `env`),
its stdin and stdout as pipes and its stderr to its log.

`mcp-armor serve` starts its upstreams before the gateway has loaded (gateway.launch): booting a
Python server takes about as long as loading the gateway, and the two then overlap. `start` adopts
such a process when it is asked for exactly the same start (argv, full environment, directory);
`discard_ahead` stops the ones nobody adopted (the config said otherwise once read in full). Only
the standard library is imported here, so that the early start is not kept waiting.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from gateway.config.environment import BY_DEFAULT, Passing, environment_for

logger = logging.getLogger(__name__)

STOP_GRACE = 2.0
"""Seconds an upstream has to exit after its stdin closes, and again after SIGTERM."""

Launch = tuple[tuple[str, ...], tuple[tuple[str, str], ...], str | None]
"""What identifies a start: argv, the full environment, the working directory."""
_ahead: dict[Launch, subprocess.Popen[bytes]] = {}


def resolve_command(command: str, env_path: str | None) -> str:
    """Find an upstream's executable: on PATH, then beside the gateway's own interpreter.

    Agent clients often start the gateway by absolute path without activating its virtualenv,
    so servers installed into that same environment are found too.
    """
    if "/" in command:
        return command
    search = [env_path or "", str(Path(sys.executable).parent)]
    found = shutil.which(command, path=":".join(part for part in search if part))
    if found is None:
        raise FileNotFoundError(f"command '{command}' not found on PATH or beside {sys.executable}")
    return found


def command_line(command: str, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """An upstream's argv: its command found as `resolve_command` finds it (on its own PATH, when its
    `env` sets one), then its arguments."""
    return [resolve_command(command, env.get("PATH", os.environ.get("PATH"))), *args]


def start(
    name: str,
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | Path | None,
    stderr: IO[Any],
    passing: Passing = BY_DEFAULT,
) -> subprocess.Popen[bytes]:
    """Start an upstream, or adopt the process started ahead for exactly this start if it still runs."""
    environment = environment_for(env, passing)
    process = _ahead.pop(_launch(argv, environment, cwd), None)
    if process is not None:
        if process.poll() is None:
            logger.debug("upstream '%s': adopted the process started ahead (pid %d)", name, process.pid)
            return process
        for pipe in (process.stdin, process.stdout):  # it ended already: start afresh
            if pipe is not None:
                pipe.close()
    return _popen(argv, environment, cwd, stderr)


def start_ahead(
    argv: list[str], *, env: Mapping[str, str], cwd: str | Path | None, stderr: IO[Any], passing: Passing = BY_DEFAULT
) -> None:
    """Start an upstream now, before the rest of the gateway has loaded, for `start` to adopt.
    Failures are left for `start` to meet and report."""
    environment = environment_for(env, passing)
    try:
        _ahead[_launch(argv, environment, cwd)] = _popen(argv, environment, cwd, stderr)
    except (OSError, ValueError) as exc:
        logger.debug("could not start %s ahead: %s", argv[0], exc)


def started_ahead() -> list[subprocess.Popen[bytes]]:
    """The processes started ahead that nobody has adopted yet."""
    return list(_ahead.values())


def discard_ahead() -> None:
    """Stop the processes started ahead that nobody adopted: close stdin, wait, SIGTERM, SIGKILL."""
    while _ahead:
        _, process = _ahead.popitem()
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        for signum in (signal.SIGTERM, signal.SIGKILL, None):
            with suppress(subprocess.TimeoutExpired):
                process.wait(STOP_GRACE)
                break
            if signum is not None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signum)
        process.stdout.close()


def _popen(
    argv: list[str], environment: Mapping[str, str], cwd: str | Path | None, stderr: IO[Any]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=dict(environment),
        cwd=cwd,
        start_new_session=True,
    )


def _launch(argv: list[str], environment: Mapping[str, str], cwd: str | Path | None) -> Launch:
    return tuple(argv), tuple(sorted(environment.items())), str(cwd) if cwd is not None else None
