"""What the installed distribution says about itself."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import gateway


def test_version_is_the_installed_distributions() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == f"mcp-armor {version('mcp-armor')}"
    assert version("mcp-armor") == gateway.__version__  # pyproject takes its version from the package
