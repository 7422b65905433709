"""Masking secrets in call arguments before they are stored: sans-IO, from data alone.

A value is masked when it looks like a secret (a private key, a cloud or service token, a bearer
token, a password in a URL or in `password=...`, a long high-entropy token), when its key names a
secret (`password`, `api_key`, `Authorization`, ...), or when a policy rule names its path. The
value is replaced by `[masked:KIND:HASH]`, where HASH is a keyed hash of the secret (the same secret
gives the same marker within one audit log, so uses can be correlated without revealing it), and
the path and kind are reported so the record says what was masked.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.policy.nesting import MAX_NESTING, MAX_VALUES, canonical_flat, nests_deeper
from gateway.schema import canonical_text, holds_more_than

# Each pattern masks its group "secret" (or the whole match when it has none). Every pattern runs in
# linear time on any text (an upstream writes the results these scan): a token starts only where no
# token character precedes it (so a long run is scanned once, not from each of its positions), and
# repetitions are bounded where a failing match could otherwise rescan what follows.
_T = r"(?<![A-Za-z0-9_-])"
_QUOTED = r"(?P<quote>['\"])?(?P<secret>(?(quote)[^'\"\n]{{1,256}}|{}))"
"""A secret after an opening quote runs to the closing one, spaces and all (`password: "two words"`, a
JSON document's `"password": "..."`); unquoted, it is what the pattern says (its `{}`)."""
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        (
            "private-key",
            r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY( BLOCK)?-----(?:[\s\S]*?-----END [A-Z0-9 ]{0,40}-----|[\s\S]*)",
        ),
        ("aws-access-key", r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
        ("github-token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})"),
        ("gitlab-token", _T + r"glpat-[A-Za-z0-9_-]{20,}"),
        ("slack-token", _T + r"xox[abposr]-[A-Za-z0-9-]{10,}"),
        ("google-api-key", r"\bAIza[0-9A-Za-z_-]{35}"),
        ("stripe-key", r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{16,}"),
        ("api-key", _T + r"sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"),
        ("jwt", _T + r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        ("bearer-token", r"(?i)\b(?:bearer|basic|token)\s{1,16}(?P<secret>[A-Za-z0-9._~+/=-]{12,})"),
        (
            "url-password",
            r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^/\s:@]{0,256}:(?P<secret>[^/\s@]{1,256})@",
        ),
        (
            "password",
            r"(?i)(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|client[_-]?secret)"
            r"['\"]?\s{0,16}[=:]\s{0,16}" + _QUOTED.format(r"[^\s&;,'\"]{4,}"),
        ),
        (
            "password-option",  # --password PASS, --db-password 'PASS', --token=T (any length)
            r"(?i)(?<![\w-])--(?:[a-z0-9]{1,20}-){0,3}(?:password|passwd|pass|secret|token|api-?key)"
            r"(?:=|[ \t]{1,16})" + _QUOTED.format(r"[^\s'\"=-][^\s'\"]*"),
        ),
    )
)
_COMMAND = re.compile(r"(?<![\w./-])(?:[\w./-]{0,64}/)?(?P<tool>mysql\w*|mariadb[\w-]*|sshpass|curl)(?![\w-])")
"""Commands whose short options carry a password: `mysql -pPASS` (attached only: with a space it asks),
`sshpass -p PASS`, `curl -u user:PASS`."""
_COMMAND_END = re.compile(r"[\n;|&]")
_OPTIONS = {
    "mysql": re.compile(r"(?<!\S)-p" + _QUOTED.format(r"[^\s'\"]+")),
    "sshpass": re.compile(r"(?<!\S)-p[ \t]{0,16}" + _QUOTED.format(r"[^\s'\"]+")),
    "curl": re.compile(  # -u among combined short options too: -su, -vu
        r"(?<!\S)(?:-[A-Za-z]{0,8}u[ \t]{0,16}|--user(?:=|[ \t]{1,16}))"
        r"(?P<quote>['\"])?[^\s:'\"]{0,256}:(?P<secret>(?(quote)[^'\"\n]{1,256}|[^\s'\"]+))"
    ),
}
SHORTEST = 15
"""No pattern matches fewer characters, except those that need a ':' or '=' (URL passwords, `pwd=...`),
or an option's `-p` or `--` (`mysql -pPASS`, `--pass X`)."""
_SHORT_HINTS = re.compile(r"[:=]|-p|--")
_REMEMBERED = 256
"""Strings up to this long that turned out clean are remembered (policy reasons recur with every call)."""
_TOKEN = re.compile(r"[A-Za-z0-9+/_=.-]{20,}")
_MARKER = re.compile(r"\[masked:[a-z-]+:[0-9a-f]{16}\]")
TOO_DEEP = f"[nested deeper than {MAX_NESTING} levels: not stored]"
"""What the log stores in place of an object or array nested deeper than `MAX_NESTING` levels."""
TOO_MANY = f"[more than {MAX_VALUES} values: not stored]"
"""What the log stores in place of arguments holding more than `MAX_VALUES` values."""
_WORD_RUN = re.compile(r"[a-z]{4,}")
_KEY_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_SECRET_WORDS = frozenset(
    {"password", "passwd", "passphrase", "pwd", "secret", "token", "apikey", "credential", "credentials"}
    | {"cookie", "authorization", "privatekey", "accesskey", "secretkey", "clientsecret", "signature"}
)
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})


