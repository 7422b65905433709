"""Notices of waiting approvals: a JSON POST to `[gateway.approvals] notify` for each, sent in the background.

A notice carries a `text` Slack and Teams incoming webhooks show as it is (the tool, who asks, the rule
and its reason, when it expires, the approval's id and the console link), the approval as the queue holds
it (`approval`: arguments masked as the audit log masks them) and the link alone (`console`). Announcing
never holds up a call: `notify` only enqueues (a full queue drops the notice, logged), and a few senders
POST them, trying again after a connection failure, a 5xx or a 429 (1 s, 2 s, 4 s … at most
`MAX_ATTEMPTS` times, never past the approval's expiry). Every failure is one log line naming the address
(no userinfo, query, or path past its first segment: a chat webhook's path is its secret) and what went
wrong; header values (a token, say) never are.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httpx2

from gateway.audit.approvals import Entry
from gateway.display import escape, show_arguments
from gateway.errors import format_seconds

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
FIRST_DELAY = 1.0
"""Seconds before the second attempt; each later wait doubles."""
MAX_RETRY_AFTER = 60.0
"""The longest wait a `Retry-After` answer is obeyed for (a longer one waits this long)."""
ATTEMPT_TIMEOUT = 5.0
"""Seconds for each step of one attempt (connecting, sending, waiting for the answer)."""
ATTEMPT_DEADLINE = 10.0
"""Seconds for all of one attempt: a receiver trickling bytes holds a sender no longer."""
QUEUE_SIZE = 100
"""Notices waiting to be sent; past this, a new one is dropped (and logged)."""
SENDERS = 4
"""Notices sent at once: one receiver that never answers does not hold up the others."""
_SHOWN_VALUE = 200
"""The longest a value from the call is shown in `text` (the whole call is in `approval`)."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
MAX_APPROVAL = 32 * 1024
"""Characters of JSON a notice's `approval` may take with its arguments as they are; past that they are
sent as the approval prompt shows them (every key, long values shortened with their size and digest)."""


def shown_address(url: str) -> str:
    """`url` as a log line may show it: scheme, host, port and the path's first segment. No userinfo,
    query or fragment, and no more of the path: a Slack or Teams webhook's path is its secret."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    first, more, _ = parts.path.lstrip("/").partition("/")
    path = f"/{first}" + ("/…" if more else "") if first else ""
    return f"{parts.scheme}://{host}{port}{path}"


def console_link(console_url: str | None, entry_id: str) -> str | None:
    """Where the console shows approval `entry_id`, when the console's address is configured."""
    if console_url is None:
        return None
    return f"{console_url.split('#', 1)[0]}#approval-{entry_id}"


def _plain(value: str) -> str:
    """A value from the call as `text` shows it: one line, shortened, with nothing Slack or Teams would
    turn into a link or a mention (`<!channel>`, `<https://…|…>`, markdown links), and nothing able to
    reorder or hide what follows (a bidi override, a zero-width character: written as escapes)."""
    flat = " ".join(value.split())
    if len(flat) > _SHOWN_VALUE:
        flat = flat[: _SHOWN_VALUE - 1] + "…"
    flat = escape(flat, quotes=False)
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        flat = flat.replace(raw, escaped)
    return "`" + flat.replace("`", "'") + "`"


def notice_text(entry: Entry, link: str | None, now: float) -> str:
    """One or two lines: what waits, for whom, why, for how long, and where to decide it."""
    call = entry.call
    who = f"{_plain(call.principal)} via {_plain(call.client)}" if call.principal else _plain(call.client)
    # A rule's reason names the rule ("rule 'x' needs a person's approval: …"): it is not said twice.
    unnamed = [rule for rule in call.rules if rule not in call.reason]
    why = f"rule {_plain(', '.join(unnamed))}: {_plain(call.reason)}" if unnamed else _plain(call.reason)
    left = format_seconds(max(0, round(entry.expires - now)))
    line = f"Approval waiting: {_plain(call.tool)} for {who}; {why}; expires in {left} (id {entry.id})"
    return f"{line}\nDecide: {link}" if link is not None else line


def notice(entry: Entry, console_url: str | None, now: float) -> dict[str, Any]:
    """The JSON a notice POSTs: `text` for chat webhooks, and the approval (masked) for anything else."""
    link = console_link(console_url, entry.id)
    approval = entry.to_record(now)
    if len(json.dumps(approval, ensure_ascii=False)) > MAX_APPROVAL:
        # Arguments can be as large as a message (64 MiB by default), and up to 100 notices wait at once:
        # past the bound, a notice carries them as the approval prompt shows them, and says so.
        for key in ("arguments", "sent_arguments"):
            if approval.get(key) is not None:
                approval[key] = show_arguments(approval[key], paths=entry.call.paths)
        approval["arguments_shown_as_text"] = True
    return {"text": notice_text(entry, link, now), "approval": approval, "console": link}


