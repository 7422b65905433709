"""`mcp-armor audit sessions | show | tail | verify | export`: reading the audit log, never writing it."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import replace
from typing import Any

from gateway.audit.anchor import Anchoring, default_anchor_file, last_anchor, read_anchors
from gateway.audit.journal import open_settled
from gateway.audit.keys import read_keys
from gateway.audit.logs import AuditLog, open_reading
from gateway.audit.queries import Filters
from gateway.audit.shared import SharedAuditStore, copy_chain
from gateway.audit.store import FIELDS, KINDS, iso_utc
from gateway.calls import Answer
from gateway.cli.common import parse_moment, print_table, visible
from gateway.config.models import IN_MEMORY, Config
from gateway.errors import EmptyLog, GatewayError, NoLogYet
from gateway.store.postgres import Database, shown

FOLLOW_POLL = 0.25
SCHEMA_WAIT = 5.0
"""How long `tail -f` waits for the schema of a log file that exists without one."""
_NAMED = 3
"""A folded catalogue change of at most this many tools names them."""
_HEAD = ("seq", *FIELDS)
_ANCHOR = re.compile(r"^(\d+):([0-9a-f]{64})$")


def parse_since(text: str) -> str:
    """`"15m"` / `"2h"` (that long ago) or an ISO 8601 date or time -> the log's UTC time format."""
    return iso_utc(parse_moment(text, "--since", '"15m", "2h"', ahead=False))


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
            row["principal"] or "-",
            row["transport"] or "?",
            row["start"],
            row["end"] or "(open)",
            row["calls"],
            row["refusals"],
        )
        for row in rows
    ]
    headings = ("SESSION", "CLIENT", "PRINCIPAL", "TRANSPORT", "START", "END", "CALLS", "REFUSED")
    print_table(headings, table, empty="(no sessions)")
    return 0


def show(config: Config, session: str, filters: Filters, as_json: bool) -> int:
    with _reader(config) as store:
        info = _resolve_session(store, session)
        events = list(store.events(replace(filters, session=info["session_id"])))
    if as_json:
        for record in events:
            print(json.dumps(record))
        return 0
    asker = info["client"] or "an unnamed client"
    if info["principal"]:
        asker += f" ({info['principal']})"
    outcomes = {record["call_id"]: record["outcome"] for record in events if record["kind"] == "outcome"}
    rows = [
        (*row[:5], _approval(record, outcomes.get(record["call_id"]), asker), *row[5:])
        for record in events
        for row in [_row(record)]
    ]
    print_table(("SEQ", "TIME", "KIND", "TOOL", "DECISION", "APPROVAL", "RULES", "TOOK", "DETAIL"), rows)
    return 0


def _approval(record: dict[str, Any], outcome: str | None, asker: str) -> str:
    """What became of the person's approval an `ask` decision needed; `outcome` is the call's, `asker` the
    session's client."""
    approval, request = record.get("approval"), record.get("approval_request")
    if record["kind"] != "decision" or (approval is None and request is None):
        return ""
    if isinstance(request, dict):  # what the person answered, whatever then became of the call
        answer, through = request.get("answer"), request.get("through")
        if answer == Answer.GRANTED and through in ("cli", "console"):  # decided in the approval queue
            return f"granted by {request.get('by') or '?'} ({through})"
        if answer == Answer.GRANTED:
            return f"granted by a person at {asker}"
        if answer == Answer.PENDING:  # a 2026-07-28 round trip: the client's retry is a call of its own
            return f"asked a person at {asker}"
        return f"refused: {request.get('reason') or answer}"
    # Recorded before `approval_request` was: "granted" said only that the call went on past its approval.
    if approval == "granted":
        return f"granted by a person at {asker}"
    if outcome == "input_required":
        return f"asked a person at {asker}"
    reason = str(record.get("reason") or "")
    # A refusal's reason is the policy's reason, then why no approval came: "...; the person declined it".
    return f"refused: {reason.rpartition('; ')[2]}"


def tail(config: Config, filters: Filters, lines: int, follow: bool, as_json: bool) -> int:
    """The last events, then (with `follow`) every new one as it is committed, until interrupted.

    Unless `--kind` or `--json` asks for events as they are, a run of catalogue events of one upstream
    (the tools it offers changed) is one line: a gateway starting records one event per tool.
    """
    if lines < 0:
        raise GatewayError(f"-n: expected how many lines to show (0 or more), got {lines}")
    fold = not as_json and filters.kinds is None
    store, created = _following(config) if follow else (open_reading(config), False)
    with closing(store):
        head = store.last_seq()
        count = head if created else lines  # a log created while waiting: every event in it is new
        last = _show_latest(store, filters, count, as_json, fold) if count else 0
        last = last or head
        shown = _Lines(as_json, fold)
        while follow:
            time.sleep(FOLLOW_POLL)
            records = list(store.events(replace(filters, after_seq=last)))
            for record in records:
                _emit(shown.add(record))
            if records:
                last = records[-1]["seq"]
            else:
                _emit(shown.flush())  # a quiet moment: the catalogue change under way has been recorded
    return 0