@dataclass(frozen=True, slots=True)
class Masked:
    """One masked value: where it was in the arguments and why."""

    path: str
    kind: str

    def to_record(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind}


@dataclass(frozen=True, slots=True)
class Redaction:
    """Arguments with secrets masked, what was masked, and the masked strings (to scrub them elsewhere)."""

    value: Any
    masked: tuple[Masked, ...] = ()
    secrets: Mapping[str, str] | None = None
    """Each masked string -> its marker."""

    def scrub(self, text: str, redactor: Redactor) -> str:
        """Mask, in free text such as a refusal reason, the secrets found in the arguments and any others."""
        if not text:
            return text
        for secret, marker in (self.secrets or {}).items():
            for spelling in _spellings(secret):
                text = text.replace(spelling, marker)
        return redactor.mask_text(text, "", [], {})


class Redactor:
    """Masks secrets under a key (so markers correlate within one audit log, and only there)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._clean: set[str] = set()
        """Short strings found to hold nothing to mask (bounded: cleared when it fills up)."""

    def marker(self, kind: str, secret: str) -> str:
        mac = hmac.new(self._key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]
        return f"[masked:{kind}:{mac}]"

    def redact(self, value: Any, paths: Sequence[tuple[str, ...]] = ()) -> Redaction:
        """Mask `value` (call arguments); `paths` are extra paths named by policy rules (`*` = any key).

        Object keys are masked by the same patterns as strings (a token used as a key), the structure
        kept. Objects and arrays nested deeper than `MAX_NESTING` levels are not stored: each becomes
        `TOO_DEEP` (listed as kind `too-deep`), so nothing deeper is walked, or written to the log.
        """
        if holds_more_than(value, MAX_VALUES):  # refused as it is: walking it all would hold up every call
            return Redaction({"arguments": TOO_MANY}, (Masked("arguments", "too-many"),))
        masked: list[Masked] = []
        secrets: dict[str, str] = {}
        result = self._walk(value, (), (), paths, masked, secrets, under_secret_key=False)
        if not masked:
            return Redaction(value)
        return Redaction(result, tuple(masked), secrets)

    def mask_at(self, value: Any, path: tuple[str, ...], paths: Sequence[tuple[str, ...]] = ()) -> Any:
        """`value` masked as `redact` masks it where it is in the arguments (`path`): to quote it in a reason."""
        under = any(names_secret(name) and not _MARKER.fullmatch(name) for name in path)
        return self._walk(value, path, path, paths, [], {}, under_secret_key=under)

    def _walk(
        self,
        value: Any,
        path: tuple[str, ...],
        shown: tuple[str, ...],
        paths: Sequence[tuple[str, ...]],
        masked: list[Masked],
        secrets: dict[str, str],
        *,
        under_secret_key: bool,
    ) -> Any:
        """`path` is where `value` is (what rules name); `shown` the same path with its keys masked (what is stored)."""
        if isinstance(value, str) and _MARKER.fullmatch(value):
            return value  # masked already (masking what was masked changes nothing)
        if paths and any(_matches(rule_path, path) for rule_path in paths):
            text = value if isinstance(value, str) else _encoded(value)
            masked.append(Masked(_dotted(shown), "policy"))
            marker = self.marker("policy", text)
            secrets[text] = marker
            return marker
        if isinstance(value, str):
            if under_secret_key and value:
                masked.append(Masked(_dotted(shown), "key-name"))
                marker = self.marker("key-name", value)
                secrets[value] = marker
                return marker
            return self.mask_text(value, _dotted(shown), masked, secrets)
        if isinstance(value, Mapping | list | tuple) and len(path) >= MAX_NESTING:
            masked.append(Masked(_dotted(shown), "too-deep"))
            return TOO_DEEP
        if isinstance(value, Mapping):
            walked = {}
            for key, item in value.items():
                name = str(key)
                found: list[Masked] = []
                label = self.mask_text(name, "", found, secrets)
                masked += [Masked(_dotted((*shown, label)), one.kind) for one in found]  # where the key was
                walked[label] = self._walk(
                    item,
                    (*path, name),
                    (*shown, label),
                    paths,
                    masked,
                    secrets,
                    under_secret_key=under_secret_key or (names_secret(name) and not _MARKER.fullmatch(name)),
                )
            return walked
        if isinstance(value, list | tuple):
            return [
                self._walk(
                    item,
                    (*path, str(index)),
                    (*shown, str(index)),
                    paths,
                    masked,
                    secrets,
                    under_secret_key=under_secret_key,
                )
                for index, item in enumerate(value)
            ]
        return value

    def mask_text(self, text: str, where: str, masked: list[Masked], secrets: dict[str, str]) -> str:
        """Mask every secret-looking part of one string (overlapping finds are masked once, as one)."""
        if text in self._clean or (len(text) < SHORTEST and _SHORT_HINTS.search(text) is None):
            return text
        spans: list[tuple[int, int, str]] = []
        for kind, pattern in PATTERNS:
            for match in pattern.finditer(text):
                group = "secret" if match.re.groupindex.get("secret") and match["secret"] is not None else 0
                spans.append((*match.span(group), kind))
        spans += _command_spans(text)
        if len(text) >= 20:
            spans += [(*match.span(), "high-entropy") for match in _TOKEN.finditer(text) if looks_random(match[0])]
        if not spans:
            if len(text) <= _REMEMBERED:
                if len(self._clean) >= 4096:
                    self._clean.clear()
                self._clean.add(text)
            return text
        if "[masked:" in text:  # already masked parts stay as they are
            markers = [match.span() for match in _MARKER.finditer(text)]
            spans = [span for span in spans if not any(span[0] < end and start < span[1] for start, end in markers)]
        spans.sort(key=lambda span: (span[0], -span[1], span[2] == "high-entropy"))  # a named kind wins
        pieces: list[str] = []
        end = 0
        merged: list[tuple[int, int, str]] = []
        for start, stop, kind in spans:
            if merged and start < merged[-1][1]:
                first, last, first_kind = merged[-1]
                merged[-1] = (first, max(last, stop), first_kind)
            else:
                merged.append((start, stop, kind))
        for start, stop, kind in merged:
            secret = text[start:stop]
            marker = self.marker(kind, secret)
            secrets[secret] = marker
            masked.append(Masked(where, kind))
            pieces += [text[end:start], marker]
            end = stop
        pieces.append(text[end:])
        return "".join(pieces)


def _command_spans(text: str) -> list[tuple[int, int, str]]:
    """Passwords given to a command's short options, each looked for only up to the end of that command
    (a newline, `;`, `|` or `&`, or the next such command): every character is scanned once."""
    if "-" not in text:
        return []
    found = list(_COMMAND.finditer(text))
    spans: list[tuple[int, int, str]] = []
    for index, command in enumerate(found):
        stop = found[index + 1].start() if index + 1 < len(found) else len(text)
        end = _COMMAND_END.search(text, command.end(), stop)
        tool = command["tool"]
        options = _OPTIONS["mysql" if tool.startswith(("mysql", "mariadb")) else tool]
        for match in options.finditer(text, command.end(), end.start() if end is not None else stop):
            spans.append((*match.span("secret"), "command-password"))
    return spans


@functools.lru_cache(maxsize=1024)
def names_secret(key: str) -> bool:
    """Whether an argument's name says its value is a secret (`password`, `apiKey`, `X-Api-Key`, ...)."""
    words = [word.lower() for word in _KEY_WORDS.findall(key)]
    if not words:
        return False
    if any(word in _SECRET_WORDS for word in words) or "".join(words) in _SECRET_WORDS:
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def looks_random(token: str) -> bool:
    """A long token of mixed letters and digits with the entropy of generated key material."""
    if len(token) < 20:
        return False
    classes = any(c.islower() for c in token) + any(c.isupper() for c in token) + any(c.isdigit() for c in token)
    if classes < 3:
        return False
    kinds = [_kind(c) for c in token if c.isalnum()]
    changes = sum(1 for one, two in itertools.pairwise(kinds) if one != two)
    if changes < 0.3 * len(kinds):
        return False  # words, dates, branch names: few switches between lower, upper and digits
    if sum(len(run) for run in _WORD_RUN.findall(token)) > 0.35 * len(kinds):
        return False  # camelCase identifiers: mostly runs of lower-case letters
    return _entropy(token) >= min(4.0, math.log2(len(token)) - 0.7)


