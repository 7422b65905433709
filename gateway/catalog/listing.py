"""What the agent sees: the tools, prompts and resources of every upstream, named, checked and merged.

An upstream's raw listings are normalised into an `UpstreamListing` (one sloppy definition is
repaired or dropped with a note; it never breaks the listing for everyone), then all listings are
merged into an immutable `Catalog` snapshot. Exposed tool and prompt names are
`<upstream><separator><name>` (`<prefix><separator><name>` for an upstream given a prefix, the bare
name for one given `prefix = ""`: `Naming`), kept within `^[A-Za-z0-9_.-]{1,64}$` by a deterministic shortening.
Two definitions that would be exposed under the same name (ignoring case) are both withheld, never
first-wins. Each tool's input schema is checked and compiled here, once.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mcp_types as types
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.protocols import Validator
from pydantic import ValidationError

from gateway.catalog.uri_template import UriTemplate
from gateway.catalog.uris import normal_uri
from gateway.config.models import Config
from gateway.errors import InvalidUriTemplate, UncheckableSchema
from gateway.schema import (
    Mask,
    Matcher,
    compile_checker,
    compile_schema,
    describe_violation,
    digest,
    holds_more_than,
    instance_place,
    json_message,
)

logger = logging.getLogger(__name__)

EXPOSED_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NAME_LIMIT = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def exposed_name(upstream: str, name: str, separator: str) -> str:
    """`<upstream><separator><name>`, made safe and short enough, deterministically.

    A name that is already safe and fits is kept as is. Otherwise unsafe characters become `_`,
    and a name still too long is cut and given an 8-hex-digit hash of the full name, so two long
    names that share a prefix still differ.
    """
    full = f"{upstream}{separator}{name}"
    if EXPOSED_NAME.match(full):
        return full
    cleaned = _UNSAFE.sub("_", full)
    suffix = "-" + hashlib.sha256(full.encode()).hexdigest()[:8]
    return cleaned[: _NAME_LIMIT - len(suffix)] + suffix


@dataclass(frozen=True, slots=True)
class Naming:
    """How each upstream's tool and prompt names are exposed: under its prefix (its name unless
    `prefixes` says otherwise) and the separator, or as they are for an empty prefix."""

    separator: str = "__"
    prefixes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Config) -> Naming:
        return cls(config.gateway.separator, config.prefixes)

    def written(self, upstream: str, name: str) -> str:
        """The exposed name before it is made safe and short (`exposed`)."""
        prefix = self.prefixes.get(upstream, upstream)
        return f"{prefix}{self.separator}{name}" if prefix else name

    def exposed(self, upstream: str, name: str) -> str:
        prefix = self.prefixes.get(upstream, upstream)
        return exposed_name(prefix, name, self.separator if prefix else "")


def naming(value: Naming | str) -> Naming:
    """A `Naming`; a bare separator names every upstream's items under its own name."""
    return value if isinstance(value, Naming) else Naming(value)


WORDED_AT_MOST = 10_000
"""Values (objects, arrays, their members) in a call whose refusal is worded in full by Python's jsonschema;
a larger call's refusal names the place and the keyword the per-call check found (bounded time)."""


@dataclass(frozen=True, slots=True)
class UpstreamTool:
    """One upstream tool, normalised, with its input schema compiled."""

    upstream: str
    name: str
    definition: Mapping[str, Any]
    validator: Validator = field(compare=False, repr=False)
    digest: str = ""
    matcher: Matcher | None = field(default=None, compare=False, repr=False)
    """The per-call check of the input schema (`compile_checker`); the validator says why it failed.
    `None` for a schema the gateway cannot check in linear time: the tool is listed, every call refused."""
    uncheckable: str = field(default="", compare=False)
    """Why there is no `matcher`."""

    def violation(self, arguments: Mapping[str, Any], mask: Mask | None = None) -> str | None:
        """One line saying how `arguments` break this tool's input schema (the values it quotes masked by
        `mask`); `None` when they don't."""
        if self.matcher is None:
            return f"{self.uncheckable}; every call of this tool is refused"
        try:
            if self.matcher.is_valid(arguments):
                return None
        except (ValueError, RecursionError) as exc:  # not JSON (a non-string key), or nested past reason
            return f"the arguments cannot be checked ({type(exc).__name__})"
        if holds_more_than(arguments, WORDED_AT_MOST):
            return self._briefly(arguments, mask)
        error = best_match(self.validator.iter_errors(arguments))
        return "the schema refuses them" if error is None else describe_violation(error, mask)

    def _briefly(self, arguments: Mapping[str, Any], mask: Mask | None) -> str:
        """A large call's refusal, from the per-call check's first error alone: where, and which keyword
        (no value quoted). Wording it as for a small call walks the whole call in Python, seconds per MB."""
        found = self.matcher.first_error(arguments) if self.matcher is not None else None
        if found is None:
            return "the schema refuses them"
        path, keyword = found
        where = instance_place(path, mask)
        what = f"the value does not satisfy {keyword}" if keyword else "the value is refused"
        return f"at '{where}': {what}" if where else what


