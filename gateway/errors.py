"""The gateway's error tree: every exception class the gateway raises on purpose is defined here.

    GatewayError                  anything the gateway reports on purpose
     ├── ConfigError              a file the user wrote is wrong (names file, table and key)
     │    ├── PolicyError          a policy file is wrong (names file, rule id and key)
     │    └── LockError            `upstreams.lock` cannot be read or does not hold together
     ├── ProtocolError            a request the gateway answers with a JSON-RPC error (code, message, data)
     │    └── RemoteError          the peer of a JSON-RPC channel answered (or is answered) with an error
     ├── UpstreamError            an upstream server could not serve a request (names the upstream)
     │    ├── UpstreamUnavailable not connected, failed to start, or died
     │    ├── UpstreamTimeout     no answer within the upstream's timeout
     │    ├── UpstreamFault       answered, but with a JSON-RPC error or a malformed result
     │    └── NoCredentials       served per principal, and it has no values for this caller
     ├── AuditError               the audit log cannot be opened, written or read
     │    ├── NoLogYet             no audit log at the path (yet)
     │    └── EmptyLog             the file at the path holds no audit log
     ├── PrincipalsError          the principals store cannot be used, or a principal command is wrong
     ├── ApprovalsError           the approval queue cannot be used, or an approval is not there to decide
     ├── StoreError               the shared store (PostgreSQL) cannot be reached, set up or used
     ├── Unauthenticated          a bearer credential of a known kind is refused (expired, revoked, forged)
     ├── Forbidden                a valid credential that may not do this (no console role)
     ├── ClientFileError          an agent client's configuration file cannot be read or edited
     ├── Unsupported              a client's server entry the gateway cannot front as the client ran it
     ├── InvalidUriTemplate       a resource template that is not RFC 6570 (also a ValueError)
     ├── UncheckableSchema        a valid schema not checkable in linear time (also a ValueError)
     └── UnreadableLine           a line off a pipe that is no JSON the gateway takes (also a ValueError)
          ├── NotJson              not UTF-8, not JSON, or nested past what the parser reads
          └── NonFiniteNumber      JSON but for a number JSON cannot carry (NaN, an infinity, 1e999)

    ChannelError (Exception)      a JSON-RPC link failed underneath; never reported as it is
     ├── RequestTimeout           no answer within the request's timeout
     ├── ChannelClosed            the pipe closed before the answer came
     └── ConnectionFailed         the connection failed underneath (a refused or broken HTTP request)

The channel errors stand apart from `GatewayError` on purpose: `gateway.upstream.session` turns each
into an `UpstreamError` naming the upstream, and one that escaped would be an unexpected fault
(logged, its text never sent to a client), not a message for the reader.

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


class LockError(ConfigError):
    """`upstreams.lock` cannot be read or does not hold together; the message is one line."""


class PrincipalsError(GatewayError):
    """The principals store cannot be read or written, or a principal command names what is not there."""


class StoreError(GatewayError):
    """The shared store cannot be reached, set up or used; the message names the store (never its password)."""


class ApprovalsError(GatewayError):
    """The approval queue cannot be read or written, or an approval command names one not there to decide."""


class Unauthenticated(GatewayError):
    """A credential an authenticator recognises as its kind but refuses (expired, revoked, forged, for
    another audience...): the request is answered 401, and the reason is logged, never the credential."""


class Forbidden(GatewayError):
    """A credential that is valid but may not open what it asks for (a principal with no console role):
    answered 403."""


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


class RemoteError(ProtocolError):
    """The peer answered a request with a JSON-RPC error (or, raised by a handler, the error to answer with)."""


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


class NoCredentials(UpstreamError):
    """The upstream runs each principal's calls with that principal's own values, and has none for this
    caller (unauthenticated, or a principal without a table): the call is refused, never run on another's."""


class AuditError(GatewayError):
    """The audit log cannot be opened, written or read."""


class NoLogYet(AuditError):
    """There is no audit log at the path (yet): no file there."""


class EmptyLog(AuditError):
    """The file at the path holds no audit log: emptied, or (for a moment) just created by a gateway."""


class ClientFileError(GatewayError):
    """A client's configuration file that cannot be read or edited; the message is one line."""


class Unsupported(GatewayError):
    """A server entry the gateway cannot front as the client ran it; the message says why."""


class InvalidUriTemplate(GatewayError, ValueError):
    """A template that is not RFC 6570 (the message says where)."""


class UncheckableSchema(GatewayError, ValueError):
    """A valid schema the gateway cannot check in linear time: a pattern that needs backtracking (a
    lookaround or a backreference), or a reference it cannot resolve without fetching it."""


class ChannelError(Exception):
    """A JSON-RPC link failed underneath; the pool reports it as an `UpstreamError` naming the upstream."""


class RequestTimeout(ChannelError):
    """No answer within the request's timeout (a courtesy cancel has been sent)."""


class ChannelClosed(ChannelError):
    """The pipe closed before the answer came."""


class ConnectionFailed(ChannelError):
    """The connection to the peer failed underneath (a refused or broken HTTP request, say)."""


def format_seconds(seconds: float) -> str:
    """Render a duration the way the config file writes them ("500ms", "30s", "2m")."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 120 or seconds % 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"


class UnreadableLine(GatewayError, ValueError):
    """A line read off a pipe (gateway.wire.framing) that is no JSON the gateway takes."""


class NotJson(UnreadableLine):
    """A line that is not a JSON text (not UTF-8, not JSON, or nested past what the parser can read)."""


class NonFiniteNumber(UnreadableLine):
    """A line that is JSON but for a number JSON cannot carry (`NaN`, an infinity, or one past a float's range)."""
