"""Fuzzing with Hypothesis, bounded for CI.

Every test here is marked `fuzz`. `MCP_ARMOR_FUZZ_EXAMPLES` sets how many examples each property tries
(default 300). A failure prints the smallest failing example and a `@reproduce_failure` line to paste
above the test, and is kept in `.hypothesis/` so the next run tries it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

settings.register_profile(
    "mcp-armor",
    max_examples=int(os.environ.get("MCP_ARMOR_FUZZ_EXAMPLES", "300")),
    deadline=None,
    print_blob=True,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(Path(__file__).resolve().parents[2] / ".hypothesis" / "examples"),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("mcp-armor")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.fuzz)
