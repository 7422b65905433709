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
    object) and `text`, every text the result carries (a `text` field of the structured content first)."""
    texts = list(_texts(result))
    structured = result.get("structuredContent")
    if not isinstance(structured, Mapping):
        return {"text": "".join(texts)}
    if isinstance(structured.get("text"), str):
        texts.insert(0, structured["text"])
    return {**structured, "text": "".join(texts)}


def _texts(result: Mapping[str, Any]) -> Iterable[str]:
    for block in _blocks(result):
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            yield block["text"]
        elif isinstance(block.get("data"), str):  # image, audio
            decoded = _decoded(block["data"])
            if decoded is not None:
                yield decoded
        resource = block.get("resource")
        if isinstance(resource, Mapping):
            if isinstance(resource.get("text"), str):
                yield resource["text"]
            if isinstance(resource.get("blob"), str) and (decoded := _decoded(resource["blob"])) is not None:
                yield decoded


def _blocks(result: Mapping[str, Any]) -> Iterable[Any]:
    """Every content block of a result: a tool's `content`, a resource read's `contents` (each as an
    embedded resource) and a prompt's `messages`."""
    yield from result.get("content") or ()
    for contents in result.get("contents") or ():
        yield {"type": "resource", "resource": contents}
    for message in result.get("messages") or ():
        if isinstance(message, Mapping):
            yield message.get("content")


def _decoded(data: str) -> str | None:
    """Base64 `data` as text, when its bytes are UTF-8; `None` for anything else (binary, or not base64)."""
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _encoded(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


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
        changed["messages"] = [
            {**message, "content": _scrub_block(message.get("content"), scrub)}
            if isinstance(message, Mapping)
            else message
            for message in messages
        ]
    if result.get("structuredContent") is not None:
        changed["structuredContent"] = scrub(result["structuredContent"])
    return changed


def _scrub_message(message: Any, scrub: Scrub) -> Any:
    if not isinstance(message, Mapping):
        return message
    return {**message, "content": _scrub_block(message.get("content"), scrub)}


def _scrub_block(block: Any, scrub: Scrub) -> Any:
    if not isinstance(block, Mapping):
        return block
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {**block, "text": scrub(block["text"])}
    if isinstance(block.get("data"), str):
        return {**block, "data": _scrub_encoded(block["data"], scrub)}
    if isinstance(block.get("resource"), Mapping):
        return {**block, "resource": _scrub_resource(block["resource"], scrub)}
    return block


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
    """Base64 `data` masked where its bytes are UTF-8 text (and encoded again only when that changed it)."""
    decoded = _decoded(data)
    if decoded is None:
        return data
    masked = scrub(decoded)
    return data if masked == decoded else _encoded(masked)
