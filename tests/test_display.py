"""What a person asked to approve a call is shown: every argument, paths first, nothing hidden or faked."""

from __future__ import annotations

import hashlib

import pytest

from gateway.display import BUDGET, approval_prompt, escape, path_like, show_arguments

LONG = "x" * 50_000


def test_a_long_content_does_not_push_the_destination_out_of_view() -> None:
    shown = show_arguments({"content": LONG, "path": "/home/me/project/policies/allow-all.toml"})
    first, second = shown.splitlines()
    assert first == '"path": "/home/me/project/policies/allow-all.toml"'
    assert second.startswith('"content": "xxx')
    digest = hashlib.sha256(LONG.encode()).hexdigest()[:16]
    assert "[50,000 characters, " in second and f"sha256 {digest}]" in second
    assert len(shown) <= BUDGET


def test_declared_paths_and_path_like_names_come_first() -> None:
    arguments = {"a_body": "1", "where": "/w", "filePath": "/f", "destination": "/d", "zeta": "2", "paths": ["/p"]}
    names = [line.split(":")[0] for line in show_arguments(arguments, paths={"where"}).splitlines()]
    assert names == ['"destination"', '"filePath"', '"paths"', "  [0]", '"where"', '"a_body"', '"zeta"']


def test_every_key_is_shown_however_large_the_values() -> None:
    arguments = {f"k{index:03}": LONG for index in range(60)}
    arguments["nested"] = {"deeper": {"last": LONG, "key": [LONG, {"inner": LONG}]}}
    shown = show_arguments(arguments)
    for index in range(60):
        assert f'"k{index:03}": "' in shown
    for key in ('"nested": object of 1 key', '"deeper": object of 2 keys', '"last": "', '"inner": "'):
        assert key in shown
    assert len(shown) < 60 * 200  # each value shortened to its floor, every key kept


@pytest.mark.parametrize(
    "value",
    [
        'notes.txt\n"path": "/safe/place"',
        'notes.txt\r"path": "/safe/place"',
        'notes.txt\u2028"path": "/safe/place"',
        'notes.txt\u0085"path": "/safe/place"',
    ],
    ids=["newline", "return", "line-separator", "next-line"],
)
def test_a_value_cannot_draw_a_line_of_its_own(value: str) -> None:
    shown = show_arguments({"content": value, "path": "/real/target"})
    assert shown.splitlines() == ['"path": "/real/target"', f'"content": "{escape(value)}"']
    assert [line for line in shown.splitlines() if line.startswith('"path"')] == ['"path": "/real/target"']


def test_bidi_zero_width_and_control_characters_are_written_out() -> None:
    value = "txt.\u202eexe\u200b\u2066\ufeff\x00\x1b[2K\U000e0041"
    shown = show_arguments({"path": value})
    assert shown == '"path": "txt.\\u202eexe\\u200b\\u2066\\ufeff\\u0000\\u001b[2K\\U000e0041"'


def test_a_look_alike_key_is_told_apart() -> None:
    shown = show_arguments({"p\u0430th": "/elsewhere", "path": "/here"})  # Cyrillic a
    assert shown.splitlines() == ['"path": "/here"', '"p\\u0430th": "/elsewhere"']


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("path", True),
        ("paths", True),
        ("filePath", True),
        ("source_dir", True),
        ("directories", True),
        ("destination", True),
        ("URL", True),
        ("cwd", True),
        ("content", False),
        ("pathos", False),
        ("text", False),
    ],
)
def test_path_like_names(name: str, expected: bool) -> None:
    assert path_like(name) is expected


def test_the_prompt_shows_the_binding_and_escapes_names() -> None:
    text = approval_prompt(
        tool="box__write\nfake",
        upstream_tool="write",
        upstream="box",
        reason="rule 'w' needs a person's approval",
        arguments={"content": LONG, "path": "/p"},
        paths=(),
        binding="ab" * 32,
        call_id="c1",
        expires="2m",
    )
    assert "'box__write\\nfake'" in text
    assert f"approval bound to sha256 {'ab' * 32}" in text
    assert text.index('"path": "/p"') < text.index('"content"')


def test_a_trailing_newline_is_written_out_too() -> None:
    assert show_arguments({"path\n": "notes.txt\n"}) == '"path\\n": "notes.txt\\n"'