def retry_delay(
    attempt: int, status: int | None, retry_after: str | None, *, now: float, expires: float
) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (from 1) before the next; `None`: give up.

    `status` is the answer's status, `None` when none came (no connection, a timeout). Only a failure
    that may pass is tried again: no answer, a 5xx, a 429; a 4xx (or a redirect, not followed) would
    only be refused again. A `Retry-After` (seconds or an HTTP date) lengthens the wait, up to
    `MAX_RETRY_AFTER`; a wait that would end past the approval's expiry gives up instead.
    """
    if status is not None and status != 429 and status < 500:
        return None
    if attempt >= MAX_ATTEMPTS:
        return None
    delay: float = FIRST_DELAY * 2.0 ** (attempt - 1)
    asked = _retry_after_seconds(retry_after, now)
    if asked is not None:
        delay = max(delay, min(asked, MAX_RETRY_AFTER))
    if now + delay >= expires:
        return None
    return delay


def _retry_after_seconds(value: str | None, now: float) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None  # unreadable: the backoff's own wait stands


class ApprovalNotifier:
    """POSTs a notice of each waiting approval to one address, in the background (`run`)."""

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        console_url: str | None,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        clock: Clock = time.time,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        self.url = url
        self.address = shown_address(url)
        self._headers = dict(headers)
        self._console_url = console_url
        self._transport = transport
        self._clock = clock
        self._sleep = sleep
        self._send, self._receive = anyio.create_memory_object_stream[Entry](QUEUE_SIZE)

    def notify(self, entry: Entry) -> None:
        """Queue a notice of `entry` (never waits: when the queue is full, the notice is dropped)."""
        try:
            self._send.send_nowait(entry)
        except anyio.WouldBlock:
            logger.warning(
                "approval notice for %s to %s dropped: %d notices are already waiting to be sent",
                entry.id,
                self.address,
                QUEUE_SIZE,
            )
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            logger.warning("approval notice for %s to %s dropped: the gateway is shutting down", entry.id, self.address)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Send the queued notices until cancelled."""
        timeout = httpx2.Timeout(ATTEMPT_TIMEOUT)
        with self._send, self._receive:
            async with (
                httpx2.AsyncClient(
                    headers=self._headers, timeout=timeout, follow_redirects=False, transport=self._transport
                ) as http,
                anyio.create_task_group() as tg,
            ):
                for _ in range(SENDERS):
                    tg.start_soon(self._sender, http, self._receive.clone())
                task_status.started()

    async def _sender(self, http: httpx2.AsyncClient, entries: anyio.abc.ObjectReceiveStream[Entry]) -> None:
        async with entries:
            async for entry in entries:
                try:
                    await self._deliver(http, entry)
                except Exception as exc:  # a notice is best effort: its fault never takes the gateway down
                    # Only the kind: the text could quote the address or a header whole.
                    logger.error("approval notice for %s to %s failed: %s", entry.id, self.address, type(exc).__name__)

    async def _deliver(self, http: httpx2.AsyncClient, entry: Entry) -> None:
        """POST the notice of `entry`, trying again while `retry_delay` says so."""
        attempt = 0
        while True:
            attempt += 1
            status, problem, retry_after = await self._attempt(http, notice(entry, self._console_url, self._clock()))
            if status is not None and 200 <= status < 300:
                return
            delay = retry_delay(attempt, status, retry_after, now=self._clock(), expires=entry.expires)
            then = "not sent" if delay is None else f"trying again in {format_seconds(delay)}"
            logger.warning(
                "approval notice for %s to %s failed (attempt %d): %s; %s",
                entry.id,
                self.address,
                attempt,
                problem,
                then,
            )
            if delay is None:
                return
            await self._sleep(delay)

    async def _attempt(self, http: httpx2.AsyncClient, payload: dict[str, Any]) -> tuple[int | None, str, str | None]:
        """One POST: the answer's status (`None`: no answer), what went wrong in words, its `Retry-After`."""
        with anyio.move_on_after(ATTEMPT_DEADLINE):
            try:
                # Streamed and closed unread: only the status matters, and a huge body is never taken in.
                async with http.stream("POST", self.url, json=payload) as response:
                    status = response.status_code
                    said = f"answered {status}"
                    if 300 <= status < 400:
                        said += " (a redirect, not followed)"
                    return status, said, response.headers.get("retry-after")
            except httpx2.TimeoutException:
                return None, f"no answer within {format_seconds(ATTEMPT_TIMEOUT)}", None
            except httpx2.HTTPError as exc:
                # The exception's own text may quote the address whole (userinfo, query): only its kind is said.
                return None, f"could not be delivered ({type(exc).__name__})", None
        return None, f"no answer within {format_seconds(ATTEMPT_DEADLINE)}", None
