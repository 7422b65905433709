"""Screening what a tool returned under the result rules: withhold it, or mask parts of its text. Sans-IO."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
    subject = _result_subject(result)
    redacted: list[str] = []
    monitored: list[str] = []
    for rule in rules:
        try:
            applies = rule.when is None or rule.when.is_valid(subject)
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


def _result_subject(result: Mapping[str, Any]) -> Any:
    structured = result.get("structuredContent")
    if structured is not None:
        return structured
    return {"text": "".join(_texts(result))}


def _texts(result: Mapping[str, Any]) -> Iterable[str]:
    for block in result.get("content") or ():
        if isinstance(block, Mapping):
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                yield block["text"]
            resource = block.get("resource")
            if isinstance(resource, Mapping) and isinstance(resource.get("text"), str):
                yield resource["text"]


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
    if result.get("structuredContent") is not None:
        changed["structuredContent"] = scrub(result["structuredContent"])
    return changed


def _scrub_block(block: Any, scrub: Any) -> Any:
    if not isinstance(block, Mapping):
        return block
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return {**block, "text": scrub(block["text"])}
    resource = block.get("resource")
    if isinstance(resource, Mapping) and isinstance(resource.get("text"), str):
        return {**block, "resource": {**resource, "text": scrub(resource["text"])}}
    return block
