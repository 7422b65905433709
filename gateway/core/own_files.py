"""The built-in rule no policy can lift: no call may name the gateway's own files.

The configuration file, the policies directory (reloaded as it changes), `upstreams.lock`, the state
directory (the audit log, its journals, keys) and the audit log wherever it is, with its journals, key
file, leases and anchor file: a call whose path arguments resolve into them is denied under
`builtin:gateway-files`, reads too, whatever the policies, a rewrite or a person say. Path arguments
are those `[[paths]]` declares, those whose names say so (`gateway.display.path_like`, at any depth),
and so a resource's `uri` too (a `file://` URI by its path). Every value, a URI or not, is checked as
a path too: a file server takes `zz:/../policies` for a relative path. A relative path is resolved
against the upstream's working directory; each path is checked as written (lexically normalised) and
with its symbolic links resolved (the longest existing prefix), case-folded where the file system
holding a protected file ignores case, and with backslashes read as separators too.

Unlike the rest of the engine this module reads the file system (to resolve links); it decides from
what it finds there and the configuration alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.audit.anchor import Anchoring
from gateway.audit.journal import journal_directory
from gateway.audit.keys import key_path
from gateway.audit.leases import lease_directory
from gateway.calls import Decision, Effect
from gateway.config.models import IN_MEMORY, Config
from gateway.display import escape, path_like

RULE = "builtin:gateway-files"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_SHOWN = 200


@dataclass(frozen=True, slots=True)
class Protected:
    """One of the gateway's files (or a directory of them: `tree`)."""

    what: str
    forms: tuple[str, ...]
    """Its absolute path as configured and with links resolved (case-folded when `folded`)."""
    tree: bool
    folded: bool

    def holds(self, path: str) -> bool:
        path = _fold(path) if self.folded else path
        return any(_inside(path, form) if self.tree else path == form for form in self.forms)

    def within(self, directory: str) -> bool:
        """Whether this file lies in (or is) `directory`."""
        directory = _fold(directory) if self.folded else directory
        return any(_inside(form, directory) for form in self.forms)


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it (both absolute and normalised)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class GatewayFiles:
    """The gateway's own files, and the working directory each upstream resolves relative paths against."""

    def __init__(self, protected: Collection[Protected], working: Mapping[str, str], default: str) -> None:
        self.protected = tuple(protected)
        self._working = dict(working)
        self._default = default

    @classmethod
    def of(cls, config: Config) -> GatewayFiles:
        entries = [
            ("configuration file", config.path, False),
            ("policies directory", config.policy_dir, True),
            ("lock file", config.lock_path, False),
            ("state directory", config.state_dir, True),
        ]
        audit = config.audit_path
        if str(audit) != IN_MEMORY:
            entries.append(("audit log", audit, False))
            entries += [("audit log", audit.with_name(audit.name + suffix), False) for suffix in ("-wal", "-shm")]
            entries += [("audit log", audit.with_name(audit.name + "-journal"), False)]
            entries.append(("audit journal directory", journal_directory(audit), True))
            entries.append(("audit key file", key_path(audit), False))
            entries.append(("audit lease directory", lease_directory(audit), True))
            anchor = Anchoring.of(config).file
            if anchor is not None:
                entries.append(("audit anchor file", anchor, False))
        protected = [_protected(what, path, tree) for what, path, tree in entries]
        working = {
            name: str(spec.cwd) for name, spec in config.upstreams.items() if spec.command is not None and spec.cwd
        }
        return cls(protected, working, os.getcwd())

    def refusal(self, upstream: str, arguments: Mapping[str, Any], declared: Collection[str]) -> str | None:
        """Why a call to `upstream` with these arguments is refused; `None` when none names the gateway's files."""
        base = self._working.get(upstream, self._default)
        for key, value in _paths(arguments, declared):
            for form in _forms(value, base):
                for entry in self.protected:
                    if entry.holds(form):
                        # The value is not quoted: it may hold a secret, and the masked arguments are recorded.
                        return (
                            f"argument '{escape(key[:_SHOWN], quotes=False)}' names the gateway's "
                            f"{entry.what}, which no call may read or change (built-in rule '{RULE}')"
                        )
        return None

    def decide(
        self,
        decision: Decision,
        upstream: str,
        arguments: Mapping[str, Any],
        declared: Collection[str],
    ) -> Decision:
        """`decision`, unless the arguments (as sent, or as the decision would forward them) name the
        gateway's files: then a `deny` under `builtin:gateway-files`. A check that fails denies too."""
        try:
            reason = self.refusal(upstream, arguments, declared)
            if reason is None and decision.arguments is not None:
                reason = self.refusal(upstream, decision.arguments, declared)
        except Exception as exc:  # fail closed: a path that cannot be checked is not let through
            reason = f"the path arguments could not be checked against the gateway's files ({type(exc).__name__})"
        if reason is None:
            return decision
        return Decision(Effect.DENY, reason, decision.revision, (RULE,))

    def exposures(self, config: Config, *, unset_cwd: bool = False) -> list[str]:
        """One line per upstream whose working directory or arguments hold the gateway's files (a file server
        given `.` in the directory holding `policies/`): calls naming them are refused, but the upstream
        itself can reach them. With `unset_cwd`, also an upstream working in the configuration's directory
        (where one that sets no `cwd` works) that holds the state directory or the audit log: the approval
        queue and the log are then within its reach (the configuration and policies always are there)."""
        lines = []
        for name, spec in config.upstreams.items():
            if spec.command is None or not spec.enabled:
                continue
            base = self._working.get(name, self._default)
            given = [(f"argument '{arg}'", _option_value(arg)) for arg in spec.args]
            if spec.cwd is not None and Path(base) != config.directory:
                given.insert(0, (f"working directory '{base}'", base))
            for label, value in given:
                if not value:
                    continue
                where = os.path.join(base, os.path.expanduser(value))
                if not os.path.exists(where):
                    continue
                real = os.path.realpath(where)
                held = [entry.what for entry in self.protected if entry.within(real) or entry.holds(real)]
                if held:
                    lines.append(
                        f"upstream '{name}': its {escape(label, quotes=False)} gives it access to the gateway's "
                        f"{', '.join(dict.fromkeys(held))}; calls naming them are refused (built-in rule '{RULE}'), "
                        "but the server itself can reach them: give it a directory that does not hold them"
                    )
                    break
            else:
                if unset_cwd and Path(base) == config.directory:
                    lines += self._state_in_reach(name, base)
        return lines

    def _state_in_reach(self, name: str, base: str) -> list[str]:
        """The line for an upstream working in the configuration's directory, if that holds the state."""
        real = os.path.realpath(base)
        held = [entry.what for entry in self.protected if entry.what in _STATE and entry.within(real)]
        if not held:
            return []
        return [
            f"upstream '{name}': its working directory '{escape(base, quotes=False)}' (the configuration's, as it "
            f"sets no other) holds the gateway's {', '.join(dict.fromkeys(held))}: an agent that can use it could "
            "reach the approval queue and the audit log there; give it a cwd that does not hold them, or move "
            "[gateway] state out of that directory"
        ]


