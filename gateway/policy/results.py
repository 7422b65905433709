"""Screening what a tool returned under the result rules: withhold it, or mask what matches. Sans-IO.

A result rule sees every channel of a result (`subject`): its `text` is all the text the result
carries, in order (text blocks; embedded resources' `text`; embedded resources' `blob`, images' and
audio's `data` read as text whatever MIME type the upstream claims; every string of a block of another
kind; a resource read's `contents`, a prompt's `messages` and a completion's `values` the same way),
and beside it the fields of `structuredContent`. Masking (`redact`) reaches the same places by the
same walk (`_edited`): a decoded blob is masked and encoded again. A progress or log message relayed
while a call runs is screened as a result of its own (`gateway.core.pipeline`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.calls import Effect
from gateway.policy.rules import Rule


@dataclass(frozen=True, slots=True)
class Screening:
    """What the result rules made of an upstream result."""

    result: Mapping[str, Any]
    withheld_by: str | None = None
    reason: str = ""
    redacted_by: tuple[str, ...] = ()
    monitored: tuple[str, ...] = ()


def screen(rules: Sequence[Rule], result: Mapping[str, Any], *, monitor_mode: bool) -> Screening:
    """Apply `rules` (the result rules that concern this call) to what the upstream returned."""
    if not rules:
        return Screening(result)
    seen = subject(result)
    redacted: list[str] = []
    monitored: list[str] = []
    for rule in rules:
        try:
            applies = rule.when is None or rule.when.is_valid(seen)
        except Exception as exc:  # fail closed: a result that cannot be screened is withheld
            reason = f"result rule '{rule.id}' could not be evaluated ({type(exc).__name__})"
            return Screening(result, rule.id, reason, tuple(redacted), tuple(monitored))
        if not applies:
            continue
        if rule.monitor or monitor_mode:
            monitored.append(rule.id)
            continue
        if rule.effect is Effect.DENY:
            reason = f"result withheld by rule '{rule.id}'" + (f": {rule.reason}" if rule.reason else "")
            return Screening(result, rule.id, reason, tuple(redacted), tuple(monitored))
        masked = _redact(result, rule)
        if masked != result:
            result = masked
            redacted.append(rule.id)
    return Screening(result, None, "", tuple(redacted), tuple(monitored))


def subject(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a result rule's `when` is checked against: the fields of `structuredContent` (when it is an
    object) and `text`, every text the result carries (a `text` field of the structured content first,
    or structured content that is not an object, as JSON)."""
    texts = list(_texts(result))
    structured = result.get("structuredContent")
    if not isinstance(structured, Mapping):
        if structured is not None:
            texts.insert(0, json.dumps(structured, ensure_ascii=False))
        return {"text": "".join(texts)}
    if isinstance(structured.get("text"), str):
        texts.insert(0, structured["text"])
    return {**structured, "text": "".join(texts)}


def _texts(result: Mapping[str, Any]) -> list[str]:
    """Every text `result` carries, in order: what masking reaches, read by the same walk."""
    texts: list[str] = []

    def keep(text: str) -> str:
        texts.append(text)
        return text

    _edited(result, keep)
    return texts


@dataclass(frozen=True, slots=True)
class _Decoded:
    """Base64 data read as text: the text, and how to write it back."""

    text: str
    encoding: str
    urlsafe: bool


_BOMS = ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_WHITESPACE = re.compile(r"\s+")


def _decoded(data: str) -> _Decoded | None:
    """Base64 `data` (standard or URL-safe, padded or not, wrapped in lines or not) as text: UTF-16 when
    it starts with a byte-order mark, else UTF-8, any byte that is not UTF-8 kept as an escape (so one
    bad byte hides nothing). `None` for data that is not base64."""
    compact = _WHITESPACE.sub("", data)
    urlsafe = "-" in compact or "_" in compact
    padded = compact + "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return _Decoded(raw.decode(encoding), encoding, urlsafe)
            except UnicodeDecodeError:
                break
    return _Decoded(raw.decode("utf-8", errors="surrogateescape"), "utf-8", urlsafe)


def _encoded(decoded: _Decoded, text: str) -> str:
    raw = text.encode(decoded.encoding, errors="surrogateescape")
    return base64.b64encode(raw, altchars=b"-_" if decoded.urlsafe else None).decode("ascii")


Edit = Callable[[str], str]
"""Applied to each text a result carries; returns the text as it is to read now."""


def _redact(result: Mapping[str, Any], rule: Rule) -> Mapping[str, Any]:
    mask = f"[redacted by mcp-armor rule '{rule.id}']"

    def scrub(text: str) -> str:
        for pattern in rule.redact:
            text = pattern.sub(mask, text)
        return text

    changed = _edited(result, scrub)
    if result.get("structuredContent") is not None:
        changed["structuredContent"] = _edited_strings(result["structuredContent"], scrub)
    return changed


def _edited(result: Mapping[str, Any], edit: Edit) -> dict[str, Any]:
    """`result` with `edit` applied to every text its blocks carry: a tool's `content`, a resource read's
    `contents` and a prompt's `messages`. Reading (`_texts`) and masking (`_redact`) both take this one
    walk, so nothing one of them reaches escapes the other."""
    changed = dict(result)
    if isinstance(result.get("content"), list):
        changed["content"] = [_edited_block(block, edit) for block in result["content"]]
    if isinstance(result.get("contents"), list):
        changed["contents"] = [_edited_resource(item, edit) for item in result["contents"]]
    if isinstance(result.get("messages"), list):
        changed["messages"] = [_edited_message(message, edit) for message in result["messages"]]
    if isinstance(result.get("completion"), Mapping):
        changed["completion"] = _edited_strings(result["completion"], edit)
    return changed


def _edited_message(message: Any, edit: Edit) -> Any:
    if not isinstance(message, Mapping):
        return _edited_strings(message, edit)
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [_edited_block(block, edit) for block in content]}
    return {**message, "content": _edited_block(content, edit)}


def _edited_block(block: Any, edit: Edit) -> Any:
    if not isinstance(block, Mapping):
        return _edited_strings(block, edit)
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {**block, "text": edit(block["text"])}
    if isinstance(block.get("data"), str):  # image, audio
        return {**block, "data": _edited_encoded(block["data"], edit)}
    if isinstance(block.get("resource"), Mapping):
        return {**block, "resource": _edited_resource(block["resource"], edit)}
    return _edited_strings(block, edit)  # a resource link, or a kind of block this gateway does not know


def _edited_resource(resource: Any, edit: Edit) -> Any:
    if not isinstance(resource, Mapping):
        return _edited_strings(resource, edit)
    edited = dict(resource)
    if isinstance(resource.get("text"), str):
        edited["text"] = edit(resource["text"])
    if isinstance(resource.get("blob"), str):
        edited["blob"] = _edited_encoded(resource["blob"], edit)
    return edited


def _edited_strings(value: Any, edit: Edit) -> Any:
    """Every string in `value`, at any depth, edited."""
    if isinstance(value, str):
        return edit(value)
    if isinstance(value, Mapping):
        return {key: _edited_strings(item, edit) for key, item in value.items()}
    if isinstance(value, list):
        return [_edited_strings(item, edit) for item in value]
    return value


def _edited_encoded(data: str, edit: Edit) -> str:
    """Base64 `data` edited where it reads as text (and encoded again only when that changed it)."""
    decoded = _decoded(data)
    if decoded is None:
        return data
    text = edit(decoded.text)
    return data if text == decoded.text else _encoded(decoded, text)
