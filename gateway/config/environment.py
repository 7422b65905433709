"""What an upstream process inherits from the gateway's environment: the defaults, `pass_env`, and
what never passes (runtime-changing variables through a glob, the gateway's own secrets, another
upstream's credentials).

Computed alike by the early start (gateway.launch, before the rest loads) and by the full reading, so
only the standard library is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import NamedTuple

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
        if name in self.guarded or changes_runtime(name):
            return False
        return _matches(name, self.names)


BY_DEFAULT = Passing()
"""The default variables only (`PASSED_ENVIRONMENT`)."""


def changes_runtime(name: str) -> bool:
    """Whether `name` is one of `RUNTIME_ENVIRONMENT` (matched ignoring case)."""
    return _matches(name.upper(), _RUNTIME_UPPER)


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
