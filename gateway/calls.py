"""The flow objects of one tool call: the `ToolCall` going in and the `Outcome` coming out.

Both are frozen; a stage that changes a call passes a modified copy (`dataclasses.replace`). They are
serialised only through their versioned `to_record()`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mcp.shared.dispatcher import ProgressFnT

from gateway.catalog import ExposedTool

RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Who is calling: one downstream MCP connection (see the README for how sessions are told apart)."""

    id: str
    transport: str
    protocol_version: str
    client_name: str = ""
    client_version: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One `tools/call` the agent made, resolved to the upstream tool behind the exposed name."""

    session: SessionInfo
    tool: ExposedTool
    arguments: Mapping[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    received: float = field(default_factory=time.time)
    progress: ProgressFnT | None = field(default=None, compare=False, repr=False)
    """Relays the upstream's progress notifications to the agent; `None` when the agent sent no token."""

    def to_record(self) -> dict[str, Any]:
        return {
            "v": RECORD_VERSION,
            "call_id": self.id,
            "session_id": self.session.id,
            "tool": self.tool.name,
            "upstream": self.tool.upstream,
            "upstream_tool": self.tool.upstream_name,
            "tool_digest": self.tool.source.digest,
            "arguments": dict(self.arguments),
            "received": self.received,
        }


class OutcomeKind(StrEnum):
    OK = "ok"
    ERROR = "error"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a call ended, and the `CallToolResult` (wire form) the agent receives."""

    kind: OutcomeKind
    result: Mapping[str, Any]
    reason: str = ""

    @classmethod
    def completed(cls, result: Mapping[str, Any]) -> Outcome:
        """The upstream answered; its own `isError` decides between ok and error."""
        return cls(OutcomeKind.ERROR if result.get("isError") else OutcomeKind.OK, result)

    @classmethod
    def refused(cls, call: ToolCall, reason: str) -> Outcome:
        """The gateway refused the call; the text lets the model see why and correct itself."""
        text = f"Refused by the mcp-armor gateway: {reason} (call {call.id})"
        return cls(OutcomeKind.REFUSED, _error_result(text), reason)

    @classmethod
    def failed(cls, call: ToolCall, kind: OutcomeKind, reason: str) -> Outcome:
        """The call was forwarded (or meant to be) but did not complete."""
        text = f"The mcp-armor gateway could not complete the call to '{call.tool.name}': {reason} (call {call.id})"
        return cls(kind, _error_result(text), reason)

    def to_record(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, "outcome": self.kind.value, "reason": self.reason}


def _error_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}