def _kind(char: str) -> int:
    return 0 if char.islower() else 1 if char.isupper() else 2


def _entropy(text: str) -> float:
    size = len(text)
    return -sum(count / size * math.log2(count / size) for count in Counter(text).values())


def _matches(rule_path: tuple[str, ...], path: tuple[str, ...]) -> bool:
    return len(rule_path) == len(path) and all(want in ("*", got) for want, got in zip(rule_path, path, strict=True))


def _encoded(value: Any) -> str:
    """A value's canonical JSON text, whatever its depth (what a marker of a whole object is the hash of)."""
    return canonical_flat(value) if nests_deeper(value) else canonical_text(value)


def _spellings(secret: str) -> list[str]:
    """Every way a message may quote `secret`, longest first: as JSON writes it ('"', '\\' and control
    characters escaped; non-ASCII as is or escaped), as Python's `repr` writes it (a path message), as is."""
    spelled = {
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret, ensure_ascii=True)[1:-1],
        repr(secret)[1:-1],
        secret,
    }
    return sorted(spelled, key=len, reverse=True)


def _dotted(path: Iterable[str]) -> str:
    return ".".join(path)


def parse_mask_path(text: str) -> tuple[str, ...]:
    """`"connection.password"`, `"headers.*"`, `"items.*.token"` -> path segments."""
    parts = tuple(text.split("."))
    if not text or any(not part for part in parts):
        raise ValueError(
            f'expected a dotted argument path such as "connection.password" or "items.*.token", got {text!r}'
        )
    return parts
