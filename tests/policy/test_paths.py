"""Declared path arguments: every spelling of one file reaches the rules, and the upstream, as one path."""

from __future__ import annotations

import shutil
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from gateway.calls import Effect
from gateway.errors import PolicyError
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from gateway.policy.lint import lint
from gateway.policy.paths import fold, globs_overlap, normalise_path
from tests.conftest import REPO

DECLARED = """
[[paths]]
tools = ["files__*"]
arguments = ["path", "paths", "source", "destination"]
root = "/ws"
"""

RULES = r"""
[[rule]]
id = "inside-ws"
tools = ["files__*"]
effect = "allow"
when = { properties = { path = { pattern = '^/ws(/|$)' }, paths = { pattern = '^/ws(/|$)' } } }

[[rule]]
id = "no-secrets"
tools = ["files__*"]
effect = "deny"
reason = "secret files stay off-limits"
when = { anyOf = [
    { required = ["path"], properties = { path = { "$ref" = "schemas/secret-file.json" } } },
    { required = ["paths"], properties = { paths = { "$ref" = "schemas/secret-file.json" } } },
] }
"""


def engine_for(tmp_path: Path, text: str, *, monitor_mode: bool = False) -> PolicyEngine:
    schemas = tmp_path / "schemas"
    schemas.mkdir(exist_ok=True)
    shutil.copy(REPO / "policies" / "schemas" / "secret-file.json", schemas)
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    return PolicyEngine(load_policies(tmp_path), monitor_mode=monitor_mode)


def decide(engine: PolicyEngine, arguments: dict[str, Any], tool: str = "files__read_text_file") -> Any:
    return engine.evaluate(tool, arguments, now=0.0)


@pytest.mark.parametrize(
    "spelling", ["/ws/.env", "/ws/.env/", "/ws/./.env", "/ws//.env", "/ws/x/../.env", ".env", "./.env", "x/../.env"]
)
def test_every_spelling_of_one_file_is_one_path(spelling: str) -> None:
    assert normalise_path(spelling, "/ws") == "/ws/.env"


@pytest.mark.parametrize(
    ("path", "normalised"),
    [("/", "/"), ("//", "/"), ("/ws/..", "/"), ("/ws/../etc/passwd", "/etc/passwd"), ("../etc", "/etc"), (".", "/ws")],
)
def test_dot_segments_resolve_lexically(path: str, normalised: str) -> None:
    assert normalise_path(path, "/ws") == normalised