_STATE = frozenset(
    {"state directory", "audit log", "audit journal directory", "audit key file", "audit lease directory"}
)
"""The gateway's files an upstream working in the configuration's directory is warned about: the approval
queue and the audit log live among them (the configuration and the policies are always there)."""


def _protected(what: str, path: Path, tree: bool) -> Protected:
    configured = os.path.normpath(os.path.abspath(path))
    real = os.path.realpath(configured)
    folded = _ignores_case(real)
    forms = tuple(dict.fromkeys(_fold(form) if folded else form for form in (configured, real)))
    return Protected(what, forms, tree, folded)


def _paths(arguments: Mapping[str, Any], declared: Collection[str]) -> Iterator[tuple[str, str]]:
    """Every string under a path argument, at any depth (an object's keys too), with the name of the
    top-level argument holding it (a key deeper down may itself be a path, or a secret: never quoted)."""
    pending: list[tuple[str, str, Any, bool]] = [(str(key), str(key), value, False) for key, value in arguments.items()]
    while pending:
        top, key, value, inherited = pending.pop()
        named = inherited or key in declared or path_like(key)
        if isinstance(value, str):
            if named:
                yield top, value
        elif isinstance(value, Mapping):
            if named:  # an object under a path argument: its keys may be paths too (several files written)
                pending.extend((top, str(inner), str(inner), True) for inner in value)
            pending.extend((top, str(inner), item, named) for inner, item in value.items())
        elif isinstance(value, list | tuple):
            pending.extend((top, key, item, named) for item in value)


def _forms(value: str, base: str) -> list[str]:
    """The absolute paths `value` can name: as written and with links resolved, backslashes as separators too."""
    value = value.split("\0", 1)[0]
    written = {value}  # any value, URI or not, also as a path: a server may take `zz:/../x` for a relative one
    match = _SCHEME.match(value)
    if match is not None and match[1].lower() == "file":
        written.add(unquote(urlsplit(value).path))
    spellings = {spelling for one in written if one for spelling in (one, one.replace("\\", "/"))}
    forms: list[str] = []
    for spelling in spellings:
        absolute = os.path.join(base, os.path.expanduser(spelling))
        lexical = os.path.normpath(absolute)
        forms += [lexical, os.path.realpath(absolute), os.path.realpath(lexical)]
    return forms


def _option_value(arg: str) -> str:
    """The path an upstream's argument may name: itself, or the value of an `--option=value`."""
    if arg.startswith("-"):
        return arg.split("=", 1)[1] if "=" in arg else ""
    return arg


def _fold(path: str) -> str:
    return path.casefold()


def _ignores_case(path: str) -> bool:
    """Whether the file system holding `path` (its nearest existing part with a cased name) ignores case."""
    probe = Path(path)
    while not probe.exists() or probe.name.swapcase() == probe.name:
        if probe.parent == probe:
            return False
        probe = probe.parent
    other = probe.with_name(probe.name.swapcase())
    try:
        return other.exists() and os.path.samefile(probe, other)
    except OSError:
        return False
