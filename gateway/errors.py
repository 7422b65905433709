"""The gateway's error tree.

    GatewayError                  anything the gateway reports on purpose
     ├── ConfigError              a file the user wrote is wrong (names file, table and key)
     │    └── PolicyError          a policy file is wrong (names file, rule id and key)
     ├── ProtocolError            a request the gateway answers with a JSON-RPC error (code, message, data)
     └── UpstreamError            an upstream server could not serve a request (names the upstream)
          ├── UpstreamUnavailable not connected, failed to start, or died
          ├── UpstreamTimeout     no answer within the upstream's timeout
          └── UpstreamFault       answered, but with a JSON-RPC error or a malformed result

Errors become MCP results or JSON-RPC errors where a transport answers a request (`gateway.downstream.stdio`,
`gateway.downstream.http`), and one line on stderr in
`gateway.cli` only. Their messages are written for the person or model reading them: they never carry
a traceback or the text of an unexpected exception.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration file is malformed; the message is one line naming file, table and key."""


class PolicyError(ConfigError):
    """A policy file is malformed; the message is one line naming file, rule id and key."""


class ProtocolError(GatewayError):
    """A request refused with a JSON-RPC error: an unknown tool or prompt, malformed parameters."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def wire(self) -> dict[str, Any]:
        """The `error` member of a JSON-RPC response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class UpstreamError(GatewayError):
    """An upstream server could not serve a request."""

    def __init__(self, upstream: str, message: str) -> None:
        super().__init__(f"upstream '{upstream}' {message}")
        self.upstream = upstream


class UpstreamUnavailable(UpstreamError):
    """The upstream is not connected (still starting, failed to start, or died)."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within its timeout."""

    def __init__(self, upstream: str, seconds: float) -> None:
        super().__init__(upstream, f"did not answer within {format_seconds(seconds)}")
        self.seconds = seconds


class UpstreamFault(UpstreamError):
    """The upstream answered with a JSON-RPC error or a result that breaks the protocol."""


def format_seconds(seconds: float) -> str:
    """Render a duration the way the config file writes them ("500ms", "30s", "2m")."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 120 or seconds % 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"
