"""Resource URIs in RFC 3986 normal form, so a rule matches a URI as the upstream will read it.

Two spellings of one resource (`file:///ws/%2Eenv`, `FILE://localhost/ws/./.env`, `file:///ws/a/../.env`)
are one URI here, `file:///ws/.env`: the gateway decides, records and forwards that form. Normalised
(RFC 3986, section 6.2.2, and RFC 8089 for `file`): the scheme and host lower-cased, percent-encodings
upper-cased and those of unreserved characters decoded, dot segments removed, `file://localhost/`
written `file:///`, the fragment dropped. Beyond the RFC, because upstreams decode before they split:
an encoded `/` (`%2F`) in a hierarchical path is a `/`, and in a `file` path so are a backslash and `%5C`,
repeated slashes are one and a trailing one is dropped. A path's case is kept (a rule for a
case-insensitive store says so itself).
"""

from __future__ import annotations

import re

_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<rest>.*)$", re.DOTALL)
_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})")
_ENCODED_SLASH = re.compile(r"%2F")
_FILE_SEPARATORS = re.compile(r"%5C")
_REPEATED = re.compile(r"/{2,}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normal_uri(uri: str) -> str:
    """`uri` in normal form; a string that is not a URI (no scheme) comes back with only its
    percent-encodings normalised."""
    match = _URI.match(uri)
    if match is None:
        return _percent(uri)
    scheme, rest = match["scheme"].lower(), match["rest"]
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?") if "?" in rest else (rest, "", None)
    authority = None
    path = rest
    if rest.startswith("//"):
        end = next((i for i in range(2, len(rest)) if rest[i] == "/"), len(rest))
        authority, path = rest[2:end], rest[end:]
    path = _percent(path)
    if authority is not None or path.startswith("/"):  # hierarchical; an opaque path is the scheme's own
        # An encoded separator is one to an upstream that decodes the path before it splits it.
        path = _ENCODED_SLASH.sub("/", path)
        if scheme == "file":
            path = _FILE_SEPARATORS.sub("/", path.replace("\\", "/"))
        path = _remove_dot_segments(path)
        if scheme == "file":
            path = _REPEATED.sub("/", path)
            if len(path) > 1:
                path = path.rstrip("/") or "/"
    if authority is not None:
        userinfo, at, host = authority.rpartition("@")
        host = _percent(host).lower()
        if scheme == "file" and host == "localhost":
            host = ""
        authority = f"{userinfo}{at}{host}"
    normal = f"{scheme}:" + (f"//{authority}" if authority is not None else "") + path
    if query is not None:
        normal += "?" + _percent(query)
    return normal  # a fragment is the client's own: no upstream reads it


def _percent(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        char = chr(int(match[1], 16))
        return char if char in _UNRESERVED else f"%{match[1].upper()}"

    return _ENCODED.sub(one, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986, section 5.2.4."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if output:
                output.pop()
        elif path == "/..":
            path = "/"
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end == -1 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)