@pytest.mark.parametrize(
    ("path", "root", "problem"),
    [
        (".env", None, "is relative ('.env') and its [[paths]] declaration has no root"),
        ("/..", None, "climbs above /"),
        ("/ws/../../etc", None, "climbs above /"),
        ("../../x", "/ws", "climbs above /"),
        ("/ws/.env\0.txt", "/ws", "holds a NUL character"),
        ("/ws/a\\..\\..\\.env", "/ws", "holds a backslash (a separator to some servers)"),
        ("", "/ws", "is empty"),
    ],
)
def test_paths_that_cannot_be_normalised(path: str, root: str | None, problem: str) -> None:
    with pytest.raises(ValueError, match="^" + problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        normalise_path(path, root)


def test_case_insensitive_paths_fold_case_and_unicode_normal_forms() -> None:
    composed, decomposed = "/WS/Caf\u00e9/.ENV", "/ws/CAFE\u0301/.env"
    assert unicodedata.is_normalized("NFD", decomposed) and composed != decomposed
    assert fold(normalise_path(composed, None)) == "/ws/caf\u00e9/.env"
    assert fold(normalise_path(decomposed, None)) == "/ws/caf\u00e9/.env"
    assert normalise_path(composed, None) == "/WS/Caf\u00e9/.ENV"  # normalising alone keeps the case


def test_rules_see_and_the_upstream_gets_the_normalised_form(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, DECLARED + RULES)
    for spelling in ("/ws/.env/", "/ws/./.env", "/ws//.env", "/ws/sub/../.env", ".env"):
        decision = decide(engine, {"path": spelling})
        assert (decision.effect, decision.rules) == (Effect.DENY, ("inside-ws", "no-secrets")), spelling
    allowed = decide(engine, {"path": "notes//a.txt", "head": 3})
    assert (allowed.effect, allowed.rules) == (Effect.ALLOW, ("inside-ws",))
    assert allowed.arguments == {"path": "/ws/notes/a.txt", "head": 3}
    assert decide(engine, {"path": "/ws/notes/a.txt"}).arguments is None  # already in its one form
    outside = decide(engine, {"path": "/ws/../etc/passwd"})
    assert outside.effect is Effect.DENY and "inside-ws" in outside.reason


def test_arrays_and_nested_arrays_of_paths(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, DECLARED + RULES)
    tool = "files__read_multiple_files"
    denied = decide(engine, {"paths": ["a.txt", "sub/../.env"]}, tool)
    assert denied.effect is Effect.DENY and "no-secrets" in denied.rules
    allowed = decide(engine, {"paths": ["a.txt", ["/ws//b.txt", "./c/"]]}, tool)
    assert allowed.effect is Effect.ALLOW
    assert allowed.arguments == {"paths": ["/ws/a.txt", ["/ws/b.txt", "/ws/c"]]}
    moved = decide(engine, {"source": "a", "destination": "/ws/b/./c/"}, "files__move_file")
    assert moved.arguments == {"source": "/ws/a", "destination": "/ws/b/c"}


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"path": 7}, "argument 'path' of 'files__read_text_file' is a declared path but is not a string"),
        ({"path": None}, "argument 'path' of 'files__read_text_file' is a declared path but is not a string"),
        ({"path": {"p": "/ws"}}, "argument 'path' of 'files__read_text_file' is a declared path but is not a string"),
        ({"paths": ["/ws/a", 1]}, "argument 'paths' of 'files__read_text_file' item 1 is a declared path but is not"),
        ({"path": "/ws/a\0"}, "argument 'path' of 'files__read_text_file' is a declared path that holds a NUL"),
        ({"path": "/ws/../../etc"}, "argument 'path' of 'files__read_text_file' is a declared path that climbs above"),
        (
            {"paths": [["/.."]]},
            "argument 'paths' of 'files__read_text_file' item 0 item 0 is a declared path that",
        ),
    ],
)
def test_a_declared_path_that_cannot_be_normalised_is_refused(
    tmp_path: Path, arguments: dict[str, Any], reason: str
) -> None:
    for monitor_mode in (False, True):
        decision = decide(
            engine_for(tmp_path, '[defaults]\neffect = "allow"\n' + DECLARED, monitor_mode=monitor_mode), arguments
        )
        assert decision.effect is Effect.DENY
        assert decision.reason.startswith(reason)
        assert decision.reason.endswith("; refused")


def test_arrays_nested_past_the_recursion_limit_are_refused_not_raised(tmp_path: Path) -> None:
    nested: list[Any] = ["/ws/a"]
    for _ in range(sys.getrecursionlimit() * 2):
        nested = [nested]
    decision = decide(engine_for(tmp_path, '[defaults]\neffect = "allow"\n' + DECLARED), {"paths": nested})
    assert decision.effect is Effect.DENY
    assert decision.reason == (
        "the declared paths of 'files__read_text_file' could not be normalised (RecursionError); refused to be safe"
    )


def test_without_a_root_a_relative_path_is_refused(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '[[paths]]\ntools = ["files__*"]\narguments = ["path"]\n' + RULES)
    assert decide(engine, {"path": "/ws/a.txt"}).effect is Effect.ALLOW
    relative = decide(engine, {"path": "a.txt"})
    assert relative.effect is Effect.DENY
    assert "is relative ('a.txt') and its [[paths]] declaration has no root" in relative.reason


