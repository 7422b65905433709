"""`mcp-armor audit sessions | show | tail | verify | export`: reading the audit log, never writing it."""

from __future__ import annotations

import json
import re
import time
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.audit_journal import open_settled
from gateway.audit_store import FIELDS, AuditStore, Filters, iso_utc
from gateway.cli.common import print_table
from gateway.config import Config, parse_duration
from gateway.errors import GatewayError

FOLLOW_POLL = 0.25
_HEAD = ("seq", *FIELDS)
_ANCHOR = re.compile(r"^(\d+):([0-9a-f]{64})$")


def parse_since(text: str) -> str:
    """`"15m"` / `"2h"` (that long ago) or an ISO 8601 date or time -> the log's UTC time format."""
    try:
        moment = datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise GatewayError(
                f'--since: expected a duration ("15m", "2h") or an ISO 8601 time ("2026-11-23T10:00Z"), got {text!r}'
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return iso_utc(moment)


def sessions(config: Config, filters: Filters, as_json: bool) -> int:
    with _reader(config) as store:
        rows = store.sessions(filters)
    if as_json:
        print(json.dumps(rows))
        return 0
    table = [
        (
            row["session_id"],
            row["client"] or "?",
            row["transport"] or "?",
            row["start"],
            row["end"] or "(open)",
            row["calls"],
            row["refusals"],
        )
        for row in rows
    ]
    print_table(("SESSION", "CLIENT", "TRANSPORT", "START", "END", "CALLS", "REFUSED"), table, empty="(no sessions)")
    return 0


def show(config: Config, session: str, filters: Filters, as_json: bool) -> int:
    with _reader(config) as store:
        session_id = _resolve_session(store, session)
        events = list(store.events(replace(filters, session=session_id)))
    if as_json:
        for record in events:
            print(json.dumps(record))
        return 0
    print_table(("SEQ", "TIME", "KIND", "TOOL", "DECISION", "RULES", "TOOK", "DETAIL"), [_row(e) for e in events])
    return 0


def tail(config: Config, filters: Filters, lines: int, follow: bool, as_json: bool) -> int:
    """The last events, then (with `follow`) every new one as it is committed, until interrupted."""
    with _reader(config) as store:
        head = store.last_seq()
        last = _print_events(store, filters, as_json, 0, newest=lines) if lines else 0
        last = last or head
        while follow:
            time.sleep(FOLLOW_POLL)
            last = _print_events(store, replace(filters, after_seq=last), as_json, last)
    return 0


def verify(config: Config, anchors: list[str], as_json: bool) -> int:
    parsed = []
    for anchor in anchors:
        match = _ANCHOR.match(anchor)
        if match is None:
            raise GatewayError(f"--anchor: expected SEQ:HASH (as printed by 'audit verify'), got {anchor!r}")
        parsed.append((int(match[1]), match[2]))
    with _reader(config) as store:
        result = store.verify(parsed)
    problem = result.problem
    if as_json:
        report: dict[str, Any] = {"ok": problem is None, "events": result.events, "head": result.head_seq}
        report["head_hash"] = result.head_hash
        if problem is not None:
            report["first_bad_seq"], report["problem"] = problem.seq, problem.what
        print(json.dumps(report))
    elif problem is None:
        print(f"ok: {result.events} events, chain intact; head {result.head_seq}:{result.head_hash}")
    else:
        print(f"broken at seq {problem.seq}: {problem.what}")
        print(f"({result.events} events before it verified)")
    return 0 if problem is None else 1


def export(config: Config, filters: Filters) -> int:
    with _reader(config) as store:
        for record in store.events(filters):
            print(json.dumps(record, ensure_ascii=False))
    return 0


def _reader(config: Config) -> closing[AuditStore]:
    return closing(open_settled(config.audit_path))


def _resolve_session(store: AuditStore, prefix: str) -> str:
    matches = [row["session_id"] for row in store.sessions() if row["session_id"].startswith(prefix)]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise GatewayError(f"no session {prefix!r} in {store.path} (see 'mcp-armor audit sessions')")
    raise GatewayError(f"session {prefix!r} is ambiguous: it begins {len(matches)} session ids; give more of it")


def _print_events(store: AuditStore, filters: Filters, as_json: bool, last: int, newest: int | None = None) -> int:
    for record in store.events(filters, newest=newest):
        last = record["seq"]
        if as_json:
            print(json.dumps(record), flush=True)
        else:
            seq, ts, kind, tool, decision, rules, took, detail = _row(record)
            session = (record.get("session_id") or "-")[:8]
            print(
                f"{seq} {ts} {session} {kind} {tool} {decision} {rules} {took} {detail}".replace("  ", " "), flush=True
            )
    return last


def _row(record: dict[str, Any]) -> tuple[str, ...]:
    kind = record["kind"]
    decision = record.get("decision") or record.get("outcome") or ""
    if record.get("would"):
        decision += f" (would {record['would']})"
    took = f"{record['duration_ms']:.1f}ms" if record.get("duration_ms") is not None else ""
    detail = record.get("reason") or ""
    if kind == "session_start":
        detail = (
            f"{record.get('client_name') or '?'} {record.get('client_version') or ''} over {record.get('transport')}"
        )
    elif kind == "catalog":
        detail = f"{record.get('change')} {str(record.get('tool_digest'))[:12]}"
    elif kind == "policy_reload" and record.get("policy_revision"):
        detail = f"revision {record['policy_revision']}: {detail}"
    elif kind == "decision" and record.get("masked"):
        detail += f" (masked: {', '.join(item['path'] or '?' for item in record['masked'])})"
    return (
        str(record["seq"]),
        record["ts"],
        kind,
        record.get("tool") or record.get("upstream") or "",
        decision,
        ",".join(record.get("rules") or []),
        took,
        detail,
    )
