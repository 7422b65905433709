"""The `mcp-armor` command line: argument parsing and printing, no business logic.

A mistake of the user's (bad config, bad argument) is one line on stderr and exit status 2; an
upstream that could not be reached makes `tools` (and `upstream add --check`) exit 1 after printing
what it could; a broken audit chain makes `audit verify` exit 1; servers `import` had to leave in
the client make it exit 1. Output cut short by its reader (`mcp-armor audit export | head`) ends
quietly with status 141, as a process killed by SIGPIPE would (`set -o pipefail` scripts see it the
same way). The arguments are declared in `cli/parser.py`; the commands live in `cli/serve.py`, `cli/tools.py`,
`cli/policy.py`, `cli/audit.py`, `cli/pins.py`, `cli/principals.py`, `cli/approvals.py`, `cli/register.py`,
`cli/importing.py`, `cli/upstreams.py`, `cli/wrap.py` and `cli/console.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from gateway.cli import parser as arguments
from gateway.cli import serve
from gateway.config.models import Config, load_config
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.audit.queries import Filters

# Each other command's module loads when that command runs: a serving gateway keeps none of them (nor
# the setup, registration and audit-reading code they bring).
SETUP_COMMANDS = ("register", "import", "init", "upstream")

WRAPPING = (("upstream", "add"), ("wrap", None))
"""The commands a server's command line follows `--` in."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments.parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # `upstream add NAME [options] -- COMMAND ARGS...` and `wrap [options] -- COMMAND ARGS...`: what follows
    # `--` is the upstream's command line, options and all (argparse would bind an optional positional list
    # before the options are read).
    command_line = words[words.index("--") + 1 :] if "--" in words else []
    args = parser.parse_args(words[: words.index("--")] if "--" in words else words)
    if "--" in words and (args.command, getattr(args, "upstream_command", None)) not in WRAPPING:
        parser.error(
            "'--' introduces an upstream's command line, in `upstream add NAME -- COMMAND ARGS...` "
            "and `wrap -- COMMAND ARGS...` only"
        )
    args.argv = command_line
    _configure_logging(verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False))
    try:
        status = _run(parser, args)
        sys.stdout.flush()  # here, so that a reader gone early is seen below and not at the interpreter's exit
    except BrokenPipeError:
        # The final flush at exit would fail again on the closed pipe: hand it /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE
    return status


BROKEN_PIPE = 128 + 13
"""The exit status of a command whose reader closed its output early (a shell's status for SIGPIPE)."""


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command in SETUP_COMMANDS:
            return _setup(args)
        if args.command == "wrap":
            from gateway.cli import wrap

            return wrap.wrap(parser, args)
        # An upstream whose variable is not set is read as unavailable, and `[gateway.http] token` is needed
        # by `serve --http` alone: no command needs the variables of what it does not use.
        config = load_config(args.config)
        if args.command == "serve":
            return serve.serve(parser, config, args.http)
        if args.command == "console":
            from gateway.cli import console

            return console.console(parser, config, args.listen)
        if args.command == "policy":
            return _policy(config, args)
        if args.command == "audit":
            return _audit(config, args)
        if args.command == "approvals":
            return _approvals(config, args)
        if args.command == "store":
            from gateway.cli import store

            return store.migrate(config)
        from gateway.cli import pins, tools

        if args.command == "scan":
            return anyio.run(pins.scan, config, args.json)
        if args.command == "lock":
            return anyio.run(pins.lock, config, args.force)
        if args.command == "pins":
            return _pins(config, args)
        if args.command == "principal":
            return _principal(config, args)
        return anyio.run(tools.tools, config, args.json)
    except GatewayError as exc:
        print(f"mcp-armor: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # raised inside a task group (`serve`: a port already taken, say)
        found, rest = group.split(GatewayError)
        if found is None or rest is not None:
            raise
        for error in _leaves(found):
            print(f"mcp-armor: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf for exc in group.exceptions for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _setup(args: argparse.Namespace) -> int:
    from gateway.cli import importing, register, upstreams

    if args.command == "register":
        return register.register_command(args)
    if args.command == "import":
        return importing.import_command(args)
    if args.command == "init":
        return importing.init_command(args)
    return upstreams.upstream_command(args)


def _policy(config: Config, args: argparse.Namespace) -> int:
    from gateway.cli import policy

    if args.policy_command == "check":
        return anyio.run(policy.check, config, args.offline, args.json)
    if args.policy_command == "explain":
        return anyio.run(policy.explain, config, args)
    return anyio.run(policy.replay, config, _filters(args), args.json)


def _pins(config: Config, args: argparse.Namespace) -> int:
    from gateway.cli import pins

    if args.pins_command == "status":
        return anyio.run(pins.status, config, args.json)
    if args.pins_command == "diff":
        return anyio.run(pins.diff, config, args.selector)
    return anyio.run(pins.approve, config, args.selector)


def _principal(config: Config, args: argparse.Namespace) -> int:
    from gateway.cli import principals

    if args.principal_command == "add":
        return principals.add(config, args.name, args.expires, args.role, args.json)
    if args.principal_command == "list":
        return principals.list_principals(config, args.json)
    return principals.revoke(config, args.selector)


def _approvals(config: Config, args: argparse.Namespace) -> int:
    from gateway.cli import approvals

    command = args.approvals_command
    if command == "list":
        return approvals.list_approvals(config, args.all, args.since, args.json)
    if command == "show":
        return approvals.show(config, args.id, args.json)
    approve, yes = command == "approve", getattr(args, "yes", False)
    return approvals.decide(config, args.id, approve=approve, note=args.reason, yes=yes, as_json=args.json)


def _audit(config: Config, args: argparse.Namespace) -> int:
    from gateway.audit.queries import Filters
    from gateway.cli import audit

    command = args.audit_command
    if command == "sessions":
        since = audit.parse_since(args.since) if args.since else None
        return audit.sessions(config, Filters(since=since, principal=args.principal), args.json)
    if command == "show":
        return audit.show(config, args.session, _filters(args), args.json)
    if command == "tail":
        return audit.tail(config, _filters(args), args.lines, args.follow, args.json)
    if command == "verify":
        return audit.verify(config, args.anchor, args.json)
    if command == "migrate":
        return audit.migrate(config, args.to)
    return audit.export(config, _filters(args))


def _filters(args: argparse.Namespace) -> Filters:
    from gateway.audit.queries import Filters
    from gateway.cli import audit

    since = audit.parse_since(args.since) if args.since else None
    kinds = audit.parse_kinds(getattr(args, "kind", None))
    session = getattr(args, "session", None)
    return Filters(
        session=session, principal=args.principal, tool=args.tool, decision=args.decision, since=since, kinds=kinds
    )


def _configure_logging(*, verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mcp-armor %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("gateway").setLevel(logging.DEBUG if verbose else logging.INFO)
    calls = logging.StreamHandler(sys.stderr)
    calls.setFormatter(logging.Formatter("mcp-armor: %(message)s"))
    monitor = logging.getLogger("gateway.monitor")
    monitor.handlers[:] = [calls]
    monitor.propagate = False
    monitor.setLevel(logging.WARNING if quiet else logging.INFO)
