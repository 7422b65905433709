"""Screening what a tool returned under the result rules: withhold it, or mask what matches. Sans-IO.

A result rule sees every channel of a result (`subject`): its `text` is all the text the result
carries, in order (text blocks; embedded resources' `text`; embedded resources' `blob`, images' and
audio's `data` read as text whatever MIME type the upstream claims; every string of a block of another
kind; a resource read's `contents`, a prompt's `messages` and a completion's `values` the same way),
and beside it the fields of `structuredContent`, and `binary`: the MIME types of the binary content it
carries (images, audio, blobs whose type is not textual, or that do not read as the text their type
claims), so a rule can refuse binary content outright. Masking (`redact`) reaches the same places by
the same walk (`_edited`): a decoded blob is masked and encoded again. A progress or log message
relayed while a call runs is screened as a result of its own (`gateway.core.pipeline`).
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
    or structured content that is not an object, as JSON); and `binary`, the MIME types of its binary
    content, when it carries any."""
    texts: list[str] = []
    binary: list[str] = []

    def keep(text: str) -> str:
        texts.append(text)
        return text

    _edited(result, keep, binary)
    found = {"binary": binary} if binary else {}
    structured = result.get("structuredContent")
    if not isinstance(structured, Mapping):
        if structured is not None:
            texts.insert(0, json.dumps(structured, ensure_ascii=False))
        return {"text": "".join(texts), **found}
    if isinstance(structured.get("text"), str):
        texts.insert(0, structured["text"])
    return {**structured, "text": "".join(texts), **found}


OCTET_STREAM = "application/octet-stream"
"""What `binary` lists for binary content that names no MIME type."""
_TEXTUAL = re.compile(
    r"text/.*|.*\+(json|xml|yaml)|application/(json|xml|yaml|x-yaml|toml|x-toml|javascript|x-javascript"
    r"|ecmascript|typescript|x-sh|sql|graphql|x-ndjson|jsonl|x-www-form-urlencoded)"
)


def textual(mime: str) -> bool:
    """Whether content of this MIME type (any case, parameters ignored) is text: `text/*`, JSON, XML,
    YAML, TOML, scripts, SQL, GraphQL and any `+json`, `+xml` or `+yaml` type (SVG, as XML, is text)."""
    return _TEXTUAL.fullmatch(_essence(mime)) is not None


def _essence(mime: str) -> str:
    return mime.partition(";")[0].strip().lower()


@dataclass(frozen=True, slots=True)
class _Decoded:
    """Base64 data read as text: the text, and how to write it back."""

    text: str
    encoding: str
    urlsafe: bool
    exact: bool = True
    """Every byte read as text (no byte kept as an escape)."""


_BOMS = ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_WHITESPACE = re.compile(r"\s+")


def _decoded(data: str) -> _Decoded | None:
    """Base64 `data` (standard or URL-safe, padded or not, wrapped in lines or not) as text: UTF-16 when
    it starts with a byte-order mark, else UTF-8, any byte that is not UTF-8 kept as an escape (so one
    bad byte hides nothing, and `exact` says whether there was one). `None` for data that is not base64."""
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
    try:
        return _Decoded(raw.decode("utf-8"), "utf-8", urlsafe)
    except UnicodeDecodeError:
        return _Decoded(raw.decode("utf-8", errors="surrogateescape"), "utf-8", urlsafe, exact=False)


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


def _edited(result: Mapping[str, Any], edit: Edit, binary: list[str] | None = None) -> dict[str, Any]:
    """`result` with `edit` applied to every text its blocks carry: a tool's `content`, a resource read's
    `contents` and a prompt's `messages`; the MIME types of its binary content are added to `binary`.
    Reading (`subject`) and masking (`_redact`) both take this one walk, so nothing one of them reaches
    escapes the other."""
    changed = dict(result)
    if isinstance(result.get("content"), list):
        changed["content"] = [_edited_block(block, edit, binary) for block in result["content"]]
    if isinstance(result.get("contents"), list):
        changed["contents"] = [_edited_resource(item, edit, binary) for item in result["contents"]]
    if isinstance(result.get("messages"), list):
        changed["messages"] = [_edited_message(message, edit, binary) for message in result["messages"]]
    if isinstance(result.get("completion"), Mapping):
        changed["completion"] = _edited_strings(result["completion"], edit)
    return changed


def _edited_message(message: Any, edit: Edit, binary: list[str] | None) -> Any:
    if not isinstance(message, Mapping):
        return _edited_strings(message, edit)
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [_edited_block(block, edit, binary) for block in content]}
    return {**message, "content": _edited_block(content, edit, binary)}


def _edited_block(block: Any, edit: Edit, binary: list[str] | None) -> Any:
    if not isinstance(block, Mapping):
        return _edited_strings(block, edit)
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {**block, "text": edit(block["text"])}
    if isinstance(block.get("data"), str):  # image, audio: binary whatever MIME type they claim
        return {**block, "data": _edited_encoded(block["data"], block.get("mimeType"), edit, binary, always=True)}
    if isinstance(block.get("resource"), Mapping):
        return {**block, "resource": _edited_resource(block["resource"], edit, binary)}
    return _edited_strings(block, edit)  # a resource link, or a kind of block this gateway does not know


def _edited_resource(resource: Any, edit: Edit, binary: list[str] | None) -> Any:
    if not isinstance(resource, Mapping):
        return _edited_strings(resource, edit)
    edited = dict(resource)
    if isinstance(resource.get("text"), str):
        edited["text"] = edit(resource["text"])
    if isinstance(resource.get("blob"), str):
        edited["blob"] = _edited_encoded(resource["blob"], resource.get("mimeType"), edit, binary)
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


def _edited_encoded(data: str, mime: Any, edit: Edit, binary: list[str] | None, *, always: bool = False) -> str:
    """Base64 `data` edited where it reads as text (and encoded again only when that changed it). Its
    MIME type joins `binary` when it is binary: `always` (an image, audio), of a type that is not
    textual, or claiming a textual type but not reading as text (not base64, or not UTF-8/UTF-16:
    content a text rule cannot fully read is treated as binary)."""
    decoded = _decoded(data)
    if binary is not None:
        named = isinstance(mime, str) and mime.strip() != ""
        if always or not named or not textual(mime) or decoded is None or not decoded.exact:
            binary.append(_essence(mime) if named else OCTET_STREAM)
    if decoded is None:
        return data
    text = edit(decoded.text)
    return data if text == decoded.text else _encoded(decoded, text)
