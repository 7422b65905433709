"""Masking under generated JSON values: planted secrets never reach the stored text; masking is idempotent
and never raises, however deep the value nests."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.audit.chain import canonical
from gateway.policy.nesting import canonical_flat
from gateway.policy.redact import Redactor

REDACTOR = Redactor(b"k" * 32)
SECRET = st.from_regex(r"[A-Za-z0-9]{6,12}", fullmatch=True).map(lambda core: "Zq9" + core + "X7w")
"""A password-like secret, recognisable in any text it ends up in."""
NOISE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
SPOT = st.sampled_from(
    [
        "--password {s}",
        "--password={s}",
        "mysql -u root -p{s} shop",
        "curl -u alice:{s} https://h",
        "sshpass -p {s} ssh h",
        "postgresql://app:{s}@db/x",
        "redis://:{s}@cache:6379",
        "password={s}",
    ]
)


@st.composite
def planted(draw: st.DrawFn) -> tuple[Any, str]:
    """A JSON value with one secret planted: under a secret-named key, as a key, or in a command line or URL."""
    secret = draw(SECRET)
    where = draw(st.sampled_from(["key-name", "as-key", "in-text"]))
    before, after = draw(NOISE), draw(NOISE)
    if where == "key-name":
        leaf: Any = {draw(st.sampled_from(["password", "apiKey", "X-Auth-Token", "client_secret"])): secret}
    elif where == "as-key":
        leaf = {"ghp_" + secret + "a1B2c3D4e5F6g7H8i9J0k1L2": draw(NOISE)}
    else:
        leaf = {"command": f"{before}\t{draw(SPOT).format(s=secret)} \\ {after}"}
    filler = st.recursive(
        st.none() | st.booleans() | st.integers() | NOISE, lambda inner: st.lists(inner, max_size=3), max_leaves=6
    )
    value = leaf
    for key in draw(st.lists(st.sampled_from(["a", "items", "0", "é"]), max_size=draw(st.sampled_from([3, 80])))):
        value = {key: value, "pad": draw(filler)} if key != "0" else [draw(filler), value]
    return value, secret


@given(planted())
def test_a_planted_secret_never_reaches_the_stored_text_and_masking_is_idempotent(case: tuple[Any, str]) -> None:
    value, secret = case
    redaction = REDACTOR.redact({"arguments": value})
    stored = canonical(redaction.value)
    assert secret not in stored
    assert secret not in json.dumps([item.to_record() for item in redaction.masked], ensure_ascii=False)
    assert REDACTOR.redact(redaction.value).value == redaction.value


@given(st.integers(min_value=0, max_value=3000), st.booleans())
def test_masking_and_encoding_never_raise_however_deep(depth: int, lists: bool) -> None:
    value: Any = {"password": "Zq9secretX7w"}
    for _ in range(depth):
        value = [value] if lists else {"password": value}
    stored = REDACTOR.redact(value).value
    assert "Zq9secretX7w" not in canonical(stored)
    assert canonical_flat(value).count("[" if lists else "{") == depth + (0 if lists else 1)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_the_flat_encoding_is_the_canonical_one(value: Any) -> None:
    assert canonical_flat(value) == canonical(value)