def test_case_insensitive_declaration_folds_what_the_rules_see_and_forwards_the_case_as_written(
    tmp_path: Path,
) -> None:
    declared = DECLARED.replace('root = "/ws"', 'root = "/WS"\ncase = "insensitive"')
    engine = engine_for(tmp_path, declared + RULES)
    for spelling in ("/WS/.ENV", "/ws/.Env/", ".ENV", "sub/../.eNv", "/ws/SUB/../.ENV/"):
        denied = decide(engine, {"path": spelling})
        assert (denied.effect, denied.rules) == (Effect.DENY, ("inside-ws", "no-secrets")), spelling
    allowed = decide(engine, {"path": "Docs//CAFE\u0301.md"})
    assert (allowed.effect, allowed.rules) == (Effect.ALLOW, ("inside-ws",))
    assert allowed.arguments == {"path": "/WS/Docs/CAFE\u0301.md"}  # the server's file system folds it alike
    several = decide(engine, {"paths": ["/Ws/A.txt", ["b.TXT"]]}, "files__read_multiple_files")
    assert several.arguments == {"paths": ["/Ws/A.txt", ["/WS/b.TXT"]]}
    assert decide(engine, {"paths": ["/ws/a", "/WS/.Env"]}, "files__read_multiple_files").effect is Effect.DENY


def test_normalisation_happens_before_rewrites_and_under_the_default(tmp_path: Path) -> None:
    rewrite = '[[rule]]\nid = "tail"\ntools = ["files__*"]\neffect = "rewrite"\nset = { tail = 5 }\n'
    engine = engine_for(tmp_path, '[defaults]\neffect = "allow"\n' + DECLARED + rewrite)
    rewritten = decide(engine, {"path": "a//b"})
    assert (rewritten.effect, rewritten.arguments) == (Effect.REWRITE, {"path": "/ws/a/b", "tail": 5})
    assert decide(engine, {"path": "/ws/a/b", "tail": 5}).arguments is None
    by_default = decide(engine_for(tmp_path, '[defaults]\neffect = "allow"\n' + DECLARED), {"path": "a/"})
    assert (by_default.effect, by_default.rules, by_default.arguments) == (Effect.ALLOW, (), {"path": "/ws/a"})


def test_monitor_mode_forwards_the_normalised_form(tmp_path: Path) -> None:
    decision = decide(engine_for(tmp_path, DECLARED + RULES, monitor_mode=True), {"path": "/ws//.env"})
    assert (decision.effect, decision.would) == (Effect.ALLOW, Effect.DENY)
    assert decision.arguments == {"path": "/ws/.env"}
    rewrite = '[[rule]]\nid = "tail"\ntools = ["files__*"]\neffect = "rewrite"\nset = { tail = 5 }\n'
    engine = engine_for(
        tmp_path,
        DECLARED + RULES + rewrite + '[[rule]]\nid = "ask"\ntools = ["files__*"]\neffect = "ask"\n',
        monitor_mode=True,
    )
    asked = decide(engine, {"path": "/ws//a"})
    assert (asked.effect, asked.would, asked.arguments) == (Effect.REWRITE, Effect.ASK, {"path": "/ws/a", "tail": 5})


def test_undeclared_tools_arguments_and_resources_are_left_as_written(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, '[defaults]\neffect = "allow"\n' + DECLARED)
    assert decide(engine, {"pattern": "a//b", "path": "/ws/a"}, "files__search_files").arguments is None
    assert decide(engine, {"path": "a//b"}, "git__git_status").arguments is None
    assert decide(engine, {"uri": "file:///ws/a", "path": "a//b"}, "resource:file:///ws/a").arguments is None


def test_explain_and_evaluate_agree(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, DECLARED + RULES)
    decision, trace = engine.explain("files__read_text_file", {"path": "sub/../.env"}, now=0.0)
    assert decision == decide(engine, {"path": "sub/../.env"})
    assert ("no-secrets", "matches: deny") in trace


