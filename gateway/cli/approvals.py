"""`mcp-armor approvals list | show | approve | deny`: the calls waiting in the approval queue, decided
from a terminal.

A decision is taken only after the whole call was printed, for the binding that was printed (a row whose
call differs is not decided), and is recorded in the audit log (kind `approval`) before the queue changes:
if it cannot be recorded, nothing changes. `approve` asks on a terminal and, off one, refuses unless
`--yes` says the person already looked. `deny` does not ask: a denial lets nothing through, and a call
denied by mistake is asked again when the agent retries it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from gateway.audit.approvals import Entry, Queue, RuleStats, Status, decision_event
from gateway.audit.logs import record_first
from gateway.audit.shared_approvals import approval_queue
from gateway.audit.store import iso_utc, os_user
from gateway.cli.common import parse_moment, print_table, visible
from gateway.config.models import Config
from gateway.display import show_arguments
from gateway.errors import ApprovalsError

CHANNEL = "cli"
"""The channel the queue records for a decision taken here."""
DEFAULT_SINCE = "24h"


def list_approvals(config: Config, show_all: bool, since: str | None, as_json: bool) -> int:
    """The pending approvals (with `show_all`, the decided ones since `since` too), then per rule how often
    it asked since `since` and what came of it."""
    window = since or DEFAULT_SINCE
    start = parse_moment(window, "--since", '"24h", "7d"', ahead=False).timestamp()
    queue = approval_queue(config)
    now = queue.now()
    pending = queue.entries(pending_only=True)
    decided = [e for e in queue.entries(since=start) if e.shown_status(now) is not Status.PENDING] if show_all else []
    stats = queue.stats(start)
    if as_json:
        listed: dict[str, Any] = {
            "pending": [entry.to_record(now) for entry in pending],
            "decided": [entry.to_record(now) for entry in decided],
            "asks": {"since": _iso(start), "rules": [asdict(rule) for rule in stats]},
        }
        print(json.dumps(listed))
        return 0
    rows = [
        (entry.id, _span(now - entry.created), _span(entry.expires - now), _who(entry), entry.call.tool, _rules(entry))
        for entry in pending
    ]
    print_table(("ID", "AGE", "EXPIRES IN", "PRINCIPAL/CLIENT", "TOOL", "RULE"), rows, empty="(no approval pending)")
    if show_all:
        print()
        finished = [
            (
                entry.id,
                _span(now - entry.created),
                entry.shown_status(now).value,
                entry.decided_by or "-",
                entry.channel or "-",
                _who(entry),
                entry.call.tool,
                _rules(entry),
            )
            for entry in decided
        ]
        headings = ("ID", "AGE", "STATUS", "BY", "CHANNEL", "PRINCIPAL/CLIENT", "TOOL", "RULE")
        print_table(headings, finished, empty=f"(none decided in the last {window})")
    print()
    print(f"asks in the last {window}:")
    print_table(
        ("RULE", "ASKS", "PER HOUR", "APPROVED", "DENIED", "UNANSWERED"),
        [_tally(rule) for rule in stats],
        empty="(none)",
    )
    return 0


def show(config: Config, entry_id: str, as_json: bool) -> int:
    queue = approval_queue(config)
    entry = _entry(queue, entry_id)
    if as_json:
        print(json.dumps(entry.to_record(queue.now())))
    else:
        _print_call(entry, queue.now(), sys.stdout)
    return 0


def decide(config: Config, entry_id: str, *, approve: bool, note: str, yes: bool, as_json: bool) -> int:
    """Print the whole call, confirm (an approval), then decide it for the binding that was printed."""
    queue = approval_queue(config)
    entry = _entry(queue, entry_id)
    _print_call(entry, queue.now(), sys.stderr if as_json else sys.stdout)
    settled = entry.settled(queue.now())
    if settled is not None:  # who decided may be an agent's client name: written out as escapes
        raise ApprovalsError(visible(settled))
    if approve and not yes and not _confirmed():
        print(f"approval {entry.id}: not approved; nothing changed")
        return 1
    by = os_user()

    def record(decided: Entry) -> None:
        record_first(config, [decision_event(decided)], ApprovalsError)

    try:
        decided = queue.decide(
            entry.id, approve=approve, by=by, channel=CHANNEL, note=note, binding=entry.binding, record=record
        )
    except ApprovalsError as exc:  # decided meanwhile (by an agent's client, perhaps): its name escaped
        raise ApprovalsError(visible(str(exc))) from None
    if as_json:
        print(json.dumps(decided.to_record(queue.now())))
    else:
        print(f"approval {decided.id}: {decided.status.value} by {visible(by)} ({CHANNEL})")
    return 0


def _confirmed() -> bool:
    """A person at a terminal answered yes; off a terminal nobody can be asked, so that is refused."""
    if not sys.stdin.isatty():
        raise ApprovalsError(
            "not on a terminal, so nobody can be asked to confirm: nothing was approved "
            "(give --yes to approve the call shown without being asked)"
        )
    try:
        answer = input("Approve this call? [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _entry(queue: Queue, entry_id: str) -> Entry:
    entry = queue.get(entry_id.strip().lower())
    if entry is None:
        raise ApprovalsError(f"no approval {entry_id!r} in {queue.where} (see `mcp-armor approvals list --all`)")
    return entry


def _print_call(entry: Entry, now: float, out: TextIO) -> None:
    """Everything a person judges a call by: who, what, every argument, why policy asks, and its state."""
    call = entry.call
    status = entry.shown_status(now)
    state = status.value
    if status is Status.PENDING:
        state += f", expires in {_span(entry.expires - now)}"
    lines = [
        f"approval {entry.id}: {state}",
        f"  tool:       {visible(call.tool)} (tool '{visible(call.upstream_tool)}' of upstream "
        f"'{visible(call.upstream)}')",
        f"  session:    {visible(call.session)}",
        f"  client:     {visible(call.client) or '?'}",
        f"  principal:  {visible(call.principal) or '-'}",
        f"  call:       {visible(call.call_id)} (held by gateway {visible(call.gateway)})",
        f"  rules:      {visible(_rules(entry))}",
        f"  reason:     {visible(call.reason)}",
        f"  policy:     revision {visible(call.revision)}",
        f"  binding:    sha256 {entry.binding}",
        f"  created:    {_iso(entry.created)}",
        f"  expires:    {_iso(entry.expires)}",
    ]
    if entry.decided_at is not None:
        who = f" by {visible(entry.decided_by)} ({visible(entry.channel or '?')})" if entry.decided_by else ""
        lines.append(f"  decided:    {status.value}{who} at {_iso(entry.decided_at)}")
    if entry.note:
        lines.append(f"  note:       {visible(entry.note)}")
    if call.sent_arguments is not None:
        lines.append("arguments the agent sent (a rule rewrote them):")
        lines.append(_indented(show_arguments(call.sent_arguments, paths=call.paths)))
        lines.append("arguments the upstream would receive:")
    else:
        lines.append("arguments (forwarded as the agent sent them):")
    lines.append(_indented(show_arguments(call.arguments, paths=call.paths)))
    print("\n".join(lines), file=out, flush=True)


def _who(entry: Entry) -> str:
    client = entry.call.client or "?"
    return f"{entry.call.principal} / {client}" if entry.call.principal else client


def _rules(entry: Entry) -> str:
    return ", ".join(entry.call.rules) or "(no rule)"


def _tally(rule: RuleStats) -> tuple[str, ...]:
    return (
        rule.rule,
        str(rule.asked),
        f"{rule.per_hour:g}",
        str(rule.approved),
        str(rule.denied),
        str(rule.unanswered),
    )


def _indented(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def _span(seconds: float) -> str:
    """A short duration: `12s`, `4m08s`, `2h05m`, `3d04h` (a past expiry is `0s`)."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _iso(moment: float) -> str:
    return iso_utc(datetime.fromtimestamp(moment, UTC))
