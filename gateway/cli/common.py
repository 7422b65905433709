"""What the commands share: printing tables, text an agent or upstream wrote made safe for a terminal, and
warnings more than one command gives."""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from gateway.config.models import Config, parse_duration
from gateway.config.packages import unpinned_package
from gateway.errors import GatewayError


def visible(text: str) -> str:
    """`text` with every control and format character (escape sequences, line breaks, bidi overrides,
    zero-width characters) written out as an escape, so what an agent or an upstream chose (tool
    names, arguments, reasons, client names) cannot move the cursor, recolour or reorder a terminal."""
    if text.isprintable():
        return text
    return "".join(_escaped(char) if unicodedata.category(char) in _HIDDEN else char for char in text)


_HIDDEN = ("Cc", "Cf", "Zl", "Zp")
"""Control, format (bidi, zero-width), line and paragraph separator characters."""


def _escaped(char: str) -> str:
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str = "(none)") -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    if not rows:
        print(empty)
        return
    cells = [[("" if cell is None else visible(str(cell))) for cell in row] for row in rows]
    widths = [max(len(header), *(len(row[index]) for row in cells)) for index, header in enumerate(headers)]
    for row in [list(headers), *cells]:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        print("  ".join([*padded, row[-1]]).rstrip())


def note(text: str) -> None:
    print(f"mcp-armor: note: {text}", file=sys.stderr)


def package_warnings(config: Config) -> list[str]:
    """One line per command upstream that fetches a package with its version left open."""
    lines = []
    for spec in config.enabled_upstreams():
        found = unpinned_package(spec.command, spec.args) if spec.command is not None else None
        if found is not None:
            package, pinned = found
            lines.append(
                f"upstream '{spec.name}' runs package '{package}' with no exact version: its code can change "
                f"under the pins without any definition changing; name it as {pinned}"
            )
    return lines


def parse_moment(text: str, option: str, examples: str, *, ahead: bool) -> datetime:
    """A duration (`"15m"`, `"2h"`, `"30d"`: that long ago, or from now when `ahead`) or an ISO 8601 date
    or time (UTC unless it says otherwise); `GatewayError` naming `option` otherwise."""
    try:
        span = timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    except OverflowError:
        raise GatewayError(f"{option}: {text!r} is further than a date can be") from None
    else:
        try:
            return datetime.now(UTC) + span if ahead else datetime.now(UTC) - span
        except OverflowError:
            raise GatewayError(f"{option}: {text!r} is further than a date can be") from None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise GatewayError(
            f'{option}: expected a duration ({examples}) or an ISO 8601 time ("2026-11-23T10:00Z"), got {text!r}'
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