@dataclass(frozen=True, slots=True)
class ExposedTool:
    """A tool as the agent sees it: the exposed name and the upstream tool behind it."""

    name: str
    source: UpstreamTool
    model: types.Tool = field(compare=False, repr=False)
    kind: str = "tool"
    """What the pipeline forwards: a `tool` call, a `resource` read or a `prompt` get (see `core/targets.py`)."""

    @property
    def upstream(self) -> str:
        return self.source.upstream

    @property
    def upstream_name(self) -> str:
        return self.source.name


@dataclass(frozen=True, slots=True)
class UpstreamListing:
    """Everything one upstream offers, normalised; `problems` says what had to be repaired or dropped."""

    upstream: str
    tools: tuple[UpstreamTool, ...] = ()
    prompts: tuple[types.Prompt, ...] = ()
    resources: tuple[types.Resource, ...] = ()
    templates: tuple[types.ResourceTemplate, ...] = ()
    problems: tuple[str, ...] = ()
    server: Mapping[str, Any] = field(default_factory=dict)
    """The server's `name`, `version` and `instructions` from its `initialize` answer."""


def normalise_listing(
    upstream: str,
    tools: Iterable[Any] = (),
    prompts: Iterable[Any] = (),
    resources: Iterable[Any] = (),
    templates: Iterable[Any] = (),
    server: Mapping[str, Any] | None = None,
) -> UpstreamListing:
    """Turn an upstream's raw (wire-form) listings into checked definitions."""
    problems: list[str] = []
    checked_tools = []
    for raw in tools:
        tool = _normalise_tool(upstream, raw, problems)
        if tool is not None:
            checked_tools.append(tool)
    return UpstreamListing(
        upstream=upstream,
        tools=tuple(checked_tools),
        prompts=tuple(_validated(types.Prompt, "prompt", prompts, problems)),
        resources=tuple(_validated(types.Resource, "resource", resources, problems)),
        templates=tuple(_validated(types.ResourceTemplate, "resource template", templates, problems)),
        problems=tuple(problems),
        server=dict(server or {}),
    )


def _label(raw: Any) -> str:
    if isinstance(raw, dict):
        for key in ("name", "uri", "uriTemplate"):
            if isinstance(raw.get(key), str):
                return repr(raw[key])
    return "(unnamed)"


def _normalise_tool(upstream: str, raw: Any, problems: list[str]) -> UpstreamTool | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        problems.append(f"tool {_label(raw)} dropped: a tool must be an object with a non-empty string 'name'")
        return None
    name: str = raw["name"]
    definition = dict(raw)
    schema = definition.get("inputSchema")
    if not isinstance(schema, dict):
        schema = {}
    schema = dict(schema)
    if schema.get("type", "object") != "object":
        problems.append(f"tool '{name}' dropped: inputSchema must describe an object, not {schema['type']!r}")
        return None
    schema["type"] = "object"
    try:
        validator = compile_schema(schema)
    except SchemaError as exc:
        problems.append(f"tool '{name}' dropped: inputSchema is not a valid JSON Schema: {json_message(exc)}")
        return None
    definition["inputSchema"] = schema
    output = definition.get("outputSchema")
    if output is not None:
        try:
            if not isinstance(output, dict) or output.get("type") != "object":
                raise SchemaError("outputSchema must describe an object")
            compile_schema(output)
        except SchemaError as exc:
            problems.append(f"tool '{name}': outputSchema removed: {json_message(exc)}")
            del definition["outputSchema"]
    try:
        types.Tool.model_validate(definition, by_name=False)
    except ValidationError as exc:
        problems.append(f"tool '{name}' dropped: {_first_error(exc)}")
        return None
    try:
        matcher: Matcher | None = compile_checker(schema)
        uncheckable = ""
    except UncheckableSchema as exc:
        matcher, uncheckable = None, f"inputSchema cannot be checked by the gateway: {exc}"
        problems.append(f"tool '{name}': {uncheckable}; every call of it is refused")
    return UpstreamTool(upstream, name, definition, validator, digest(definition), matcher, uncheckable)


def _validated(model: Any, kind: str, raws: Iterable[Any], problems: list[str]) -> list[Any]:
    out = []
    for raw in raws:
        try:
            out.append(model.model_validate(raw, by_name=False))
        except ValidationError as exc:
            problems.append(f"{kind} {_label(raw)} dropped: {_first_error(exc)}")
    return out


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


