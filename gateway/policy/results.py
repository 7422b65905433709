"""Screening what a tool returned under the result rules: withhold it, or mask what matches. Sans-IO.

A result rule sees every channel of a result (`subject`): its `text` is all the text the result
carries, in order (text blocks; embedded resources' `text`; embedded resources' `blob`, images' and
audio's `data` wherever the bytes decode as UTF-8 text, whatever MIME type the upstream claims; a
resource read's `contents` and a prompt's `messages` the same way), and beside it the fields of
`structuredContent`. Masking (`redact`) reaches the same places: a decoded
blob is masked and encoded again. A progress message relayed while a call runs is screened as a
result of its own, one text block (`gateway.core.pipeline`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
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


def _texts(result: Mapping[str, Any]) -> Iterable[str]:
    for block in _blocks(result):
        if not isinstance(block, Mapping):
            yield from _strings(block)
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif isinstance(block.get("data"), str):  # image, audio
            if (decoded := _decoded(block["data"])) is not None:
                yield decoded.text
        elif isinstance(block.get("resource"), Mapping):
            resource = block["resource"]
            if isinstance(resource.get("text"), str):
                yield resource["text"]
            if isinstance(resource.get("blob"), str) and (decoded := _decoded(resource["blob"])) is not None:
                yield decoded.text
        else:  # a resource link, or a kind of block this gateway does not know: every string in it
            yield from _strings(block)


def _blocks(result: Mapping[str, Any]) -> Iterable[Any]:
    """Every content block of a result: a tool's `content`, a resource read's `contents` (each as an
    embedded resource) and a prompt's `messages` (a message's content, one block or a list)."""
    yield from result.get("content") or ()
    for contents in result.get("contents") or ():
        yield {"type": "resource", "resource": contents}
    for message in result.get("messages") or ():
        if isinstance(message, Mapping):
            content = message.get("content")
            yield from content if isinstance(content, list) else (content,)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


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


Scrub = Callable[[Any], Any]


def _redact(result: Mapping[str, Any], rule: Rule) -> Mapping[str, Any]:
    mask = f"[redacted by mcp-armor rule '{rule.id}']"

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for pattern in rule.redact:
                value = pattern.sub(mask, value)
            return value
        if isinstance(value, Mapping):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    changed = dict(result)
    content = result.get("content")
    if isinstance(content, list):
        changed["content"] = [_scrub_block(block, scrub) for block in content]
    contents = result.get("contents")
    if isinstance(contents, list):
        changed["contents"] = [_scrub_resource(item, scrub) for item in contents]
    messages = result.get("messages")
    if isinstance(messages, list):
        changed["messages"] = [_scrub_message(message, scrub) for message in messages]
    if result.get("structuredContent") is not None:
        changed["structuredContent"] = scrub(result["structuredContent"])
    return changed


def _scrub_message(message: Any, scrub: Scrub) -> Any:
    if not isinstance(message, Mapping):
        return scrub(message)
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [_scrub_block(block, scrub) for block in content]}
    return {**message, "content": _scrub_block(content, scrub)}


def _scrub_block(block: Any, scrub: Scrub) -> Any:
    if not isinstance(block, Mapping):
        return scrub(block)
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {**block, "text": scrub(block["text"])}
    if isinstance(block.get("data"), str):
        return {**block, "data": _scrub_encoded(block["data"], scrub)}
    if isinstance(block.get("resource"), Mapping):
        return {**block, "resource": _scrub_resource(block["resource"], scrub)}
    return scrub(block)


def _scrub_resource(resource: Any, scrub: Scrub) -> Any:
    if not isinstance(resource, Mapping):
        return resource
    scrubbed = dict(resource)
    if isinstance(resource.get("text"), str):
        scrubbed["text"] = scrub(resource["text"])
    if isinstance(resource.get("blob"), str):
        scrubbed["blob"] = _scrub_encoded(resource["blob"], scrub)
    return scrubbed


def _scrub_encoded(data: str, scrub: Scrub) -> str:
    """Base64 `data` masked where it reads as text (and encoded again only when that changed it)."""
    decoded = _decoded(data)
    if decoded is None:
        return data
    masked = scrub(decoded.text)
    return data if masked == decoded.text else _encoded(decoded, masked)
