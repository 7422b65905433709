"""`policies/*.toml` read, checked and compiled into a `PolicySet`; every check happens here, at load.

Every file in the directory is loaded (their order does not matter for the decision; rewrites apply
in file-name order). A fault anywhere raises `PolicyError` with one line naming the file, the rule id
and the key, and nothing of the new set is used: a reload replaces the old set only as a whole.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT202012

from gateway.calls import Effect
from gateway.config.models import Config, parse_duration
from gateway.errors import PolicyError, UncheckableSchema
from gateway.policy.engine import PolicyEngine, PolicySet
from gateway.policy.paths import PathArguments, PathDeclaration, PathsSpec, check_conflicts, declare_paths
from gateway.policy.redact import parse_mask_path
from gateway.policy.rules import PROMPT_PREFIX, RESOURCE_PREFIX, UPSTREAM_PREFIXES, Rate, RedactPattern, Rule, tool_glob
from gateway.schema import (
    FORMATS,
    Matcher,
    check_schema,
    compile_checker,
    compile_schema,
    describe_violation,
    pattern_problem,
    schema_keywords,
    schema_patterns,
)

RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day|[0-9][0-9.]*\s*(?:ms|s|m|h))\s*$")
_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleSpec(_Model):
    """One `[[rule]]` as written."""

    id: StrictStr
    tools: tuple[StrictStr, ...] = ()
    resources: tuple[StrictStr, ...] = ()
    """Resource URI globs (`resources/read`)."""
    prompts: tuple[StrictStr, ...] = ()
    """Exposed prompt name globs (`prompts/get`)."""
    sampling: tuple[StrictStr, ...] = ()
    """Upstream name globs: their `sampling/createMessage` requests to the agent's client."""
    elicitation: tuple[StrictStr, ...] = ()
    """Upstream name globs: their `elicitation/create` requests to the agent's client."""
    effect: Literal["allow", "deny", "ask", "rewrite"] | None = None
    clients: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    """Globs over the client's self-description (its name): not identity."""
    principals: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    """Globs over the authenticated principal's name."""
    attributes: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    """Globs over the principal's attributes (`scope:NAME`, `group:NAME`, `role:NAME`); any one matching."""
    when: dict[str, Any] | None = None
    reason: StrictStr = ""
    mode: Literal["enforce", "monitor"] = "enforce"
    rate: StrictStr | None = None
    set: dict[str, Any] | None = None
    on: Literal["call", "result"] = "call"
    redact: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    mask: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    """Argument paths whose values the audit log stores masked (`"connection.password"`, `"items.*.token"`)."""


class Defaults(_Model):
    effect: Literal["allow", "deny", "ask"] = "deny"


@dataclass(frozen=True, slots=True)
class _Source:
    name: str
    data: bytes


def load_policies(directory: Path) -> PolicySet:
    """Read and compile every `*.toml` in `directory`; raise `PolicyError` with one line on any fault."""
    if not directory.is_dir():
        raise PolicyError(
            f"{directory}: policies directory not found (create it and put policy files in it, "
            "or point [gateway] policies elsewhere)"
        )
    files = sorted(directory.glob("*.toml"))
    sources: list[_Source] = []
    rules: list[Rule] = []
    seen: dict[str, str] = {}
    default: tuple[Effect, str] | None = None
    loader = _SchemaLoader(directory)
    paths: list[PathDeclaration] = []
    labels: dict[str, str] = {}
    for path in files:
        label = str(path)
        data = _read(path, label)
        sources.append(_Source(path.name, data))
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{label}: not UTF-8 text: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{label}: not valid TOML: {exc}") from None
        for key in raw:
            if key not in ("rule", "defaults", "paths"):
                raise PolicyError(
                    f"{label}: {key}: unknown key (a policy file holds [[rule]], [[paths]] and [defaults])"
                )
        if "paths" in raw:
            paths.extend(_compile_paths(raw["paths"], path.name, label))
            labels[path.name] = label
        if "defaults" in raw:
            try:
                effect = Effect(Defaults.model_validate(raw["defaults"]).effect)
            except ValidationError as exc:
                raise PolicyError(f"{label}: [defaults] {_describe(exc)}") from None
            if default is not None and default[1] != path.name:
                raise PolicyError(f"{label}: [defaults] already set in {default[1]}; set it in one file only")
            default = (effect, path.name)
        raw_rules = raw.get("rule", [])
        if not isinstance(raw_rules, list) or not all(isinstance(item, dict) for item in raw_rules):
            raise PolicyError(f"{label}: rule: must be an array of tables ([[rule]])")
        for position, raw_rule in enumerate(raw_rules, 1):
            rule = _compile_rule(raw_rule, position, path.name, label, loader)
            if rule.id in seen:
                raise PolicyError(f"{label}: rule '{rule.id}': id: duplicate (first defined in {seen[rule.id]})")
            seen[rule.id] = path.name
            rules.append(rule)
    check_conflicts(paths, labels)
    revision = hashlib.sha256()
    for source in sorted([*sources, *loader.sources], key=lambda source: source.name):
        revision.update(source.name.encode() + b"\0" + hashlib.sha256(source.data).digest())
    return PolicySet(
        rules=tuple(rules),
        default=default[0] if default is not None else Effect.DENY,
        revision=revision.hexdigest()[:16],
        files=tuple(source.name for source in sources),
        paths=PathArguments(tuple(paths)),
    )


