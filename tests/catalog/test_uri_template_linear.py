"""Matching a URI against an upstream's template takes linear time, whatever the template and the URI."""

from __future__ import annotations

import pytest

from gateway.catalog.uri_template import UriTemplate


@pytest.mark.timeout(20)
def test_a_template_of_many_reserved_variables_is_matched_in_linear_time() -> None:
    # Python's `re` backtracks through every split of the URI among the variables: O(n^4) here, 36 s at 400.
    template = UriTemplate.parse("x://{+a}{+b}{+c}{+d}Z")
    assert not template.match("x://" + "a" * 4000)
    assert template.variables("x://ab/cZ") == {"a": "ab/c", "b": "", "c": "", "d": ""}


def test_a_uri_holding_a_lone_surrogate_matches_no_template() -> None:
    assert not UriTemplate.parse("x://{+path}").match("x://a\udcff")
    assert UriTemplate.parse("x://{+path}").variables("x://a\udcff") is None
