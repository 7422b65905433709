"""Resource URIs in RFC 3986 normal form: every spelling of one resource is one URI."""

from __future__ import annotations

import pytest

from gateway.catalog.uri_template import UriTemplate
from gateway.catalog.uris import normal_uri


@pytest.mark.parametrize(
    ("spelt", "normal"),
    [
        ("file:///ws/%2Eenv", "file:///ws/.env"),
        ("file:///ws/%2e%65nv", "file:///ws/.env"),
        ("FILE://localhost/ws/./.env", "file:///ws/.env"),
        ("file:///ws/a/../.env", "file:///ws/.env"),
        ("file:///ws/a/b/../../.env", "file:///ws/.env"),
        ("file:///../../etc/passwd", "file:///etc/passwd"),
        ("file:///ws/%7euser", "file:///ws/~user"),
        ("HTTP://Example.COM/a/%c3%A9?q=%7e#F", "http://example.com/a/%C3%A9?q=~"),
        ("mem:/a/./b", "mem:/a/b"),
        ("file:///ws/..%2F..%2Fetc%2Fpasswd", "file:///etc/passwd"),  # decoded before it is split
        ("toolbox://notes/%2Fsecret", "toolbox://notes//secret"),
        ("file:///ws//.env/", "file:///ws/.env"),
        ("file:///ws\\.env", "file:///ws/.env"),
        ("file:///ws%5C.env", "file:///ws/.env"),
        ("file:///ws/.env#f", "file:///ws/.env"),
    ],
)
def test_spellings_of_one_resource_are_one_uri(spelt: str, normal: str) -> None:
    assert normal_uri(spelt) == normal
    assert normal_uri(normal) == normal  # idempotent


@pytest.mark.parametrize(
    "kept",
    [
        "file:///Ws/Read.ME",  # a path's case is the store's business
        "docs:readme/../x",  # an opaque path is the scheme's own
        "toolbox://notes/x",
        "file:///ws/.env?x",  # the query is the upstream's to read
        "http://example.com/a//b/",  # repeated and trailing slashes mean something beyond file
    ],
)
def test_what_normal_form_does_not_touch(kept: str) -> None:
    assert normal_uri(kept) == kept


def test_a_template_gives_the_decoded_values_of_its_lone_variables() -> None:
    assert UriTemplate.parse("toolbox://notes/{name}").variables("toolbox://notes/a%20b") == {"name": "a b"}
    assert UriTemplate.parse("file:///{+path}").variables("file:///ws/.env") == {"path": "ws/.env"}
    assert UriTemplate.parse("x://{a}/{b}{?q}").variables("x://1/2?q=3") == {"a": "1", "b": "2"}
    assert UriTemplate.parse("x://{a,b}").variables("x://1,2") == {}  # a list of variables: matched, not split
    assert UriTemplate.parse("x://{a}").variables("y://1") is None
