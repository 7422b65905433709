"""`upstreams.toml` as written, before it is validated: the TOML, `${VAR}` interpolation, and where a
command upstream runs.

gateway.config.models builds its typed models on top of this. `mcp-armor serve` also reads the file here
alone, to start its command upstreams while the rest of the gateway (pydantic, MCP) loads; which is
why nothing here imports more than the standard library. A process started from this early reading
is only used if the validated config asks for exactly the same start (gateway.upstream.processes).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from gateway.config.environment import Passing, passed_by_default, unset_reference
from gateway.errors import ConfigError

DEFAULT_CONFIG = "upstreams.toml"
"""The config `mcp-armor` reads unless given `--config`."""
MIN_TOKEN_LENGTH = 16
"""The shortest `[gateway.http] token` accepted: an empty or short one guards nothing."""
DEFAULT_STATE = ".mcp-armor"
"""`[gateway] state` unless set: the gateway's own files, relative to the config's directory."""
UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PASS_ENV_ENTRY = re.compile(r"^[A-Za-z_*?][A-Za-z0-9_*?]*$")
"""A `pass_env` entry: a variable's name, or a glob of names (`*`, `?`)."""
TYPED_KEYS = ("enabled", "timeout", "pinning", "pass_env")
"""`[upstreams.NAME]` keys whose value is not free text: one that holds a variable that is not set is left
out (the upstream is unavailable, so the value would never be used, and an empty one would not be valid)."""
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*?)(?::-([^}]*))?\}")
PRINCIPAL_REFERENCE = "${principal.name}"
"""Stands for the calling principal's name in an upstream's `headers` and `env` values. The dot makes it
no environment variable's name (a reference to one is `${[A-Za-z_][A-Za-z0-9_]*}`), so it cannot shadow
a variable of the gateway's environment, and a file written before it meant nothing else by it."""
PRINCIPAL_MARK = "\x00principal.name\x00"
"""What `PRINCIPAL_REFERENCE` reads as until a call names the principal: NUL cannot come from the
environment, so a variable's value holding the reference's text is never taken for it."""
_PRINCIPAL_NAME = PRINCIPAL_REFERENCE[2:-1]


def read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; `ConfigError` naming the file when it is missing, unreadable or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (create one, or pass --config PATH)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


Unset = Callable[[str, tuple[str, ...]], str]
"""Told of a variable that is not set (its name, where it was met); returns what to read instead."""


def interpolate(
    value: Any, where: tuple[str, ...], label: str, environ: Mapping[str, str], unset: Unset | None = None
) -> Any:
    """`value` with `${VAR}`, `${VAR:-default}` and `$${` replaced in every string it holds. A variable
    that is not set is an error naming it, unless `unset` says what to read instead. A variable set to
    its own reference is not set: a client (Gemini CLI) leaves `${VAR}` as written when VAR is unset."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name is None:
                return "${"
            if name == _PRINCIPAL_NAME:
                if default is None and _takes_principal(where):
                    return PRINCIPAL_MARK
                why = "takes no default" if default is not None else "is only taken in headers and env values"
                raise ConfigError(f"{label}: {location(where)}: '{match[0]}' {why}")
            if not ENV_NAME.match(name):
                raise ConfigError(f"{label}: {location(where)}: '{match[0]}' is not a valid variable reference")
            found = environ.get(name)
            if found is not None and unset_reference(name, found):
                found = None
            if default is not None:
                return found or default
            if found is not None:
                return found
            if unset is None:
                raise ConfigError(f"{label}: {location(where)}: environment variable {name} is not set")
            return unset(name, where)

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolate(item, (*where, key), label, environ, unset) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, (*where, str(index)), label, environ, unset) for index, item in enumerate(value)]
    return value


def _takes_principal(where: tuple[str, ...]) -> bool:
    """Whether a value at `where` may name the calling principal: an upstream's (or one of its principals')
    `headers` or `env` value."""
    if len(where) == 4 and where[0] == "upstreams":
        return where[2] in ("headers", "env")
    return len(where) == 6 and where[0] == "upstreams" and where[2] == "principals" and where[4] in ("headers", "env")


class Reading(NamedTuple):
    """The file's data with its variables in place, and what could not be read for want of one."""

    data: dict[str, Any]
    unavailable: dict[str, str]
    """Upstream name -> why it cannot be started: a variable its table takes is not set."""
    token_unset: str | None
    """Why `[gateway.http] token` is left out (its variable is not set): the line `serve --http` stops with."""
    own_variables: frozenset[str]
    """The variables `[gateway.http]` values are taken from (its token's): the gateway's secrets, never
    passed on. The other `[gateway]` keys (paths, durations) hold none."""
    upstream_variables: dict[str, frozenset[str]]
    """Upstream name -> the variables its table takes."""

    def passing(self, upstream: str, names: Sequence[str]) -> Passing:
        """What `upstream` inherits, given its `pass_env` entries (`[gateway]`'s, then its own)."""
        return passing_for(upstream, tuple(names), self.own_variables, self.upstream_variables)


