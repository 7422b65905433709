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
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any, NamedTuple

logger = logging.getLogger(__name__)

PASSED_ENVIRONMENT = (
    *("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER"),
    *("LANG", "LANGUAGE", "LC_*", "TMPDIR"),
    # Trust: a corporate CA is added through these (uv, Python, curl, Node), or uv told to use the system's.
    *("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "UV_NATIVE_TLS"),
    *("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"),
)
"""What an upstream child inherits from the gateway's environment by default, besides its own `env`:
who and where it is, locale and temporary files, and what reaching the network needs (names or globs)."""
RUNTIME_ENVIRONMENT = (
    *("LD_*", "DYLD_*", "GCONV_PATH", "GLIBC_TUNABLES"),
    *("PYTHON*", "NODE_*", "PERL5OPT", "PERL5LIB", "PERLLIB", "RUBYOPT", "RUBYLIB", "LUA_INIT*"),
    *("JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "_JAVA_OPTIONS", "CLASSPATH"),
    *("DOTNET_STARTUP_HOOKS", "DOTNET_ADDITIONAL_DEPS", "CORECLR_*", "COR_*", "GOFLAGS", "GOTOOLCHAIN"),
    *("BASH_ENV", "ENV", "BASH_FUNC_*", "SHELLOPTS", "BASHOPTS", "PS4", "IFS"),
    # What `npx`, `uvx` and git fetch and run: their registry, index, hooks, ssh command or config.
    *("NPM_CONFIG_*", "YARN_*", "COREPACK_*", "UV_*", "PIP_*", "PIPX_*", "GIT_*"),
)
"""Variables that change how a child runs, what code it loads or where its package manager fetches it
from (matched ignoring case, as npm reads its `npm_config_*`): passed on only when a `pass_env` entry
names one exactly, never through a glob. The defaults (`UV_NATIVE_TLS`, `NODE_EXTRA_CA_CERTS`) still pass."""
_RUNTIME_UPPER = tuple(pattern.upper() for pattern in RUNTIME_ENVIRONMENT)
OWN_ENVIRONMENT = ("MCP_ARMOR_*",)
"""The gateway's own variables (its credentials among them): never passed on, however named."""
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


class Passing(NamedTuple):
    """Which of the gateway's environment variables an upstream inherits."""

    names: tuple[str, ...] = ()
    """`pass_env` entries (`[gateway]`'s, then the upstream's): names, or globs of names."""
    withheld: frozenset[str] = frozenset()
    """The variables the gateway's own secrets are taken from: never passed on, however named."""
    guarded: frozenset[str] = frozenset()
    """The variables other upstreams' tables take (their credentials): passed on only when a `pass_env`
    entry names one exactly, never through a glob, so that one upstream's token does not reach another."""

    def passes(self, name: str) -> bool:
        if name in self.withheld or _matches(name, OWN_ENVIRONMENT):
            return False
        if name in self.names or passed_by_default(name):
            return True
        if name in self.guarded or _matches(name.upper(), _RUNTIME_UPPER):
            return False
        return _matches(name, self.names)


BY_DEFAULT = Passing()
"""The default variables only (`PASSED_ENVIRONMENT`)."""


def passed_by_default(name: str) -> bool:
    """Whether every upstream inherits `name` (`PASSED_ENVIRONMENT`), whatever the config says."""
    return _matches(name, PASSED_ENVIRONMENT)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def unset_reference(name: str, value: str) -> bool:
    """Whether `value` is `name`'s own reference, as a client that leaves an unset variable as written
    (Gemini CLI) passes it on: the variable is not set."""
    return value in (f"${{{name}}}", f"${name}", f"${{env:{name}}}")


def environment_for(env: Mapping[str, str], passing: Passing = BY_DEFAULT) -> dict[str, str]:
    """An upstream's environment: the gateway's variables that pass (and are set), then its own `env`
    (which may set any variable, a withheld one too: that is written out in its table)."""
    environment = {
        key: value for key, value in os.environ.items() if passing.passes(key) and not unset_reference(key, value)
    }
    environment.update(env)
    return environment


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
