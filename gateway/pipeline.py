"""The stages a tool call passes through, composed once at start-up.

A stage is `async (call, call_next) -> Outcome`; stages are listed outermost first and end in a
terminal handler that forwards the call upstream. Today's path:

    check_arguments (the upstream tool's own inputSchema) -> forward

The policy engine and the audit recorder plug in as further stages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import mcp_types as types
from jsonschema.exceptions import ValidationError as SchemaViolation
from jsonschema.exceptions import best_match
from pydantic import ValidationError

from gateway.calls import Outcome, OutcomeKind, ToolCall
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.upstreams import UpstreamPool

Handler = Callable[[ToolCall], Awaitable[Outcome]]
Stage = Callable[[ToolCall, Handler], Awaitable[Outcome]]

_MAX_DETAIL = 300


def compose(stages: Sequence[Stage], terminal: Handler) -> Handler:
    """Wrap `terminal` in `stages`, the first stage outermost."""
    handler = terminal
    for stage in reversed(stages):
        handler = _bind(stage, handler)
    return handler


def _bind(stage: Stage, call_next: Handler) -> Handler:
    async def handle(call: ToolCall) -> Outcome:
        return await stage(call, call_next)

    return handle


async def check_arguments(call: ToolCall, call_next: Handler) -> Outcome:
    """Refuse arguments that the upstream tool's own inputSchema rejects; they never reach it."""
    error = best_match(call.tool.source.validator.iter_errors(call.arguments))
    if error is not None:
        return Outcome.refused(call, f"arguments do not match the tool's input schema: {describe_violation(error)}")
    return await call_next(call)


def describe_violation(error: SchemaViolation) -> str:
    """One line naming where in the arguments the schema was violated, and how."""
    where = "/".join(str(part) for part in error.absolute_path)
    message = error.message if len(error.message) <= _MAX_DETAIL else error.message[:_MAX_DETAIL] + "..."
    return f"at '{where}': {message}" if where else message


class Forward:
    """The terminal handler: send the call to its upstream and shape whatever comes back."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    async def __call__(self, call: ToolCall) -> Outcome:
        params = {"name": call.tool.upstream_name, "arguments": dict(call.arguments)}
        try:
            session = self._pool.get(call.tool.upstream).require_session()
            raw = await session.request("tools/call", params, on_progress=call.progress)
        except UpstreamTimeout as exc:
            return Outcome.failed(call, OutcomeKind.TIMEOUT, str(exc))
        except UpstreamError as exc:
            return Outcome.failed(call, OutcomeKind.ERROR, str(exc))
        try:
            types.CallToolResult.model_validate(raw, by_name=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            reason = f"upstream '{call.tool.upstream}' returned a malformed result ({where}: {first['msg']})"
            return Outcome.failed(call, OutcomeKind.ERROR, reason)
        return Outcome.completed(raw)


def build_pipeline(pool: UpstreamPool) -> Handler:
    return compose([check_arguments], Forward(pool))
