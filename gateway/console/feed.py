"""What the console shows, read from the audit log and the approval queue: one message per change.

`AuditFeed` follows the log by sequence number (a look is one `max(seq)`), turning events into the
page's messages: a call (its decision joined to its outcome by call id), a session opened or ended,
an upstream up or down, a catalogue change (a run of one upstream's catalogue events folded into one
line), a policy reload. `QueueFeed` follows the queue by `ApprovalQueue.version()`. Both are
synchronous; the app runs them in a worker thread. Everything here is as the log and the queue hold
it: masked where they mask.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

from gateway.audit.anchor import Anchoring, last_anchor, read_anchors
from gateway.audit.approvals import Entry, Queue
from gateway.audit.logs import AuditLog
from gateway.audit.queries import Filters
from gateway.audit.shared import SharedAuditStore
from gateway.audit.store import AuditStore
from gateway.config.models import IN_MEMORY, Config
from gateway.display import escape, show_arguments
from gateway.errors import AuditError, GatewayError, NoLogYet
from gateway.policy.files import load_policies
from gateway.store.postgres import database

Message = dict[str, Any]
HISTORY_CALLS = 200
"""How many of the latest calls a page is sent when it connects."""
HISTORY_EVENTS = 5000
"""How far back (in events) the first look reads to find them, and the sessions and upstreams around them."""
ASK_WINDOW = 24 * 3600.0
"""The asks panel counts the last day's asks."""


