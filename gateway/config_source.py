"""`upstreams.toml` as written, before it is validated: the TOML, `${VAR}` interpolation, and where a
command upstream runs.

gateway.config builds its typed models on top of this. `mcp-armor serve` also reads the file here
alone, to start its command upstreams while the rest of the gateway (pydantic, MCP) loads; which is
why nothing here imports more than the standard library. A process started from this early reading
is only used if the validated config asks for exactly the same start (gateway.children).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from gateway.errors import ConfigError

DEFAULT_CONFIG = "upstreams.toml"
"""The config `mcp-armor` reads unless given `--config`."""
DEFAULT_STATE = ".mcp-armor"
"""`[gateway] state` unless set: the gateway's own files, relative to the config's directory."""
UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VARIABLE = re.compile(r"\$\$\{|\$\{([^}]*?)(?::-([^}]*))?\}")


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


def interpolate(value: Any, where: tuple[str, ...], label: str, environ: Mapping[str, str]) -> Any:
    """`value` with `${VAR}`, `${VAR:-default}` and `$${` replaced in every string it holds."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name is None:
                return "${"
            if not ENV_NAME.match(name):
                raise ConfigError(f"{label}: {location(where)}: '{match[0]}' is not a valid variable reference")
            if default is not None:
                return environ.get(name) or default
            if name not in environ:
                raise ConfigError(f"{label}: {location(where)}: environment variable {name} is not set")
            return environ[name]

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolate(item, (*where, key), label, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, (*where, str(index)), label, environ) for index, item in enumerate(value)]
    return value


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
    if parts[:1] == ["upstreams"] and len(parts) >= 2:
        table, rest = parts[:2], parts[2:]
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


def early_starts(path: Path, environ: Mapping[str, str]) -> list[EarlyStart]:
    """The enabled command upstreams of the file at `path`, where each runs and logs; those whose
    table does not have the shape a valid one has are left out (the full reading reports them)."""
    data = interpolate(read_toml(path), (), str(path), environ)
    directory = path.resolve().parent
    gateway = data.get("gateway", {})
    state = gateway.get("state", DEFAULT_STATE) if isinstance(gateway, dict) else None
    upstreams = data.get("upstreams", {})
    if not isinstance(state, str) or not isinstance(upstreams, dict):
        return []
    starts = []
    for name, table in upstreams.items():
        if not (UPSTREAM_NAME.match(name) and isinstance(table, dict) and table.get("enabled", True) is True):
            continue
        command, args, env, cwd = table.get("command"), table.get("args", []), table.get("env", {}), table.get("cwd")
        if not (
            isinstance(command, str)
            and command
            and "url" not in table
            and _strings(args)
            and isinstance(env, dict)
            and _strings(list(env.values()))
            and isinstance(cwd, str | None)
        ):
            continue
        command, where = placement(directory, command, cwd)
        starts.append(EarlyStart(name, command, args, env, where, log_file(directory / state, name)))
    return starts


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
