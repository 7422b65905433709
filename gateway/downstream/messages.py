"""What the stdio face reads off a JSON-RPC line before the dispatcher sees it: whether it is a message
at all, which protocol era it speaks (a 2026-07-28 request's `_meta` envelope), the specification's
per-version check of its parameters, the plainest `tools/call` built without the models, and the
JSON-RPC error a failure is answered with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from gateway.core.dispatch import INVALID_PARAMS
from gateway.core.requests import ToolRequest
from gateway.errors import NonFiniteNumber, NotJson, ProtocolError
from gateway.wire.framing import Oversize, loads, loads_lenient
from gateway.wire.peer import RequestId, is_request_id

logger = logging.getLogger(__name__)


_PLAIN_CALL_KEYS = frozenset({"name", "arguments", "_meta"})


def plain_call(params: dict[str, Any] | None) -> ToolRequest | None:
    """A handshake-era `tools/call` in its plainest form (a name, arguments, a progress token), checked
    without the models; `None` for anything else, which the specification's models check. Whatever
    passes here passes them, with the same name and arguments (the tests hold the two to that)."""
    if params is None or not params.keys() <= _PLAIN_CALL_KEYS:
        return None
    name, arguments, meta = params.get("name"), params.get("arguments"), params.get("_meta")
    if type(name) is not str or (arguments is not None and type(arguments) is not dict):
        return None
    if meta is not None and (
        type(meta) is not dict or not meta.keys() <= {"progressToken"} or not is_request_id(meta.get("progressToken"))
    ):
        return None
    return ToolRequest(name, arguments or {})


def checked_plain_call(params: dict[str, Any] | None) -> ToolRequest | None:
    """A `tools/call` that the specification's model has checked already, and that carries nothing but
    a name, arguments and `_meta` (no approval retry, no task): built from its parameters as they are,
    without checking them a second time. (The tests hold it to what the SDK's model builds.)"""
    if params is None or not params.keys() <= _PLAIN_CALL_KEYS:
        return None
    meta = params.get("_meta")
    if isinstance(meta, dict) and "progressToken" in meta and not is_request_id(meta["progressToken"]):
        return None  # the SDK's model is stricter here than some versions' (a null token): it decides
    return ToolRequest(params["name"], params.get("arguments") or {})


def error_reply(exc: Exception, method: str) -> dict[str, Any]:
    """The JSON-RPC error a request's failure is answered with; an unexpected one never shows its text."""
    if isinstance(exc, ProtocolError):
        return exc.wire()
    if isinstance(exc, ValidationError):
        return INVALID_PARAMS.wire()
    logger.error("%s failed inside the gateway", method, exc_info=exc)
    return {"code": types.INTERNAL_ERROR, "message": "Internal server error"}


def envelope(params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A 2026 request's envelope: protocol version, client info, client capabilities."""
    meta = params.get("_meta") if params is not None else None
    if not isinstance(meta, dict):
        raise ProtocolError(
            types.INVALID_PARAMS,
            "params._meta must be an object carrying the required "
            f"{PROTOCOL_VERSION_META_KEY!r} and {CLIENT_CAPABILITIES_META_KEY!r} envelope keys",
        )
    missing = [key for key in (PROTOCOL_VERSION_META_KEY, CLIENT_CAPABILITIES_META_KEY) if key not in meta]
    if missing:
        raise ProtocolError(
            types.INVALID_PARAMS, f"params._meta is missing the required envelope key(s): {', '.join(missing)}"
        )
    version = meta[PROTOCOL_VERSION_META_KEY]
    if not isinstance(version, str):
        raise ProtocolError(types.INVALID_PARAMS, "the protocol-version envelope value must be a string")
    if version not in MODERN_PROTOCOL_VERSIONS:
        raise ProtocolError(types.UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version", unsupported(version))
    return version, _object(meta.get(CLIENT_INFO_META_KEY)), _object(meta[CLIENT_CAPABILITIES_META_KEY])


def unsupported(requested: Any) -> dict[str, Any]:
    """The error data naming the versions served (and the one asked for, when it is a string)."""
    if isinstance(requested, str):
        data = types.UnsupportedProtocolVersionErrorData(supported=list(MODERN_PROTOCOL_VERSIONS), requested=requested)
        return data.model_dump(mode="json")
    return {"supported": list(MODERN_PROTOCOL_VERSIONS)}


def malformed(message: Any) -> str | None:
    """What makes `message` not a JSON-RPC 2.0 message the gateway can act on; `None` when it is one."""
    if not isinstance(message, dict):
        return "a JSON value that is not a message object"
    if message.get("jsonrpc") != "2.0":
        return 'a message without "jsonrpc": "2.0"'
    if "params" in message and not isinstance(message["params"], dict):
        return "a message whose params are not an object"
    method = message.get("method")
    if method is None:
        if not is_request_id(message.get("id")) or not ("result" in message or "error" in message):
            return "a response without a valid id and result or error"
        return None
    if not isinstance(method, str):
        return "a message whose method is not a string"
    if "id" in message and not is_request_id(message["id"]):
        return "a request whose id is not a string or an integer"
    return None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A line that is no message the gateway can act on, and what is done about it: answered with
    `error` (to `id`: the request's own id where it can be read, else null), or when it answered a
    request of the gateway's (`answers`), that request fails; a notification is never answered."""

    why: str
    """What is wrong with it, for the log."""
    error: dict[str, Any] | None
    id: RequestId | None = None
    answers: RequestId | None = None


def read_message(line: bytes | Oversize, limit: int) -> dict[str, Any] | Unreadable:
    """One line from the client: a JSON-RPC 2.0 message the gateway can act on, or `Unreadable` with the
    error JSON-RPC names for it (`limit`: the largest message accepted, as the error tells it)."""
    if isinstance(line, Oversize):
        why = f"a message of {line.size} bytes, over the limit of {limit} bytes ([gateway] max_message_size)"
        request_id = line.request_id()  # a request's id, or the gateway's request it answers: either way, told
        error = {"code": types.INVALID_REQUEST, "message": f"Invalid Request: {why}"}
        return Unreadable(why, error, request_id, answers=request_id)
    try:
        message = loads(line)
    except NotJson as exc:
        return Unreadable(str(exc), {"code": types.PARSE_ERROR, "message": f"Parse error: {exc}"})
    except NonFiniteNumber as exc:
        return _non_finite(loads_lenient(line), str(exc))
    problem = malformed(message)
    if problem is not None:
        return _invalid(problem, message)
    checked: dict[str, Any] = message
    return checked


def _invalid(problem: str, message: Any) -> Unreadable:
    """A message that is not a JSON-RPC 2.0 message the gateway can act on: an Invalid Request."""
    return Unreadable(problem, {"code": types.INVALID_REQUEST, "message": f"Invalid Request: {problem}"}, _id(message))


def _id(message: Any) -> RequestId | None:
    """A malformed message's id, where it is a request's and readable (a response's id names a request
    of the gateway's, not one of the client's, and is not answered to)."""
    if isinstance(message, dict) and "method" in message and is_request_id(request_id := message.get("id")):
        return request_id
    return None


def _non_finite(message: Any, why: str) -> Unreadable:
    """A message carrying a number JSON cannot carry: a request is refused as having invalid parameters,
    an answer fails the request it answers, a notification is dropped."""
    problem = malformed(message)
    if problem is not None:
        return _invalid(problem, message)
    why = f"a number JSON cannot carry ({why})"
    if "method" not in message:
        return Unreadable(why, None, answers=message["id"])
    if "id" not in message:
        return Unreadable(why, None)
    return Unreadable(
        why, {"code": types.INVALID_PARAMS, "message": f"Invalid request parameters: {why}"}, message["id"]
    )


def has_modern_envelope(params: Any) -> bool:
    return (
        isinstance(params, dict)
        and isinstance(params.get("_meta"), dict)
        and PROTOCOL_VERSION_META_KEY in params["_meta"]
    )


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def progress_token(params: dict[str, Any] | None) -> RequestId | None:
    meta = params.get("_meta") if params is not None else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if is_request_id(token) else None