def parse_kinds(values: list[str] | None) -> tuple[str, ...] | None:
    """`--kind` values (repeated, or comma-separated) -> the kinds asked for, each one the log knows."""
    kinds = tuple(dict.fromkeys(kind.strip() for value in values or () for kind in value.split(",")))
    if "" in kinds:  # never read as "every kind"
        raise GatewayError(f"--kind: empty kind (one of: {', '.join(KINDS)})")
    for kind in kinds:
        if kind not in KINDS:
            raise GatewayError(f"--kind: unknown kind {kind!r} (one of: {', '.join(KINDS)})")
    return kinds or None


def _following(config: Config) -> tuple[AuditLog, bool]:
    """The log to follow, waiting for it to be created if there is none yet; whether it was waited for.

    It waits as long as there is no file. A file without the log's schema is given `SCHEMA_WAIT`
    seconds (a gateway creates the file, then the schema in its first transaction) and is then
    reported as empty: a log emptied after the fact must not look like one still to come.
    """
    if config.gateway.store is not None:
        return open_reading(config), False
    path = config.audit_path
    if str(path) == IN_MEMORY:
        raise GatewayError('the audit log is kept in memory (audit = ":memory:"): there is no file to follow')
    waited, schemaless_until = False, None
    while True:
        try:
            return open_settled(path), waited
        except NoLogYet:
            if not waited:
                print(f"mcp-armor: waiting for {path} (there is no audit log yet)", file=sys.stderr, flush=True)
            schemaless_until = None
        except EmptyLog:
            schemaless_until = schemaless_until or time.monotonic() + SCHEMA_WAIT
            if time.monotonic() > schemaless_until:
                raise
        waited = True
        time.sleep(FOLLOW_POLL)


def _show_latest(store: AuditLog, filters: Filters, lines: int, as_json: bool, fold: bool) -> int:
    """Print the last `lines` lines (folded lines count once); the sequence number of the last event shown."""
    fetch = lines
    while True:
        records = list(store.events(filters, newest=fetch))
        texts = _Lines(as_json, fold).all(records)
        # More lines than asked for: the first, perhaps a fold cut short, is left out. Fewer: look further back.
        if len(texts) > lines or len(records) < fetch:
            break
        fetch *= 4
    _emit(texts[-lines:])
    return int(records[-1]["seq"]) if records else 0


def _emit(texts: list[str]) -> None:
    for text in texts:
        print(visible(text), flush=True)


class _Lines:
    """Events as `tail` prints them: JSON, or a line each, with (when folding) a run of catalogue events of
    one upstream held back and printed as one line once the run ends."""

    def __init__(self, as_json: bool, fold: bool) -> None:
        self._json = as_json
        self._fold = fold
        self._run: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> list[str]:
        if self._fold and record["kind"] == "catalog":
            ended = self.flush() if self._run and self._run[-1].get("upstream") != record.get("upstream") else []
            self._run.append(record)
            return ended
        return [*self.flush(), self._line(record)]

    def flush(self) -> list[str]:
        run, self._run = self._run, []
        return [_folded(run)] if run else []

    def all(self, records: list[dict[str, Any]]) -> list[str]:
        return [text for record in records for text in self.add(record)] + self.flush()

    def _line(self, record: dict[str, Any]) -> str:
        if self._json:
            return json.dumps(record)
        seq, ts, kind, tool, decision, rules, took, detail = _row(record)
        session = (record.get("session_id") or "-")[:8]
        return f"{seq} {ts} {session} {kind} {tool} {decision} {rules} {took} {detail}".replace("  ", " ")


def _folded(run: list[dict[str, Any]]) -> str:
    """One line for a run of catalogue events of one upstream: `catalog: git +26 tools, -3 tools, ~2 changed`."""
    counts = Counter(record.get("change") for record in run)
    parts = [
        f"{sign}{counts[change]} {'changed' if change == 'changed' else 'tool' if counts[change] == 1 else 'tools'}"
        for change, sign in (("added", "+"), ("removed", "-"), ("changed", "~"))
        if counts[change]
    ]
    seqs = f"{run[0]['seq']}" + (f"-{run[-1]['seq']}" if len(run) > 1 else "")
    names = f" ({', '.join(str(record.get('tool')) for record in run)})" if len(run) <= _NAMED else ""
    return f"{seqs} {run[0]['ts']} - catalog: {run[0].get('upstream') or '?'} {', '.join(parts)}{names}"


