"""The error tree: every exception class the gateway defines lives in gateway/errors.py, drawn as it is."""

from __future__ import annotations

import ast
import builtins
import inspect
import re
from pathlib import Path

import gateway.errors as errors

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
_DRAWN = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)(?: \((?P<base>\w+)\))?\s")
_ALSO = re.compile(r"\(also an? (\w+)\)")


def _exception_names() -> set[str]:
    """The names of the stdlib exceptions and of the classes in errors.py: what a gateway class may derive from."""
    namespaces = {**vars(builtins), **vars(errors)}
    return {name for name, value in namespaces.items() if inspect.isclass(value) and issubclass(value, BaseException)}


def _classes_defined_under_gateway() -> dict[str, str]:
    """Each exception class defined in a gateway module (by its bases' names), to the module's path."""
    exceptions = _exception_names()
    found: dict[str, str] = {}
    changed = True
    while changed:  # a class whose base is another module's exception class is one too
        changed = False
        for path in sorted(GATEWAY.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef) or node.name in found:
                    continue
                bases = {base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases}
                if bases & exceptions or any(name.endswith(("Error", "Exception")) for name in bases):
                    found[node.name] = str(path.relative_to(GATEWAY.parent))
                    exceptions.add(node.name)
                    changed = True
    return found


def _tree() -> dict[str, tuple[str, set[str]]]:
    """The docstring's drawing: each class to its drawn parent and the stdlib bases its line names."""
    drawn: dict[str, tuple[str, set[str]]] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        if not line.startswith("    ") or not (match := _DRAWN.match(line[4:])):
            continue
        depth = len(match["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else (match["base"] or "Exception")
        drawn[match["name"]] = (parent, set(_ALSO.findall(line)))
        stack.append((depth, match["name"]))
    return drawn


def test_every_exception_class_is_defined_in_errors_py() -> None:
    elsewhere = {
        name: path
        for name, path in _classes_defined_under_gateway().items()
        if path != "gateway/errors.py" and not name.startswith("_")
    }
    assert elsewhere == {}, "define these in gateway/errors.py (and draw them in its docstring)"


def test_the_walk_finds_private_helpers_and_the_tree_itself() -> None:
    found = _classes_defined_under_gateway()
    assert found["_DuplicateKey"] == "gateway/setup/client_files.py"
    assert found["UpstreamTimeout"] == "gateway/errors.py"


def test_the_docstring_draws_every_class_under_its_real_parents() -> None:
    classes = {
        name: value
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == errors.__name__
    }
    drawn = _tree()
    assert set(drawn) == set(classes)
    for name, cls in classes.items():
        parent, also = drawn[name]
        bases = {base.__name__ for base in cls.__bases__}
        assert bases == {parent} | also, f"{name} is drawn under {parent} (and {also}), derives from {bases}"
        for stdlib in also | ({parent} - set(classes)):
            assert isinstance(getattr(builtins, stdlib, None), type), f"{name}: {stdlib} is not a stdlib exception"


def test_every_class_is_reachable_from_gateway_error_or_a_drawn_stdlib_root() -> None:
    drawn = _tree()
    roots = {name for name, (parent, _) in drawn.items() if parent not in drawn}
    assert roots == {"GatewayError", "ChannelError"}
    for name in drawn:
        cls = getattr(errors, name)
        assert any(issubclass(cls, getattr(errors, root)) for root in roots)


def test_channel_errors_stay_outside_what_is_reported_as_is() -> None:
    # A leaked channel error is an unexpected fault (logged, never sent with its text), not a message.
    for cls in (errors.RequestTimeout, errors.ChannelClosed, errors.ConnectionFailed):
        assert not issubclass(cls, errors.GatewayError)
    assert issubclass(errors.RemoteError, errors.ProtocolError)
    assert issubclass(errors.LockError, errors.ConfigError)
    assert issubclass(errors.InvalidUriTemplate, ValueError)
