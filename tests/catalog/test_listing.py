"""Naming, normalisation and merging of upstream listings."""

from __future__ import annotations

import pytest

from gateway.catalog.listing import EXPOSED_NAME, Catalog, Naming, exposed_name, normalise_listing


@pytest.mark.parametrize(
    ("upstream", "tool", "expected"),
    [
        pytest.param("files", "read_file", "files__read_file", id="plain"),
        pytest.param("git", "git.log", "git__git.log", id="dots-kept"),
    ],
)
def test_exposed_name_kept_when_safe(upstream: str, tool: str, expected: str) -> None:
    assert exposed_name(upstream, tool, "__") == expected


@pytest.mark.parametrize(
    "tool",
    [
        pytest.param("has space/and slash", id="unsafe-characters"),
        pytest.param("x" * 80, id="too-long"),
        pytest.param("ünïcode", id="non-ascii"),
    ],
)
def test_exposed_name_shortened_deterministically(tool: str) -> None:
    name = exposed_name("files", tool, "__")
    assert EXPOSED_NAME.match(name)
    assert name == exposed_name("files", tool, "__")
    assert name != exposed_name("files", tool + "2", "__")


def test_long_names_sharing_a_prefix_stay_distinct() -> None:
    first = exposed_name("up", "a" * 70 + "one", "__")
    second = exposed_name("up", "a" * 70 + "two", "__")
    assert first != second
    assert len(first) == len(second) == 64


def test_sloppy_tools_are_repaired_or_dropped_with_a_note() -> None:
    listing = normalise_listing(
        "sloppy",
        tools=[
            {"name": "loose"},
            {"name": "empty", "inputSchema": {}},
            {"name": "string", "inputSchema": {"type": "string"}},
            {"name": "badschema", "inputSchema": {"type": "object", "properties": {"x": {"type": "nope"}}}},
            {"name": "badoutput", "inputSchema": {"type": "object"}, "outputSchema": {"type": "array"}},
            {"description": "nameless"},
            "not even an object",
        ],
    )
    names = [tool.name for tool in listing.tools]
    assert names == ["loose", "empty", "badoutput"]
    for tool in listing.tools:
        assert tool.definition["inputSchema"]["type"] == "object"
    assert "outputSchema" not in listing.tools[2].definition
    problems = "\n".join(listing.problems)
    assert "tool 'string' dropped: inputSchema must describe an object" in problems
    assert "tool 'badschema' dropped: inputSchema is not a valid JSON Schema" in problems
    assert "tool 'badoutput': outputSchema removed" in problems
    assert "tool (unnamed) dropped" in problems


def test_schema_formats_are_asserted() -> None:
    listing = normalise_listing(
        "up", tools=[{"name": "t", "inputSchema": {"type": "object", "properties": {"d": {"format": "date"}}}}]
    )
    validator = listing.tools[0].validator
    assert validator.is_valid({"d": "2026-11-23"})
    assert not validator.is_valid({"d": "yesterday"})


def test_collisions_withhold_both_sides_and_name_them() -> None:
    first = normalise_listing("a", tools=[{"name": "b__c"}, {"name": "Same"}])
    second = normalise_listing("a__b", tools=[{"name": "c"}])
    third = normalise_listing("x", tools=[{"name": "ok"}])
    # "a" and "a__b" are refused by the config loader; a catalogue built anyway must still not pick a winner.
    catalog = Catalog.build([first, second, third], "__")
    assert "a__b__c" not in catalog.tools
    assert set(catalog.tools) == {"a__Same", "x__ok"}
    assert catalog.problems == (
        "tools 'a'.'b__c' and 'a__b'.'c' would be exposed as 'a__b__c'; none of them is exposed",
    )


def test_names_differing_only_in_case_collide() -> None:
    listing = normalise_listing("up", tools=[{"name": "Read"}, {"name": "read"}])
    catalog = Catalog.build([listing], "__")
    assert catalog.tools == {}
    assert "would be exposed as 'up__Read'" in catalog.problems[0]


def test_resources_route_by_uri_and_template() -> None:
    one = normalise_listing(
        "one",
        resources=[{"uri": "file:///a", "name": "a"}],
        templates=[{"uriTemplate": "one://items/{id}", "name": "item"}],
    )
    two = normalise_listing("two", resources=[{"uri": "file:///b", "name": "b"}])
    catalog = Catalog.build([one, two], "__")
    assert catalog.resource_upstream("file:///a") == "one"
    assert catalog.resource_upstream("file:///b") == "two"
    assert catalog.resource_upstream("one://items/42") == "one"
    assert catalog.resource_upstream("elsewhere://x") is None


def test_prompts_are_prefixed() -> None:
    listing = normalise_listing("up", prompts=[{"name": "greet"}])
    catalog = Catalog.build([listing], "__")
    assert catalog.prompts["up__greet"].upstream_name == "greet"
    assert catalog.prompts["up__greet"].model.name == "up__greet"


def test_an_unprefixed_upstream_exposes_its_names_as_they_are() -> None:
    bare = normalise_listing("bare", tools=[{"name": "read"}], prompts=[{"name": "greet"}])
    other = normalise_listing("other", tools=[{"name": "read"}])
    catalog = Catalog.build([bare, other], Naming("__", {"bare": "", "other": "o"}))
    assert set(catalog.tools) == {"read", "o__read"}
    assert (catalog.tools["read"].upstream, catalog.tools["read"].upstream_name) == ("bare", "read")
    assert catalog.tools["o__read"].upstream == "other"
    assert catalog.prompts["greet"].upstream == "bare"
    assert Naming("__", {"bare": ""}).written("bare", "read") == "read"
    assert Naming("__", {"bare": ""}).written("x", "read") == "x__read"


def test_names_an_unprefixed_upstream_shares_with_another_are_withheld_on_both_sides() -> None:
    bare = normalise_listing("bare", tools=[{"name": "x__y"}, {"name": "Mine"}], prompts=[{"name": "greet"}])
    x = normalise_listing("x", tools=[{"name": "y"}])
    also = normalise_listing("also", tools=[{"name": "mine"}], prompts=[{"name": "greet"}])
    catalog = Catalog.build([bare, x, also], Naming("__", {"bare": "", "also": ""}))
    assert catalog.tools == {}
    assert catalog.prompts == {}
    assert set(catalog.problems) == {
        "tools 'bare'.'x__y' and 'x'.'y' would be exposed as 'x__y'; none of them is exposed",
        "tools 'bare'.'Mine' and 'also'.'mine' would be exposed as 'Mine'; none of them is exposed",
        "prompts 'bare'.'greet' and 'also'.'greet' would be exposed as 'greet'; none of them is exposed",
    }