def verify(config: Config, anchors: list[str], as_json: bool) -> int:
    """Walk the chain, holding it to the anchors given and to those the gateway wrote (`audit_anchor`)."""
    parsed = []
    for anchor in anchors:
        match = _ANCHOR.match(anchor)
        if match is None:
            raise GatewayError(f"--anchor: expected SEQ:HASH (as printed by 'audit verify'), got {anchor!r}")
        parsed.append((int(match[1]), match[2]))
    anchoring = Anchoring.of(config)
    written, unreadable = read_anchors(anchoring.file, anchoring.log) if anchoring.file else ([], 0)
    if unreadable:
        print(f"mcp-armor: {anchoring.file}: {unreadable} lines are not anchors; ignored", file=sys.stderr)
    with _reader(config) as store:
        result = store.verify(parsed + written)
    problem = result.problem
    anchored = last_anchor(parsed + written)
    if as_json:
        report: dict[str, Any] = {"ok": problem is None, "events": result.events, "head": result.head_seq}
        report["head_hash"] = result.head_hash
        report["anchored_seq"], report["anchor_file"] = anchored, str(anchoring.file) if anchoring.file else None
        if problem is not None:
            report["first_bad_seq"], report["problem"] = problem.seq, problem.what
        print(json.dumps(report))
    elif problem is None:
        print(f"ok: {result.events} events, chain intact; head {result.head_seq}:{result.head_hash}")
        if anchored:
            print(f"anchored up to seq {anchored} ({len(parsed + written)} anchors)")
        else:
            print("no anchor yet: events removed from the end, with the head rewritten, would not be noticed")
    else:
        print(f"broken at seq {problem.seq}: {problem.what}")
        print(f"({result.events} events before it verified)")
        if "anchored" in problem.what and written:  # a log replaced on purpose: its old anchors are in the way
            print(
                f"(anchors read from {anchoring.file}: if this log was deleted and started again on purpose, "
                "move that file aside)"
            )
    return 0 if problem is None else 1


def migrate(config: Config, to: str) -> int:
    """Copy the config's SQLite log into the store at `to`, so the chain verifies there as it did here."""
    if config.gateway.store is not None:
        raise GatewayError(f"this config's audit log is in the store already ({shown(config.gateway.store)})")
    if str(config.audit_path) == IN_MEMORY:
        raise GatewayError('the audit log is kept in memory (audit = ":memory:"): there is nothing to copy')
    target = Database(to)
    with closing(open_settled(config.audit_path)) as source:
        checked = source.verify()
        if checked.problem is not None:
            raise GatewayError(
                f"{config.audit_path} does not verify (broken at seq {checked.problem.seq}: {checked.problem.what}); "
                "nothing was copied"
            )
        keys = read_keys(config.audit_path)
        head = (checked.head_seq, checked.head_hash)
        count = copy_chain(source.rows(), head, target, keys.mask if keys is not None else None)
    with closing(SharedAuditStore.open_reader(target)) as copied:
        result = copied.verify([head] if head[0] else [])
    if result.problem is not None or (result.head_seq, result.head_hash) != head:
        what = result.problem.what if result.problem is not None else "its head differs"
        raise GatewayError(f"{target.shown}: the copied chain does not verify ({what})")
    anchoring = Anchoring.of(config)
    if head[0] and anchoring.enabled:  # the store's anchors start where the file's ended
        own = default_anchor_file(target.shown) if config.gateway.audit_anchor is None else anchoring.file
        replace(anchoring, log=target.shown, file=own).write(*head)
    print(f"copied {count} events into {target.shown}; the chain verifies there, head {head[0]}:{head[1]}")
    print(f"to use it, set [gateway] store to that URL in {config.path} (the password as ${{VARIABLE}})")
    return 0


def export(config: Config, filters: Filters) -> int:
    with _reader(config) as store:
        for record in store.events(filters):
            print(json.dumps(record, ensure_ascii=False))
    return 0


def _reader(config: Config) -> closing[AuditLog]:
    return closing(open_reading(config))


def _resolve_session(store: AuditLog, prefix: str) -> dict[str, Any]:
    """The `sessions` row of the one session whose id begins with `prefix`."""
    matches = [row for row in store.sessions() if row["session_id"].startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise GatewayError(f"no session {prefix!r} in {store.path} (see 'mcp-armor audit sessions')")
    raise GatewayError(f"session {prefix!r} is ambiguous: it begins {len(matches)} session ids; give more of it")


def _row(record: dict[str, Any]) -> tuple[str, ...]:
    kind = record["kind"]
    # An `approval` event's answer (approved, denied) stands where a decision's effect would.
    decision = record.get("decision") or record.get("outcome") or record.get("approval") or ""
    if record.get("would"):
        decision += f" (would {record['would']})"
    took = f"{record['duration_ms']:.1f}ms" if record.get("duration_ms") is not None else ""
    detail = record.get("reason") or ""
    if kind == "session_start":
        detail = (
            f"{record.get('client_name') or '?'} {record.get('client_version') or ''} over {record.get('transport')}"
        )
        if record.get("principal"):
            detail += f" as principal {record['principal']}"
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
        record.get("tool") or record.get("method") or record.get("upstream") or "",
        decision,
        ",".join(record.get("rules") or []),
        took,
        detail,
    )