def load_engine(config: Config) -> PolicyEngine:
    """The policy engine for a configuration: its policy directory, compiled, in its mode."""
    return PolicyEngine(load_policies(config.policy_dir), monitor_mode=config.gateway.mode == "monitor")


def parse_rate(text: str) -> Rate:
    """`"30/minute"`, `"5/second"`, `"100/hour"`, `"1000/day"` or `"10/30s"` -> `Rate`."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f'expected a rate such as "30/minute" or "10/30s", got {text!r}')
    limit = int(match[1])
    unit = match[2]
    period = _PERIODS[unit] if unit in _PERIODS else parse_duration(unit.replace(" ", ""))
    if limit < 1:
        raise ValueError(f"the limit must be at least 1, got {text!r}")
    per = unit if unit in _PERIODS else unit.replace(" ", "")
    return Rate(limit, period, f"{limit} call{'s' if limit != 1 else ''} per {per}")


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{label}: cannot be read: {exc}") from None


def _compile_paths(raw: Any, source: str, label: str) -> list[PathDeclaration]:
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise PolicyError(f"{label}: paths: must be an array of tables ([[paths]])")
    declarations = []
    for position, table in enumerate(raw, 1):
        where = f"{label}: paths #{position}"
        try:
            spec = PathsSpec.model_validate(table)
        except ValidationError as exc:
            raise PolicyError(f"{where}: {_describe(exc)}") from None
        declarations.append(declare_paths(spec, source, where))
    return declarations


def _compile_rule(raw: dict[str, Any], position: int, source: str, label: str, loader: _SchemaLoader) -> Rule:
    rule_id = raw.get("id")
    where = f"{label}: rule '{rule_id}'" if isinstance(rule_id, str) else f"{label}: rule #{position}"
    try:
        spec = RuleSpec.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"{where}: {_describe(exc)}") from None
    if not RULE_ID.match(spec.id):
        raise PolicyError(f"{where}: id: must match {RULE_ID.pattern}")
    if not (spec.tools or spec.resources or spec.prompts or spec.sampling or spec.elicitation):
        raise PolicyError(f"{where}: tools: required key is missing")  # or resources, or prompts
    for key in ("tools", "resources", "prompts", "sampling", "elicitation", "clients", "principals", "attributes"):
        if any(not glob.strip() for glob in getattr(spec, key) or ()):
            raise PolicyError(f"{where}: {key}: empty glob")
    _check_combination(spec, where)
    rate = None
    if spec.rate is not None:
        try:
            rate = parse_rate(spec.rate)
        except ValueError as exc:
            raise PolicyError(f"{where}: rate: {exc}") from None
    redact: list[RedactPattern] = []
    for index, pattern in enumerate(spec.redact or ()):
        try:
            redact.append(RedactPattern(pattern))
        except ValueError as exc:
            raise PolicyError(f"{where}: redact[{index}]: {exc}") from None
    mask: list[tuple[str, ...]] = []
    for index, text in enumerate(spec.mask or ()):
        try:
            mask.append(parse_mask_path(text))
        except ValueError as exc:
            raise PolicyError(f"{where}: mask[{index}]: {exc}") from None
    when = None
    if spec.when is not None:
        when = loader.compile(spec.when, f"{where}: when")
    if spec.on == "result":
        effect: Effect | None = Effect.DENY if spec.effect == "deny" else None
    else:
        effect = Effect(spec.effect) if spec.effect is not None else None  # None: a rule that only masks
    return Rule(
        id=spec.id,
        source=source,
        tools=spec.tools,
        tools_pattern=subjects_pattern(spec.tools, spec.resources, spec.prompts, spec.sampling, spec.elicitation),
        resources=spec.resources,
        prompts=spec.prompts,
        sampling=spec.sampling,
        elicitation=spec.elicitation,
        effect=effect,
        clients=spec.clients,
        clients_pattern=_globs(spec.clients) if spec.clients is not None else None,
        principals=spec.principals,
        principals_pattern=_globs(spec.principals) if spec.principals is not None else None,
        attributes=spec.attributes,
        attributes_pattern=_globs(spec.attributes) if spec.attributes is not None else None,
        when=when,
        when_schema=spec.when,
        reason=spec.reason,
        monitor=spec.mode == "monitor",
        rate=rate,
        patch=spec.set,
        on_result=spec.on == "result",
        redact=tuple(redact),
        mask=tuple(mask),
    )


def _check_combination(spec: RuleSpec, where: str) -> None:
    """The keys that only make sense together, or never together."""
    if spec.on == "result":
        if (spec.effect == "deny") == (spec.redact is not None):
            raise PolicyError(
                f'{where}: on: a result rule either withholds (effect = "deny") or masks (redact = [...]), '
                "one of the two"
            )
        if spec.effect not in (None, "deny"):
            raise PolicyError(f'{where}: effect: a result rule can only "deny" (or redact)')
        for key in ("rate", "set", "mask"):
            if getattr(spec, key) is not None:
                raise PolicyError(f'{where}: {key}: applies to call rules, not to on = "result" rules')
        return
    if spec.effect == "rewrite" and spec.resources:
        raise PolicyError(f"{where}: resources: a rewrite changes arguments; a resource read's URI is never rewritten")
    if spec.effect == "rewrite" and (spec.sampling or spec.elicitation):
        key = "sampling" if spec.sampling else "elicitation"
        raise PolicyError(f"{where}: {key}: a rewrite changes arguments; an upstream's request is never rewritten")
    if spec.effect is None:
        if spec.mask is not None:
            for key in ("when", "rate", "set", "redact"):
                if getattr(spec, key) is not None:
                    raise PolicyError(f"{where}: {key}: a rule with only 'mask' decides nothing; give it an effect")
            return
        raise PolicyError(f'{where}: effect: required key is missing ("allow", "deny", "ask" or "rewrite")')
    if spec.redact is not None:
        raise PolicyError(f'{where}: redact: applies to on = "result" rules only')
    if spec.effect == "rewrite" and not spec.set:
        raise PolicyError(f"{where}: set: a rewrite rule needs a non-empty 'set' (a JSON merge patch)")
    if spec.effect != "rewrite" and spec.set is not None:
        raise PolicyError(f'{where}: set: applies to effect = "rewrite" rules only')
    if spec.effect == "deny" and spec.rate is not None:
        raise PolicyError(f"{where}: rate: a deny rule refuses every call it matches; a rate limits allowed calls")


def subjects_pattern(
    tools: tuple[str, ...],
    resources: tuple[str, ...] = (),
    prompts: tuple[str, ...] = (),
    sampling: tuple[str, ...] = (),
    elicitation: tuple[str, ...] = (),
) -> re.Pattern[str]:
    """One compiled regex for what a rule names: exposed tool names (which never hold a colon), and the
    names the engine knows the rest by: `resource:URI`, `prompt:NAME`, `sampling:UPSTREAM` and
    `elicitation:UPSTREAM`."""
    parts = [tool_glob(glob) for glob in tools]
    for prefix, globs in (
        (RESOURCE_PREFIX, resources),
        (PROMPT_PREFIX, prompts),
        (UPSTREAM_PREFIXES["sampling/createMessage"], sampling),
        (UPSTREAM_PREFIXES["elicitation/create"], elicitation),
    ):
        parts += [f"{prefix}(?:{fnmatch.translate(glob)})" for glob in globs]
    return re.compile("|".join(parts))


def _globs(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex for a list of fnmatch globs (case-sensitive, like `fnmatchcase`)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


class _SchemaLoader:
    """Compiles `when` schemas; `{"$ref" = "schemas/x.json"}` loads files from the policies directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self.sources: list[_Source] = []
        self._registry: Registry[Any] = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]
        self._resources: list[tuple[str, Any]] = []
        self._loaded: set[str] = set()

    def compile(self, schema: dict[str, Any], where: str) -> Matcher:
        """The per-call check of a `when` schema (jsonschema-rs, every pattern in linear time)."""
        self._load_references(schema, PurePosixPath("."), where)
        try:
            compile_schema(schema, self._registry)
        except SchemaError as exc:
            raise PolicyError(f"{where}: not a valid JSON Schema: {describe_violation(exc)}") from None
        _check_formats(schema, where)
        try:
            return compile_checker(schema, self._resources)
        except UncheckableSchema as exc:
            raise PolicyError(f"{where}: {exc}") from None

    def _load_references(self, schema: Any, base: PurePosixPath, where: str) -> None:
        for ref in _references(schema):
            target = ref.split("#", 1)[0]
            if not target:
                continue
            if "://" in target or target.startswith("/"):
                raise PolicyError(f"{where}: $ref {ref!r}: only files inside the policies directory can be referenced")
            relative = PurePosixPath(*(base / target).parts)
            uri = _normalise(relative)
            if uri is None:
                raise PolicyError(f"{where}: $ref {ref!r}: points outside the policies directory")
            if uri in self._loaded:
                continue
            path = self.directory / uri
            try:
                data = path.read_bytes()
                contents = json.loads(data)
            except FileNotFoundError:
                raise PolicyError(f"{where}: $ref {ref!r}: file {path} not found") from None
            except (OSError, ValueError) as exc:
                raise PolicyError(f"{where}: $ref {ref!r}: {path} is not readable JSON: {exc}") from None
            if not isinstance(contents, dict):
                raise PolicyError(f"{where}: $ref {ref!r}: {path} must hold a JSON object (a schema)")
            try:
                check_schema(contents)
            except SchemaError as exc:
                raise PolicyError(
                    f"{where}: $ref {ref!r}: {path} is not a valid JSON Schema: {describe_violation(exc)}"
                ) from None
            _check_formats(contents, f"{where}: $ref {ref!r}")
            _check_patterns(contents, f"{where}: $ref {ref!r}")
            self._loaded.add(uri)
            self._resources.append((uri, contents))
            self.sources.append(_Source(uri, data))
            resource = Resource.from_contents(contents, default_specification=DRAFT202012)
            self._registry = self._registry.with_resource(uri, resource)
            self._load_references(contents, PurePosixPath(uri).parent, where)


