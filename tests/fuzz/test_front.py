"""Properties of what a person is shown and of the gateway's own files: whatever the arguments, every
key is shown, no value draws a line or hides text, and no spelling of a protected path slips through."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.calls import Decision, Effect
from gateway.core.own_files import GatewayFiles, Protected
from gateway.display import escape, show_arguments

TRICKY = st.sampled_from(["\n", "\r", "\u2028", "\u202e", "\u200b", "\u2066", "\ufeff", "\x1b", '"', "\\", "\x00"])
TEXT = st.lists(st.one_of(st.characters(), TRICKY), max_size=40).map("".join)
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), TEXT, TEXT.map(lambda text: text * 300)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


@given(st.dictionaries(TEXT, VALUES, min_size=1, max_size=8))
def test_every_key_is_shown_and_nothing_is_hidden(arguments: dict[str, Any]) -> None:
    shown = show_arguments(arguments)
    lines = shown.split("\n")
    top = [line for line in lines if line.startswith('"')]
    assert len(top) == len(arguments)
    for key in arguments:
        assert f'"{escape(key, ascii_only=True)}":' in shown
    assert not any(unicodedata.category(char) in HIDDEN for char in shown if char != "\n")
    assert all(line.startswith(('"', " ")) for line in lines)


ROOT = "/srv/project"
FILES = GatewayFiles([Protected("policies directory", (f"{ROOT}/policies",), True, False)], {}, ROOT)
ALLOWED = Decision(Effect.ALLOW, "allowed", "rev")
SEGMENT = st.sampled_from([".", "..", "", "notes", "policies", "x"])


@given(st.lists(SEGMENT, max_size=8), st.booleans(), st.sampled_from(["/", "\\"]))
def test_a_path_is_refused_exactly_when_it_lands_in_the_protected_tree(
    parts: list[str], absolute: bool, separator: str
) -> None:
    path = separator.join(parts)
    if absolute:
        path = ROOT + "/" + path
    decision = FILES.decide(ALLOWED, "files", {"path": path}, ())
    resolved = os.path.normpath(os.path.join(ROOT, path.replace("\\", "/")))
    inside = Path(resolved).is_relative_to(f"{ROOT}/policies")
    assert (decision.effect is Effect.DENY) is (inside and bool(path.split("\0")[0]))