ONE = '[[paths]]\ntools = ["a__*"]\narguments = ["path"]\n'
LOAD_CASES = [
    pytest.param("[paths]\ntools = []\n", "p.toml: paths: must be an array of tables ([[paths]])", id="not-an-array"),
    pytest.param(
        ONE + 'folder = "/"\n',
        "p.toml: paths #1: folder: unknown key",
        id="key",
    ),
    pytest.param('[[paths]]\ntools = ["a__*"]\n', "paths #1: arguments: required key is missing", id="no-arguments"),
    pytest.param('[[paths]]\narguments = ["path"]\n', "paths #1: tools: required key is missing", id="no-tools"),
    pytest.param(
        '[[paths]]\ntools = []\narguments = ["path"]\n',
        "paths #1: tools: Tuple should have at least 1",
        id="empty",
    ),
    pytest.param('[[paths]]\ntools = [""]\narguments = ["path"]\n', "p.toml: paths #1: tools: empty entry", id="blank"),
    pytest.param(
        ONE + 'root = "ws"\n',
        "p.toml: paths #1: root: must be an absolute path, got 'ws'",
        id="relative-root",
    ),
    pytest.param(
        ONE + 'root = "/../ws"\n',
        "p.toml: paths #1: root: '/../ws' climbs above /",
        id="climbing-root",
    ),
    pytest.param(
        ONE + 'case = "folded"\n',
        "p.toml: paths #1: case: Input should be 'sensitive' or 'insensitive'",
        id="case",
    ),
]


@pytest.mark.parametrize(("text", "message"), LOAD_CASES)
def test_declaration_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{tmp_path / 'p.toml'}: paths")
    assert message in str(raised.value)


def test_conflicting_declarations_are_refused_at_load_naming_both_files(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[[paths]]\ntools = ["files__*"]\narguments = ["path"]\nroot = "/ws"\n')
    (tmp_path / "b.toml").write_text('[[paths]]\ntools = ["*__read_*"]\narguments = ["path", "x"]\nroot = "/srv"\n')
    with pytest.raises(PolicyError) as raised:
        load_policies(tmp_path)
    assert str(raised.value) == (
        f"{tmp_path / 'b.toml'}: paths: argument 'path' of tools '*__read_*' is also declared by a.toml "
        "(tools 'files__*') with a different root or case; declare it once"
    )
    (tmp_path / "b.toml").write_text('[[paths]]\ntools = ["*__read_*"]\narguments = ["path"]\nroot = "/ws/"\n')
    assert len(load_policies(tmp_path).paths.declarations) == 2  # the same root, spelled differently: agrees
    (tmp_path / "b.toml").write_text('[[paths]]\ntools = ["git__*"]\narguments = ["path"]\ncase = "insensitive"\n')
    assert len(load_policies(tmp_path).paths.declarations) == 2  # no tool is named by both


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("files__*", "*__read_file", True),
        ("files__read", "files__read", True),
        ("files__a", "files__b", False),
        ("f*", "g*", False),
        ("*a", "*b", False),
        ("a*b", "a*c", False),
        ("*", "x", True),
        ("files__read_?", "files__read_[xy]", True),
        ("files__read_[!x]", "files__read_x", False),
        ("files__read_[a-c]", "files__read_[c-f]", True),
        ("files__read_[a-b]", "files__read_[c-f]", False),
        ("a[", "a[", True),
    ],
)
def test_glob_overlap(first: str, second: str, overlap: bool) -> None:
    assert globs_overlap(first, second) is overlap
    assert globs_overlap(second, first) is overlap


def test_lint_warns_of_a_declaration_that_names_no_tool_or_no_argument_of_its_tools(tmp_path: Path) -> None:
    text = '[[paths]]\ntools = ["files__*", "fils__*"]\narguments = ["path", "file_path"]\nroot = "/ws"\n'
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    assert lint(load_policies(tmp_path), {"files__read_text_file": schema, "git__git_status": {}}) == [
        "p.toml: paths: tools: 'fils__*' matches no exposed tool",
        "p.toml: paths: arguments: 'file_path' is an argument of none of the tools it names",
    ]
