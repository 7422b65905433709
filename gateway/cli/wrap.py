"""`wrap`: guard one server in place, as an agent client already lists it (`mcp-armor wrap -- CMD ARGS...`).

The server becomes the one upstream of a gateway served over stdio, its names exposed as they are
(`prefix = ""`), so the agent sees the tools it saw before, now under policy and in the audit log. It
runs in the directory, and with the environment, the client started `wrap` with (the client's `env`
for the server is meant for it). The gateway's settings, policies, audit log and lock come from
`--config FILE` (whose own upstreams are not started), else from `WRAP_HOME`: a config written there
on first use with a default-deny policy, so nothing is allowed until a policy there (or in
`--policies DIR`) allows it.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from gateway.cli import serve
from gateway.config.models import Config, UpstreamSpec, load_config
from gateway.config.source import UPSTREAM_NAME
from gateway.errors import ConfigError
from gateway.setup.files import write_atomically
from gateway.setup.starter import DEFAULTS_TEMPLATE

WRAP_HOME = Path("~/.mcp-armor/wrap")
"""Where `wrap` keeps its config, policies, audit log and upstream logs when not given `--config`."""

WRAP_CONFIG = """\
# mcp-armor settings for `mcp-armor wrap -- CMD ARGS...` without --config: every server wrapped
# so shares these policies, this audit log and this state. Its wrapped server is the only upstream;
# any [upstreams] listed here are not started by `wrap`. Read the audit with
# `mcp-armor audit tail --config THIS_FILE`.

[gateway]
policies = "policies"   # default deny: allow the wrapped server's tools there
state = "."
"""


def wrap(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.argv or not args.argv[0]:
        parser.error("wrap: give the server's command line after '--': mcp-armor wrap -- COMMAND ARGS...")
    config = wrapped(_settings(args.config), args.argv, args.name, args.policies)
    return serve.serve(parser, config, None)


def _settings(path: str | None) -> Config:
    """The given config, or the one in `WRAP_HOME`, written (with a default-deny policy) on first use."""
    if path is not None:
        return load_config(path)
    home = WRAP_HOME.expanduser()
    config_path = home / "upstreams.toml"
    if not config_path.exists():
        policies = home / "policies"
        if not policies.exists():
            write_atomically(policies / "defaults.toml", DEFAULTS_TEMPLATE)
        write_atomically(config_path, WRAP_CONFIG)
    return load_config(config_path)


def wrapped(config: Config, argv: list[str], name: str | None, policies: str | None) -> Config:
    """`config` with the server `argv` as its one upstream, unprefixed, run here with this environment."""
    name = name if name is not None else _name_of(argv[0])
    here, command = Path.cwd(), argv[0]
    if os.sep in command and not Path(command).is_absolute():
        command = str(here / command)
    if not UPSTREAM_NAME.match(name):
        raise ConfigError(f"wrap: --name {name!r}: upstream names must match {UPSTREAM_NAME.pattern}")
    spec = UpstreamSpec(name=name, prefix="", command=command, args=tuple(argv[1:]), cwd=here, pass_env=("*",))
    gateway = config.gateway
    if policies is not None:
        gateway = gateway.model_copy(update={"policies": Path(policies).resolve()})
    return config.model_copy(update={"gateway": gateway, "upstreams": {name: spec}, "upstream_variables": {}})


def _name_of(command: str) -> str:
    """An upstream name from the command's base name (`/usr/bin/Python3.12` -> `python3-12`)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", Path(command).name.lower()).strip("-_")
    return name or "server"
