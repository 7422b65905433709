"""The audit log's canonical form: every JSON value's canonical text round-trips, and `audit verify` accepts a
stored body only when it is exactly that text (any other spelling of the same event is reported, never raised)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.audit.chain import GENESIS, body_problem, canonical, chain_hash
from gateway.audit.store import AuditStore

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
)
BODIES = st.dictionaries(st.text(max_size=6), VALUES, max_size=6)


def respellings(body: dict[str, Any], text: str) -> list[str]:
    """Other texts that parse to the same event (or, for `1` vs `1.0`, to one a reader takes for it)."""
    variants = [f" {text}", f"{text}\n", json.dumps(body, sort_keys=True, ensure_ascii=False, indent=1)]
    variants.append(json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":")))
    if len(body) >= 2:  # keys out of order
        reordered = dict(sorted(body.items(), reverse=True))
        variants.append(json.dumps(reordered, ensure_ascii=False, separators=(",", ":")))
    if body:  # a key given twice: SQLite's json_extract reads the first, Python's parser the last
        key = next(iter(sorted(body)))
        variants.append('{"' + json.dumps(key, ensure_ascii=False)[1:-1] + '":"forged",' + text[1:])
        variants.append(text[:-1] + "," + json.dumps(key, ensure_ascii=False) + ':"forged"}')
    if "/" in text:  # "\/" is "/" escaped
        variants.append(text.replace("/", "\\/", 1))
    for key in body:
        if key[:1].isascii() and key[:1].isalnum():  # a key's first letter as a \u escape
            encoded = json.dumps(key, ensure_ascii=False)
            variants.append(text.replace(f"{encoded}:", f'"\\u{ord(key[0]):04x}{encoded[2:]}:', 1))
            break
    return [variant for variant in variants if variant != text]


def number_spellings(number: int | float) -> list[str]:
    """Texts of `number` other than its canonical one: `1` vs `1.0`, exponents, trailing zeros."""
    written = json.dumps(number)
    if isinstance(number, int):
        texts = [f"{number}.0", f"{number}e0", f"{number}E+0", f"{number}.00"]
    else:
        mantissa, _, exponent = written.partition("e")
        texts = [f"{mantissa}0e{exponent}" if exponent else f"{written}0", written.upper()]
        if number.is_integer() and abs(number) < 1e16:
            texts.append(str(int(number)))
    return [text for text in texts if text != written]


@given(VALUES)
def test_canonical_text_round_trips(value: Any) -> None:
    text = canonical({"value": value})
    assert canonical(json.loads(text)) == text
    assert body_problem(text) is None


@given(BODIES)
def test_verify_accepts_a_canonical_body_and_rejects_every_respelling_of_it(body: dict[str, Any]) -> None:
    text = canonical(body)
    assert body_problem(text) is None
    for variant in respellings(body, text):
        problem = body_problem(variant)
        assert problem is not None and "(edited)" in problem, variant


@given(BODIES, st.integers(min_value=-(10**20), max_value=10**20) | st.floats(allow_nan=False, allow_infinity=False))
def test_a_number_spelled_otherwise_is_rejected(body: dict[str, Any], number: int | float) -> None:
    body = {**body, "n": number}
    text = canonical(body)
    for spelled in number_spellings(number):
        variant = text.replace(f'"n":{json.dumps(number)}', f'"n":{spelled}', 1)
        assume(variant != text)
        # Not canonical, or the canonical text of another event (`1` is an integer, `1.0` a float): its
        # hash then differs from the one stored, which verify reports too.
        problem = body_problem(variant)
        assert problem is not None or type(json.loads(variant)["n"]) is not type(number), variant


def mutations(text: str) -> st.SearchStrategy[str]:
    """`text` with one character inserted, removed or replaced."""
    return st.tuples(st.integers(0, len(text)), st.sampled_from(["insert", "remove", "replace"]), st.characters()).map(
        lambda edit: (
            text[: edit[0]]
            + (edit[2] if edit[1] != "remove" else "")
            + text[edit[0] + (0 if edit[1] == "insert" else 1) :]
        )
    )


@given(st.text(max_size=80) | BODIES.map(canonical).flatmap(lambda text: st.just(text) | mutations(text)))
def test_any_text_gets_an_answer_never_an_exception(text: str) -> None:
    problem = body_problem(text)
    if problem is None:
        assert canonical(json.loads(text)) == text


@settings(max_examples=max(10, settings().max_examples // 6))  # each example writes a log file: fewer of them
@given(BODIES, st.data())
def test_a_stored_respelling_with_its_hash_recomputed_fails_verify_at_its_event(
    body: dict[str, Any], data: st.DataObject
) -> None:
    text = canonical(body)
    variants = respellings(body, text)
    assume(variants)
    variant = data.draw(st.sampled_from(variants))
    rehash = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as directory:
        log = Path(directory) / "audit.db"
        writer = AuditStore.open_writer(log)
        writer.append([text, canonical({"kind": "after"})])
        writer.close()
        # Rewritten as an attacker would: the body respelled, and either its hash kept (it parses to the
        # same event) or every hash from it on recomputed to match.
        connection = sqlite3.connect(log)
        with connection:
            connection.execute("UPDATE events SET body = ? WHERE seq = 1", (variant,))
            if rehash:
                digest = chain_hash(GENESIS, variant)
                after = chain_hash(digest, canonical({"kind": "after"}))
                connection.execute("UPDATE events SET hash = ? WHERE seq = 1", (digest,))
                connection.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = 2", (digest, after))
                connection.execute("UPDATE head SET hash = ?", (after,))
        connection.close()
        reader = AuditStore.open_reader(log)
        try:
            problem = reader.verify().problem
        finally:
            reader.close()
    assert problem is not None and problem.seq == 1 and "(edited)" in problem.what