def passing_for(
    upstream: str, names: tuple[str, ...], own: frozenset[str], per_upstream: Mapping[str, frozenset[str]]
) -> Passing:
    """Which variables `upstream` inherits: the gateway's own never, other upstreams' only by exact name;
    the ones every upstream inherits by default (HOME, PATH...) stay so, whoever else refers to them."""
    others = frozenset().union(*(taken for name, taken in per_upstream.items() if name != upstream))
    guarded = others - per_upstream.get(upstream, frozenset())
    return Passing(names, _not_default(own), _not_default(guarded))


def _not_default(names: frozenset[str]) -> frozenset[str]:
    return frozenset(name for name in names if not passed_by_default(name))


def read_variables(
    raw: Mapping[str, Any], label: str, environ: Mapping[str, str], stand_in: str | None = None
) -> Reading:
    """Interpolate the whole file. A variable an `[upstreams.NAME]` table takes that is not set makes
    that upstream unavailable (the rest of its table is still read, the variable as empty, a `TYPED_KEYS`
    key holding it left out); one `[gateway.http] token` takes leaves the token out, for `serve --http`
    alone to refuse; one any other `[gateway]` key takes is an error, unless `stand_in` is given to read
    instead (checking a file's shape without this shell's secrets). Malformed references are errors
    everywhere."""
    gateway, upstreams = raw.get("gateway"), raw.get("upstreams")
    tables = ("gateway", "upstreams")  # read below, when they are tables
    data = interpolate(
        {key: value for key, value in raw.items() if not (key in tables and isinstance(value, dict))},
        (),
        label,
        environ,
    )
    token_unset = None
    if isinstance(gateway, dict):
        http = gateway.get("http")
        token = http.get("token") if isinstance(http, dict) else None
        if isinstance(http, dict) and isinstance(token, str):
            gateway = {**gateway, "http": {key: value for key, value in http.items() if key != "token"}}
        data["gateway"] = interpolate(
            gateway, ("gateway",), label, environ, None if stand_in is None else lambda _name, _where: stand_in
        )
        if isinstance(token, str):
            missing: list[tuple[str, tuple[str, ...]]] = []
            token = interpolate(token, ("gateway", "http", "token"), label, environ, _noting(missing))
            if missing:
                token_unset = (
                    f"{label}: [gateway.http] token: environment variable {missing[0][0]} is not set "
                    "(`serve --http` needs it)"
                )
            else:
                data["gateway"]["http"]["token"] = token
    unavailable: dict[str, str] = {}
    if isinstance(upstreams, dict):
        read = {}
        for name, table in upstreams.items():
            noted: list[tuple[str, tuple[str, ...]]] = []
            read[name] = interpolate(table, ("upstreams", name), label, environ, _noting(noted))
            if noted:
                variable, where = noted[0]
                unavailable[name] = f"environment variable {variable} is not set (in {location(where)})"
                for key in {place[2] for _, place in noted if len(place) > 2 and place[2] in TYPED_KEYS}:
                    del read[name][key]
        data["upstreams"] = read
    taken = (
        {name: frozenset(variables(table)) for name, table in upstreams.items()} if isinstance(upstreams, dict) else {}
    )
    http = raw["gateway"].get("http") if isinstance(raw.get("gateway"), dict) else None  # with its token
    return Reading(data, unavailable, token_unset, frozenset(variables(http)), taken)


def _noting(missing: list[tuple[str, tuple[str, ...]]]) -> Unset:
    """An `Unset` that notes each variable not set, and where, and reads it as empty."""

    def note(name: str, where: tuple[str, ...]) -> str:
        missing.append((name, where))
        return ""

    return note