class AuditFeed:
    """One page's view of the audit log: where it has read up to, and the calls and sessions seen."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.on_disk = config.gateway.store is not None or str(config.audit_path) != IN_MEMORY
        self._shared: SharedAuditStore | None = None
        """The page's connection to the shared store's log (kept: a connection per look would cost more)."""
        self._seq = 0
        self._sessions: dict[str, dict[str, Any]] = {}
        self._calls: OrderedDict[str, Message] = OrderedDict()
        self._fold: tuple[str, int, Message] | None = None
        """The catalogue line being folded: its upstream, the last seq in it, and the line."""
        self.last_reload: Message | None = None

    def history(self) -> list[Message]:
        """The recent past: the latest calls, the sessions and upstreams around them, the catalogue changes."""
        with self._open() as store:
            records = list(store.events(newest=HISTORY_EVENTS)) if store is not None else []
        messages = [message for record in records for message in self._message(record)]
        self._seq = records[-1]["seq"] if records else 0
        calls = {message["call_id"] for message in list(self._calls.values())[-HISTORY_CALLS:]}
        return [m for m in messages if m["type"] != "call" or m["call_id"] in calls]

    def poll(self) -> list[Message]:
        """What was recorded since the last look (nothing, cheaply, when the head has not moved)."""
        with self._open() as store:
            if store is None or store.last_seq() <= self._seq:
                return []
            records = list(store.events(Filters(after_seq=self._seq)))
        messages = []
        for record in records:
            self._seq = record["seq"]
            messages += self._message(record)
        return messages

    def integrity(self) -> Message:
        """The chain walked end to end and held to its anchors, as `audit verify` does."""
        if not self.on_disk:
            return {
                "type": "integrity",
                "status": "the audit log is in memory (:memory:): not on disk, nothing to verify",
            }
        anchoring = Anchoring.of(self.config)
        anchors = read_anchors(anchoring.file, anchoring.log)[0] if anchoring.file else []
        try:
            with closing(self._reader()) as store:
                result = store.verify(anchors)
        except NoLogYet:
            return {"type": "integrity", "status": "no audit log yet (it is created when the gateway first serves)"}
        except AuditError as exc:  # emptied, or not a log this mcp-armor reads: the failure is the status
            return {"type": "integrity", "status": str(exc)}
        problem = result.problem
        status = "ok" if problem is None else f"broken at seq {problem.seq}: {problem.what}"
        anchored = last_anchor(anchors)
        return {
            "type": "integrity",
            "status": status,
            "head": f"{result.head_seq}:{result.head_hash}" if result.head_seq else "(empty)",
            "anchor": f"seq {anchored}" if anchored else "no anchor yet",
        }

    def policy(self) -> Message:
        """The policy files as they are on disk now, and the last reload the log records."""
        message: Message = {"type": "policy", "reload": _reload_line(self.last_reload)}
        try:
            policies = load_policies(self.config.policy_dir)
        except GatewayError as exc:
            return {**message, "revision": "(does not load)", "files": str(exc)}
        return {**message, "revision": policies.revision, "files": ", ".join(policies.files) or "(none)"}

    def _reader(self) -> AuditLog:
        shared = database(self.config)
        if shared is not None:
            return SharedAuditStore.open_reader(shared)
        return AuditStore.open_reader(self.config.audit_path)

    @contextmanager
    def _open(self) -> Iterator[AuditLog | None]:
        """A reader for one look (opened in the worker thread that looks: SQLite connections stay in theirs;
        the shared store's connection is kept from look to look, and dropped when a look fails)."""
        shared = database(self.config)
        if shared is not None:
            if self._shared is None:
                try:
                    self._shared = SharedAuditStore.open_reader(shared)
                except AuditError:
                    yield None  # unreachable, or not set up: nothing to show (the integrity panel says which)
                    return
            try:
                yield self._shared
            except AuditError:
                self.close()
                raise
            return
        store = None
        if self.on_disk:
            try:
                store = AuditStore.open_reader(self.config.audit_path)
            except AuditError:
                pass  # not made yet, emptied or half-made: nothing to show (the integrity panel says which)
        try:
            yield store
        finally:
            if store is not None:
                store.close()

    def close(self) -> None:
        """Let go of the shared store's connection, if one is kept."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def _message(self, record: dict[str, Any]) -> list[Message]:
        kind = record["kind"]
        if kind != "catalog":
            self._fold = None
        session = record.get("session_id") or ""
        if kind == "session_start":
            client = " ".join(p for p in (record.get("client_name"), record.get("client_version")) if p)
            self._sessions[session] = {"principal": _shown(record.get("principal")), "client": _shown(client)}
            return [self._session(session, "open", record)]
        if kind == "session_end":
            return [self._session(session, "ended", record)]
        if kind == "decision":
            known = self._sessions.get(session, {})
            call: Message = {
                "type": "call",
                "call_id": record.get("call_id") or "",
                "time": record["ts"],
                "session": session,
                "principal": _shown(record.get("principal")) or known.get("principal", ""),
                "client": known.get("client") or _shown(record.get("client")),
                "tool": _shown(record.get("tool")),
                "decision": record.get("decision") or "",
                "outcome": "",
                "duration": "",
            }
            self._calls[call["call_id"]] = call
            while len(self._calls) > HISTORY_CALLS * 5:
                self._calls.popitem(last=False)
            return [call]
        if kind == "outcome":
            ended = self._calls.get(record.get("call_id") or "")
            if ended is None:
                return []
            duration = record.get("duration_ms")
            ended.update(outcome=record.get("outcome") or "", duration=f"{duration} ms" if duration is not None else "")
            return [dict(ended)]
        if kind == "upstream":
            state = "up" if record.get("outcome") == "up" else "down"
            return [
                {"type": "upstream", "upstream": record.get("upstream") or "", "state": state, "time": record["ts"]}
            ]
        if kind == "catalog":
            return [self._catalog(record)]
        if kind == "policy_reload":
            self.last_reload = record
            return [self.policy()]
        return []

    def _session(self, session: str, state: str, record: dict[str, Any]) -> Message:
        known = self._sessions.get(session, {})
        return {
            "type": "session",
            "session": session,
            "state": state,
            "principal": known.get("principal", ""),
            "client": known.get("client", ""),
            "time": record["ts"],
        }

    def _catalog(self, record: dict[str, Any]) -> Message:
        """One line per change: consecutive catalogue events of one upstream update the same line."""
        upstream = record.get("upstream") or "?"
        change = record.get("change") or record.get("outcome") or "changed"
        name = _shown(record.get("tool") or record.get("name"))
        if self._fold is not None and self._fold[0] == upstream and self._fold[1] == record["seq"] - 1:
            line = self._fold[2]
            line["counts"][change] = line["counts"].get(change, 0) + 1
            line["names"].append(name)
        else:
            line = {"type": "catalog", "id": str(record["seq"]), "upstream": upstream, "time": record["ts"]}
            line.update(counts={change: 1}, names=[name])
        self._fold = (upstream, record["seq"], line)
        counts = ", ".join(f"{count} {what}" for what, count in line["counts"].items())
        names = line["names"]
        shown = f" ({', '.join(names)})" if len(names) <= 8 else ""
        return {**line, "text": f"{line['time']} {upstream}: {counts}{shown}"}


class Walks:
    """The chain's walk, shared by every page of one console. A walk reads the whole log (seconds on a big
    one, mostly holding the interpreter: inside `serve --http`, the gateway's own time), so pages take the
    result of one walk, and walks come no closer than `SHARE` times their own cost."""

    SHARE = 10

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, Message] | None = None
        """When the last walk started, and what it found."""
        self.cost = 0.0
        """Seconds the last walk took."""

    def every(self) -> float:
        """Seconds at least between walks."""
        return max(self._every, self.SHARE * self.cost)

    def ready(self, since: float) -> bool:
        """Whether `integrity(…, since)` would answer (a look without the lock: a hint, saving a thread)."""
        last = self._last
        return last is None or last[0] >= since or self.clock() - last[0] >= self.every()

    def integrity(self, feed: AuditFeed, since: float) -> Message | None:
        """What a walk started at or after `since` found (`feed.integrity()`); `None` while the last walk is
        older and the next is not due yet (blocks: run it in a thread)."""
        with self._lock:  # one walk at a time: pages asking meanwhile take its result
            if self._last is not None and self._last[0] >= since:
                return self._last[1]
            started = self.clock()
            if self._last is not None and started - self._last[0] < self.every():
                return None
            message = feed.integrity()
            self.cost = self.clock() - started
            self._last = (started, message)
            return message


def _reload_line(record: dict[str, Any] | None) -> str:
    if record is None:
        return "no reload recorded"
    if record.get("outcome") == "ok":
        return f"{record['ts']}: reloaded, revision {record.get('policy_revision')} ({record.get('reason') or ''})"
    return f"{record['ts']}: reload failed: {record.get('reason') or ''}"


class QueueFeed:
    """One page's view of the approval queue: the pending approvals and the asks per rule, sent again
    whenever the queue changed (or a pending one's expiry passed)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._version: int | None = None
        self._sent: list[Message] | None = None

    def poll(self, *, force: bool = False) -> list[Message]:
        version = self.queue.version()
        if version == self._version and not force and not self._expiring():
            return []
        self._version = version
        pending = [approval(entry) for entry in self.queue.entries(pending_only=True)]
        if pending == self._sent and not force:
            return []
        self._sent = pending
        stats = self.queue.stats(self.queue.now() - ASK_WINDOW)
        asks = [
            {"rule": s.rule, "asked": s.asked, "per_hour": s.per_hour, "approved": s.approved, "denied": s.denied}
            | {"unanswered": s.unanswered}
            for s in stats
        ]
        return [{"type": "approvals", "pending": pending}, {"type": "asks", "rules": asks}]

    def _expiring(self) -> bool:
        now = self.queue.now()
        return any(item["expires_at"] <= now for item in self._sent or [])


def approval(entry: Entry) -> Message:
    """A pending approval as the page shows it (its arguments as text, every one, masked as recorded)."""
    call = entry.call
    return {
        "id": entry.id,
        "binding": entry.binding,
        "tool": _shown(call.tool),
        "principal": _shown(call.principal) or "(none)",
        "client": _shown(call.client),
        "session": _shown(call.session),
        "args": show_arguments(call.arguments, paths=call.paths),
        "sent_args": show_arguments(call.sent_arguments, paths=call.paths) if call.sent_arguments is not None else "",
        "rule": _shown(", ".join(call.rules)) or "(no rule)",
        "reason": _shown(call.reason),
        "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.expires)),
        "expires_at": entry.expires,
    }


def _shown(text: object) -> str:
    """A name or a line from an agent or an upstream, with nothing in it able to draw a line of its own,
    reorder or hide what follows (as `show_arguments` writes values)."""
    return escape(str(text or ""), quotes=False)