def _refuse_retrieval(uri: str) -> Resource[Any]:
    """Nothing is fetched at decision time: every reference was loaded (and checked) at load."""
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


def _normalise(path: PurePosixPath) -> str | None:
    parts: list[str] = []
    for part in path.parts:
        if part in (".", ""):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts) if parts else None


def _references(schema: Any) -> Iterator[str]:
    for key, value in schema_keywords(schema):
        if key in ("$ref", "$dynamicRef") and isinstance(value, str):
            yield value


def _check_formats(schema: Any, where: str) -> None:
    """A `format` this gateway cannot check would silently match everything: refuse it at load."""
    for key, value in schema_keywords(schema):
        if key == "format" and isinstance(value, str) and value not in FORMATS.checkers:
            supported = ", ".join(sorted(FORMATS.checkers))
            raise PolicyError(f"{where}: format {value!r} cannot be checked by the gateway (supported: {supported})")


def _check_patterns(schema: Any, where: str) -> None:
    """A pattern the gateway cannot run in linear time (a lookaround, a backreference) could stall it on
    a caller's text: refuse it at load."""
    for pattern in schema_patterns(schema):
        if problem := pattern_problem(pattern):
            raise PolicyError(f"{where}: pattern {pattern!r}: {problem}")


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(table)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {str(error['msg']).removeprefix('Value error, ')}"
