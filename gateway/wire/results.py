"""Results in wire form: an upstream's tool result checked, and every result shaped for its caller.

`shape` is the one place a result becomes what a downstream client receives, whatever the method and
transport: the cache hints (nothing the gateway serves is cacheable: the catalogue can change at any
moment and differs per caller), the dump of a model, the `resultType` a 2026-07-28 caller expects
(upstreams speak the handshake era, which has none), the specification's per-version sieve, and, when
asked, the server-information stamp of a 2026-07-28 result. It does what the SDK server's own shaping
does, so a client sees the same answers from either face.

`check_tool_result` is what the pipeline asks of an upstream's `CallToolResult` before the result
rules read it: that it fits the caller's protocol version.

The commonest tool result (text blocks and an error flag) is checked and shaped without building the
model (`plain_text_result`); the tests hold the two to the same output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from typing import Any, get_args

import mcp_types as types
from mcp_types import CORE_RESULT_TYPES, SERVER_INFO_META_KEY
from mcp_types import methods as spec_methods
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from gateway.errors import ProtocolError

logger = logging.getLogger(__name__)


def shape(
    method: str, version: str, result: BaseModel | Mapping[str, Any], server_info: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """`result` (a model, or wire form) as a client speaking `version` receives it from `method`.

    `server_info` stamps a 2026-07-28 result's `_meta` (unless it carries a stamp); `None` leaves that
    to the transport. Raises `ProtocolError` (internal error) for a result the version's model rejects.
    """
    modern = version in MODERN_PROTOCOL_VERSIONS
    dumped = (
        plain_text_result(result, modern=modern) if method == "tools/call" and isinstance(result, Mapping) else None
    )
    if dumped is None:
        dumped = _sieved(method, version, modern, result)
    if modern and server_info is not None:
        meta = dumped.get("_meta")
        if meta is None:
            dumped["_meta"] = {SERVER_INFO_META_KEY: dict(server_info)}
        elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            dumped["_meta"] = {**meta, SERVER_INFO_META_KEY: dict(server_info)}
    return dumped


def _sieved(method: str, version: str, modern: bool, result: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if method in spec_methods.CACHEABLE_METHODS:
        if isinstance(result, types.CacheableResult):
            hint = {"ttl_ms": 0, "cache_scope": "private"}
            result = result.model_copy(update={k: v for k, v in hint.items() if k not in result.model_fields_set})
        elif isinstance(result, Mapping) and not spec_methods.is_input_required(result):
            result = {"ttlMs": 0, "cacheScope": "private", **result}
    dumped = dump(result) if isinstance(result, BaseModel) else dict(result)
    if modern:
        dumped.setdefault("resultType", "complete")
    result_type = dumped.get("resultType")
    if method in spec_methods.SPEC_CLIENT_METHODS and (
        not modern or not isinstance(result_type, str) or result_type in CORE_RESULT_TYPES
    ):
        try:
            dumped = spec_methods.serialize_server_result(method, version, dumped)
        except ValidationError:
            logger.exception("%s produced an invalid result", method)
            raise ProtocolError(types.INTERNAL_ERROR, "Handler returned an invalid result") from None
    return dumped


def check_tool_result(raw: Mapping[str, Any], version: str) -> dict[str, Any]:
    """`raw` as the `CallToolResult` model of `version` reads it: what the result rules then screen and
    the audit digests. Raises `ValidationError` for a result a client speaking `version` could not take
    (checked against the latest model for a version not known here, and then returned as it came)."""
    modern = version in MODERN_PROTOCOL_VERSIONS
    plain = plain_text_result(raw, modern=modern)
    if plain is not None:
        return plain
    model = _result_model(version)
    if model is None:
        types.CallToolResult.model_validate(raw, by_name=False)
        return dict(raw)
    checked = model.model_validate({**raw, "resultType": "complete"} if modern else raw, by_name=False)
    return dump(checked)


_PLAIN_KEYS = frozenset({"content", "isError"})
_MODERN_PLAIN_KEYS = _PLAIN_KEYS | {"resultType"}
_TEXT_BLOCK_KEYS = frozenset({"type", "text"})


def plain_text_result(raw: Mapping[str, Any], *, modern: bool) -> dict[str, Any] | None:
    """The commonest result, text blocks and an error flag and nothing else, dumped as the version's
    model dumps it (its key order too) without building the model; `None` for anything else, which the
    model checks."""
    content = raw.get("content")
    if type(content) is not list or not raw.keys() <= (_MODERN_PLAIN_KEYS if modern else _PLAIN_KEYS):
        return None
    if modern and raw.get("resultType", "complete") != "complete":
        return None  # a 2026 result checked already carries `complete`; anything else the model decides
    blocks = []
    for block in content:
        if type(block) is not dict or block.keys() != _TEXT_BLOCK_KEYS or block["type"] != "text":
            return None
        text = block["text"]
        if type(text) is not str:
            return None
        blocks.append({"text": text, "type": "text"})
    shaped: dict[str, Any] = {"content": blocks}
    flag = raw.get("isError")
    if flag is not None:
        if type(flag) is not bool:
            return None
        shaped["isError"] = flag
    if modern:
        shaped["resultType"] = "complete"
    return shaped


@cache
def _result_model(version: str) -> type[BaseModel] | None:
    surface = spec_methods.SERVER_RESULTS.get(("tools/call", version))
    members = get_args(surface) or (surface,)
    return next((m for m in members if isinstance(m, type) and m.__name__ == "CallToolResult"), None)


def dump(model: BaseModel) -> dict[str, Any]:
    """A model in wire form."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)
