"""Changing a user's files safely: atomic replacement, a backup before any change, a diff to preview it.

Editors, agent clients and the gateway itself read these files at any moment, so a change is written
to a scratch file beside the target and renamed over it: a reader sees the old file or the new one,
never half of either. The replacement keeps the original's permission bits (client configuration
files often hold tokens and are private to their owner).
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace (or create) `path` with `text`, keeping the existing file's mode; parents are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode: int | None = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = None
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(scratch, mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(scratch, 0o666 & ~umask)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


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