def variables(raw: Any) -> dict[str, bool]:
    """Every environment variable the raw (uninterpolated) data refers to, and whether each always has a default."""
    found: dict[str, bool] = {}
    if isinstance(raw, str):
        for match in _VARIABLE.finditer(raw):
            if match[1] is not None and ENV_NAME.match(match[1]):
                found[match[1]] = found.get(match[1], True) and match[2] is not None
    elif isinstance(raw, Mapping | list):
        for item in raw.values() if isinstance(raw, Mapping) else raw:
            for name, has_default in variables(item).items():
                found[name] = found.get(name, True) and has_default
    return found


def location(loc: tuple[str | int, ...]) -> str:
    """Render a key path as `[table.sub] key.rest`."""
    parts = [str(part) for part in loc]
    if parts[:1] == ["upstreams"] and len(parts) >= 4 and parts[2] == "principals":
        table, rest = parts[:4], parts[4:]
    elif parts[:1] == ["upstreams"] and len(parts) >= 2:
        table, rest = parts[:2], parts[2:]
    elif parts[:3] == ["gateway", "http", "oauth"]:
        table, rest = parts[:3], parts[3:]
    elif parts[:2] == ["gateway", "http"]:
        table, rest = parts[:2], parts[2:]
    elif parts[:1] == ["gateway"]:
        table, rest = parts[:1], parts[1:]
    else:
        table, rest = [], parts
    head = f"[{'.'.join(table)}]" if table else "top level"
    return f"{head} {'.'.join(rest)}" if rest else head


def placement(directory: Path, command: str, cwd: str | Path | None) -> tuple[str, Path]:
    """Where a command upstream's command and working directory are: relative to the config's directory
    (a command only when it has a directory part), which is also the working directory when unset."""
    if os.sep in command and not Path(command).is_absolute():
        command = str(directory / command)
    return command, directory / cwd if cwd is not None else directory


def log_directory(state_dir: Path) -> Path:
    """Where the upstreams' stderr logs are."""
    return state_dir / "logs"


def log_file(state_dir: Path, upstream: str) -> Path:
    """Where an upstream's stderr goes."""
    return log_directory(state_dir) / f"{upstream}.log"


class EarlyStart(NamedTuple):
    """A command upstream as the file declares it, read without validating the rest of the file."""

    name: str
    command: str
    args: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    passing: Passing


def early_starts(path: Path, environ: Mapping[str, str], *, serving_http: bool = False) -> list[EarlyStart]:
    """The enabled command upstreams of the file at `path` that are not unavailable, where each runs and
    logs and what it inherits; those whose table does not have the shape a valid one has are left out
    (the full reading reports them). None when `serving_http` and the HTTP token's variable is not set, or
    the token is too short: that serving is refused, and no upstream should run (or get its credentials)
    for it."""
    reading = read_variables(read_toml(path), str(path), environ)
    gateway = reading.data.get("gateway", {})
    if serving_http and (reading.token_unset is not None or not _token_fits(gateway)):
        return []
    directory = path.resolve().parent
    state = gateway.get("state", DEFAULT_STATE) if isinstance(gateway, dict) else None
    shared = gateway.get("pass_env", []) if isinstance(gateway, dict) else []
    upstreams = reading.data.get("upstreams", {})
    if not isinstance(state, str) or not isinstance(upstreams, dict) or not _strings(shared):
        return []
    starts = []
    for name, table in upstreams.items():
        if not (UPSTREAM_NAME.match(name) and isinstance(table, dict) and table.get("enabled", True) is True):
            continue
        command, args, env, cwd = table.get("command"), table.get("args", []), table.get("env", {}), table.get("cwd")
        own = table.get("pass_env", [])
        if not (
            name not in reading.unavailable
            and isinstance(command, str)
            and command
            and "url" not in table
            and "principals" not in table  # served per principal: started on each principal's first call
            and _strings(args)
            and isinstance(env, dict)
            and _strings(list(env.values()))
            and not any(PRINCIPAL_MARK in value for value in env.values())
            and isinstance(cwd, str | None)
            and _strings(own)
        ):
            continue
        command, where = placement(directory, command, cwd)
        log = log_file(directory / state, name)
        starts.append(EarlyStart(name, command, args, env, where, log, reading.passing(name, (*shared, *own))))
    return starts


def _token_fits(gateway: object) -> bool:
    """Whether `[gateway.http] token`, when given, is long enough to be served with (`MIN_TOKEN_LENGTH`)."""
    http = gateway.get("http") if isinstance(gateway, dict) else None
    token = http.get("token") if isinstance(http, dict) else None
    return token is None or (isinstance(token, str) and len(token) >= MIN_TOKEN_LENGTH)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
