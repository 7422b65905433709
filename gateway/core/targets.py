"""Resources and prompts as targets of the one pipeline, so a read or a get is decided, recorded and
screened like a tool call.

A `resources/read` becomes a `ToolCall` on an `ExposedTool` of kind `resource`, named as the policy
engine knows it, `resource:URI`, with the arguments `{"uri": URI}` (and the decoded values of the
variables of the template it matched), the URI in RFC 3986 normal form (`catalog/uris.py`), so that
what is decided is what the upstream reads; a `prompts/get` becomes one of kind
`prompt`, named `prompt:NAME`, with the prompt's arguments. Their "input schemas" are what the
protocol allows (a URI; string arguments), and their digests are those of the definitions the agent
was shown.

Two more kinds are decided as what they reach: a `resources/subscribe` (kind `subscription`) as a read
of the URI, and a `completion/complete` (kind `completion`) as a get of the prompt, or a read of the
URI the template makes, with the value being completed in the argument's place: whoever may not get or
read that may not have it completed either. Each value the upstream suggests is held to the same test
(`candidate`) before it reaches the agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mcp_types as types

from gateway.catalog.listing import ExposedPrompt, ExposedTool, UpstreamTool
from gateway.catalog.uri_template import UriTemplate
from gateway.catalog.uris import normal_uri
from gateway.policy.rules import PROMPT_PREFIX, RESOURCE_PREFIX
from gateway.schema import compile_checker, compile_schema, digest

RESOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"uri": {"type": "string"}},
    "required": ["uri"],
}
PROMPT_SCHEMA: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}


class _Kind:
    """What every target of one kind shares: its kind, its schema, compiled once."""

    def __init__(self, kind: str, schema: dict[str, Any]) -> None:
        self.kind = kind
        self.schema = schema
        self.validator = compile_schema(schema)
        self.checker = compile_checker(schema)


_RESOURCE = _Kind("resource", RESOURCE_SCHEMA)
_PROMPT = _Kind("prompt", PROMPT_SCHEMA)
_SUBSCRIPTION = _Kind("subscription", RESOURCE_SCHEMA)
_COMPLETION = _Kind("completion", PROMPT_SCHEMA)


def resource_target(upstream: str, uri: str, definition: Mapping[str, Any]) -> ExposedTool:
    """A read of `uri` (in normal form) from `upstream`; `definition` is the listed resource or the
    template it falls under. The upstream is asked for the URI as it listed it, else in normal form."""
    listed = definition.get("uri")
    forwarded = listed if isinstance(listed, str) and normal_uri(listed) == uri else uri
    return _target(_RESOURCE, RESOURCE_PREFIX + uri, upstream, forwarded, definition)


def subscription_target(upstream: str, uri: str, definition: Mapping[str, Any]) -> ExposedTool:
    """A subscription to `uri` (in normal form) at `upstream`: decided as a read of it."""
    read = resource_target(upstream, uri, definition)
    return _target(_SUBSCRIPTION, read.name, upstream, read.upstream_name, definition)


def prompt_completion(
    prompt: ExposedPrompt, argument: str, values: Mapping[str, str]
) -> tuple[ExposedTool, dict[str, str]]:
    """Completing `argument` of `prompt` (`values`: the context's arguments and the value typed so far):
    the target, decided as a get of the prompt with these arguments, and those arguments."""
    definition = {
        "ref": {"type": "ref/prompt", "name": prompt.upstream_name},
        "argument": argument,
        "prompt": prompt.model.model_dump(by_alias=True, mode="json", exclude_none=True),
    }
    return _target(_COMPLETION, PROMPT_PREFIX + prompt.name, prompt.upstream, prompt.upstream_name, definition), dict(
        values
    )


def template_completion(
    upstream: str, template: UriTemplate, definition: Mapping[str, Any], argument: str, values: Mapping[str, str]
) -> tuple[ExposedTool, dict[str, str]]:
    """Completing `argument` of a resource template: the target, decided as a read of the URI the template
    makes of `values` (the context's arguments and the value typed so far), and its arguments."""
    uri = normal_uri(template.expand(values))
    described = {
        "ref": {"type": "ref/resource", "uri": template.template},
        "argument": argument,
        "template": dict(definition),
    }
    target = _target(_COMPLETION, RESOURCE_PREFIX + uri, upstream, template.template, described)
    return target, {**values, "uri": uri}


def completion_params(call_arguments: Mapping[str, Any], definition: Mapping[str, Any]) -> dict[str, Any]:
    """The `completion/complete` request the upstream receives, made of what was decided: the argument
    being completed and its value, and the others as its context."""
    argument = str(definition["argument"])
    context = {name: value for name, value in call_arguments.items() if name not in (argument, "uri")}
    params: dict[str, Any] = {
        "ref": dict(definition["ref"]),
        "argument": {"name": argument, "value": call_arguments.get(argument, "")},
    }
    if context:
        params["context"] = {"arguments": context}
    return params


def candidate(target: ExposedTool, arguments: Mapping[str, Any], value: str) -> tuple[str, dict[str, Any]]:
    """What a value the upstream suggests for a completion would reach (the policy's name and arguments):
    the prompt got, or the resource read, with that value in the argument's place."""
    definition = target.source.definition
    argument = str(definition["argument"])
    values = {name: item for name, item in arguments.items() if name != "uri"}
    values[argument] = value
    if definition["ref"]["type"] == "ref/prompt":
        return target.name, values
    uri = normal_uri(UriTemplate.parse(str(definition["ref"]["uri"])).expand(values))
    return RESOURCE_PREFIX + uri, {**values, "uri": uri}


def prompt_target(prompt: ExposedPrompt) -> ExposedTool:
    definition = prompt.model.model_dump(by_alias=True, mode="json", exclude_none=True)
    return _target(_PROMPT, PROMPT_PREFIX + prompt.name, prompt.upstream, prompt.upstream_name, definition)


def _target(kind: _Kind, name: str, upstream: str, upstream_name: str, definition: Mapping[str, Any]) -> ExposedTool:
    source = UpstreamTool(upstream, upstream_name, definition, kind.validator, digest(definition), kind.checker)
    model = types.Tool.model_construct(name=name, input_schema=kind.schema)
    return ExposedTool(name, source, model, kind.kind)