@dataclass(frozen=True, slots=True)
class ExposedPrompt:
    name: str
    upstream: str
    upstream_name: str
    model: types.Prompt


@dataclass(frozen=True)
class Catalog:
    """An immutable snapshot of everything exposed; rebuilt whenever an upstream's listing changes."""

    tools: Mapping[str, ExposedTool] = field(default_factory=dict)
    prompts: Mapping[str, ExposedPrompt] = field(default_factory=dict)
    resources: Mapping[str, tuple[str, types.Resource]] = field(default_factory=dict)
    templates: tuple[tuple[str, UriTemplate, types.ResourceTemplate], ...] = ()
    problems: tuple[str, ...] = ()

    @classmethod
    def build(cls, listings: Sequence[UpstreamListing], names: Naming | str) -> Catalog:
        problems: list[str] = []
        names = naming(names)
        tool_candidates = [
            (names.exposed(tool.upstream, tool.name), tool) for listing in listings for tool in listing.tools
        ]
        tools: dict[str, ExposedTool] = {}
        for name, tool in _without_collisions(tool_candidates, "tool", problems):
            model = types.Tool.model_validate({**tool.definition, "name": name}, by_name=False)
            tools[name] = ExposedTool(name, tool, model)

        prompt_candidates = [
            (names.exposed(listing.upstream, prompt.name), (listing.upstream, prompt))
            for listing in listings
            for prompt in listing.prompts
        ]
        prompts = {
            name: ExposedPrompt(name, upstream, prompt.name, prompt.model_copy(update={"name": name}))
            for name, (upstream, prompt) in _without_collisions(prompt_candidates, "prompt", problems)
        }

        resource_candidates = [
            (resource.uri, (listing.upstream, resource)) for listing in listings for resource in listing.resources
        ]
        resources = dict(_without_collisions(resource_candidates, "resource", problems, fold_case=False))

        templates = []
        for listing in listings:
            for template in listing.templates:
                try:
                    templates.append((listing.upstream, UriTemplate.parse(template.uri_template), template))
                except InvalidUriTemplate as exc:
                    problems.append(f"upstream '{listing.upstream}' resource template dropped: {exc}")
        return cls(tools, prompts, resources, tuple(templates), tuple(problems))

    def resource_upstream(self, uri: str) -> str | None:
        """The upstream that serves `uri`: a listed resource, else the one upstream whose template matches."""
        found = self.resource_source(uri)
        return found[0] if found is not None else None

    def template(self, uri_template: str) -> tuple[str, UriTemplate, types.ResourceTemplate] | None:
        """The one upstream's template spelt `uri_template` (`None`: none, or several upstreams offer it)."""
        found = [entry for entry in self.templates if entry[1].template == uri_template]
        return found[0] if len({upstream for upstream, _, _ in found}) == 1 else None

    def resource_source(
        self, uri: str
    ) -> tuple[str, types.Resource | types.ResourceTemplate, Mapping[str, str]] | None:
        """The upstream that serves `uri` (in normal form, `catalog.uris`), the definition it falls under, and
        the template variables it carries: the listed resource of that URI however it was spelt (no
        variables), else the first matching template of the one upstream whose templates match it."""
        if (entry := self.resources.get(uri)) is not None:
            return (*entry, {})
        listed = [entry for listed_uri, entry in self.resources.items() if normal_uri(listed_uri) == uri]
        if len(listed) == 1:
            return (*listed[0], {})
        owners: dict[str, tuple[types.ResourceTemplate, Mapping[str, str]]] = {}
        for upstream, template, definition in self.templates:
            found = template.variables(uri)
            if found is not None:
                owners.setdefault(upstream, (definition, found))
        if len(owners) != 1:
            return None
        owner, (template_definition, variables) = owners.popitem()
        return owner, template_definition, variables


_T = TypeVar("_T")


def _without_collisions(
    candidates: Sequence[tuple[str, _T]], kind: str, problems: list[str], *, fold_case: bool = True
) -> list[tuple[str, _T]]:
    """Drop every candidate whose key clashes with another's; record one problem per clash."""
    groups: dict[str, list[tuple[str, _T]]] = {}
    for key, value in candidates:
        groups.setdefault(key.casefold() if fold_case else key, []).append((key, value))
    kept = []
    for group in groups.values():
        if len(group) == 1:
            kept.append(group[0])
            continue
        sides = " and ".join(_describe_side(value) for _, value in group)
        message = f"{kind}s {sides} would be exposed as '{group[0][0]}'; none of them is exposed"
        problems.append(message)
    return kept


def _describe_side(value: Any) -> str:
    if isinstance(value, UpstreamTool):
        return f"'{value.upstream}'.'{value.name}'"
    upstream, item = value
    label = getattr(item, "name", None) if not isinstance(item, types.Resource) else item.uri
    return f"'{upstream}'.'{label}'"
