"""Resources and prompts as targets of the one pipeline, so a read or a get is decided, recorded and
screened like a tool call.

A `resources/read` becomes a `ToolCall` on an `ExposedTool` of kind `resource`, named as the policy
engine knows it, `resource:URI`, with the arguments `{"uri": URI}` (and the decoded values of the
variables of the template it matched), the URI in RFC 3986 normal form (`catalog/uris.py`), so that
what is decided is what the upstream reads; a `prompts/get` becomes one of kind
`prompt`, named `prompt:NAME`, with the prompt's arguments. Their "input schemas" are what the
protocol allows (a URI; string arguments), and their digests are those of the definitions the agent
was shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mcp_types as types

from gateway.catalog.listing import ExposedPrompt, ExposedTool, UpstreamTool
from gateway.catalog.uris import normal_uri
from gateway.policy.rules import PROMPT_PREFIX, RESOURCE_PREFIX
from gateway.schema import compile_fast, compile_schema, digest

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
        self.fast = compile_fast(schema)


_RESOURCE = _Kind("resource", RESOURCE_SCHEMA)
_PROMPT = _Kind("prompt", PROMPT_SCHEMA)


def resource_target(upstream: str, uri: str, definition: Mapping[str, Any]) -> ExposedTool:
    """A read of `uri` (in normal form) from `upstream`; `definition` is the listed resource or the
    template it falls under. The upstream is asked for the URI as it listed it, else in normal form."""
    listed = definition.get("uri")
    forwarded = listed if isinstance(listed, str) and normal_uri(listed) == uri else uri
    return _target(_RESOURCE, RESOURCE_PREFIX + uri, upstream, forwarded, definition)


def prompt_target(prompt: ExposedPrompt) -> ExposedTool:
    definition = prompt.model.model_dump(by_alias=True, mode="json", exclude_none=True)
    return _target(_PROMPT, PROMPT_PREFIX + prompt.name, prompt.upstream, prompt.upstream_name, definition)


def _target(kind: _Kind, name: str, upstream: str, upstream_name: str, definition: Mapping[str, Any]) -> ExposedTool:
    source = UpstreamTool(upstream, upstream_name, definition, kind.validator, digest(definition), kind.fast)
    model = types.Tool.model_construct(name=name, input_schema=kind.schema)
    return ExposedTool(name, source, model, kind.kind)
