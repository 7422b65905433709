"""Result rules on binary content: what `binary` lists, and rules that withhold a result carrying it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from gateway.policy.results import subject, textual
from gateway.setup.starter import DEFAULTS_TEMPLATE
from tests.conftest import REPO

BINARY_RULES = """
[[rule]]
id = "no-images"
tools = ["pics__*"]
on = "result"
effect = "deny"
reason = "images stay out"
when = { properties = { binary = { contains = { pattern = "^image/" } } }, required = ["binary"] }

[[rule]]
id = "no-binary"
tools = ["blobs__*"]
on = "result"
effect = "deny"
when = { required = ["binary"] }
"""

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR").decode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def blob(mime: str | None, data: str) -> dict[str, Any]:
    resource = {"uri": "file:///x", "blob": data} | ({"mimeType": mime} if mime is not None else {})
    return {"type": "resource", "resource": resource}


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    (tmp_path / "binary.toml").write_text(BINARY_RULES)
    return PolicyEngine(load_policies(tmp_path))


@pytest.mark.parametrize(
    ("mime", "expected"),
    [
        ("text/plain", True),
        ("Text/CSV; charset=utf-8", True),
        ("application/json", True),
        ("application/vnd.api+json", True),
        ("image/svg+xml", True),
        ("application/xml", True),
        ("application/yaml", True),
        ("application/toml", True),
        ("application/javascript", True),
        ("image/png", False),
        ("audio/wav", False),
        ("application/octet-stream", False),
        ("application/pdf", False),
        ("application/zip", False),
        ("", False),
    ],
)
def test_which_mime_types_are_textual(mime: str, expected: bool) -> None:
    assert textual(mime) is expected


def test_binary_lists_every_image_audio_and_non_textual_blob_on_every_channel() -> None:
    text = {"type": "text", "text": "hello"}
    assert "binary" not in subject({"content": [text, blob("text/plain", _b64(b"plain words"))]})
    assert "binary" not in subject({"contents": [{"uri": "file:///a", "mimeType": "application/json", "text": "{}"}]})
    tool = {
        "content": [
            text,
            {"type": "image", "mimeType": "image/PNG", "data": PNG},
            {"type": "audio", "mimeType": "audio/wav", "data": _b64(b"RIFF")},
            {"type": "image", "data": PNG},  # no MIME type
            blob("application/pdf", _b64(b"%PDF-1.7")),
            blob(None, _b64(b"words without a type")),
        ]
    }
    expected = ["image/png", "audio/wav", "application/octet-stream", "application/pdf", "application/octet-stream"]
    assert subject(tool)["binary"] == expected
    read = {"contents": [{"uri": "file:///p", "mimeType": "image/gif", "blob": _b64(b"GIF89a")}]}
    assert subject(read)["binary"] == ["image/gif"]
    prompt = {"messages": [{"role": "user", "content": {"type": "image", "mimeType": "image/jpeg", "data": PNG}}]}
    assert subject(prompt)["binary"] == ["image/jpeg"]
    # Binary content is still read as text, so a pattern sees what a mislabelled blob spells.
    assert "words without a type" in subject(tool)["text"]


def test_a_textual_blob_that_does_not_read_as_text_is_binary() -> None:
    for data in (_b64(b"\x89PNG\r\n\x1a\n\xff"), "not base64 at all!"):
        assert subject({"contents": [{"uri": "file:///t", "mimeType": "text/plain", "blob": data}]})["binary"] == [
            "text/plain"
        ]
    utf16 = _b64("plain words".encode("utf-16"))
    assert "binary" not in subject({"contents": [{"uri": "file:///t", "mimeType": "text/plain", "blob": utf16}]})


def test_a_rule_withholds_results_with_binary_content_or_only_images(engine: PolicyEngine) -> None:
    image = {"content": [{"type": "image", "mimeType": "image/png", "data": PNG}]}
    text = {"content": [{"type": "text", "text": "a sum: 3"}]}
    pdf = {"content": [blob("application/pdf", _b64(b"%PDF-1.7"))]}
    withheld = engine.screen_result("pics__shot", image)
    assert withheld.withheld_by == "no-images" and withheld.reason.endswith("images stay out")
    assert engine.screen_result("pics__shot", text).withheld_by is None
    assert engine.screen_result("pics__shot", pdf).withheld_by is None  # binary, but not an image
    assert engine.screen_result("blobs__get", pdf).withheld_by == "no-binary"
    assert engine.screen_result("blobs__get", {"contents": [{"uri": "f:///a", "blob": PNG}]}).withheld_by == "no-binary"
    assert engine.screen_result("blobs__get", text).withheld_by is None


def test_the_starter_binary_rule_withholds_binary_results_once_uncommented(tmp_path: Path) -> None:
    assert (REPO / "policies" / "defaults.toml").read_text() == DEFAULTS_TEMPLATE
    start = DEFAULTS_TEMPLATE.index('# [[rule]]\n# id = "no-binary-results"')
    text = DEFAULTS_TEMPLATE[:start] + DEFAULTS_TEMPLATE[start:].replace("# ", "")
    (tmp_path / "defaults.toml").write_text(text)
    engine = PolicyEngine(load_policies(tmp_path))
    image = {"content": [{"type": "image", "mimeType": "image/png", "data": PNG}]}
    assert engine.screen_result("any__tool", image).withheld_by == "no-binary-results"
    assert engine.screen_result("any__tool", {"content": [{"type": "text", "text": "hi"}]}).withheld_by is None
    (tmp_path / "defaults.toml").write_text(DEFAULTS_TEMPLATE)  # as shipped: images pass
    assert PolicyEngine(load_policies(tmp_path)).screen_result("any__tool", image).withheld_by is None
