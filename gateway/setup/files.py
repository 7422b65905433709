"""Changing a user's files safely: atomic replacement, a backup before any change, a diff to preview it.

Editors, agent clients and the gateway itself read these files at any moment, so a change is written
to a scratch file beside the target and renamed over it: a reader sees the old file or the new one,
never half of either. The replacement keeps the original's permission bits (client configuration
files often hold tokens and are private to their owner).
"""

from __future__ import annotations

import difflib
import shutil
from datetime import UTC, datetime
from pathlib import Path

from gateway.config.files import write_atomically as write_atomically


def backup(path: Path) -> Path | None:
    """Copy `path` to `NAME.bak-<UTC timestamp>` beside it (mode and times kept); `None` if it does not exist."""
    if not path.exists():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.bak-{stamp}-{counter}")
    shutil.copy2(path, target)
    return target


def unified_diff(path: Path, before: str | None, after: str) -> str:
    """The change from `before` (`None`: the file does not exist yet) to `after`, as a unified diff."""
    lines = difflib.unified_diff(
        (before or "").splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=str(path) if before is not None else "/dev/null",
        tofile=str(path),
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
