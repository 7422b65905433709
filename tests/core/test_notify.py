"""Approval notices: what they say, when a failed one is tried again, and that nothing secret is logged
(a fake clock and an in-process transport; `tests/e2e/test_approval_notify.py` runs them for real)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx2
import pytest

from gateway.audit.approvals import AskedCall, Entry, Status
from gateway.config.models import load_config
from gateway.core import notify
from gateway.core.notify import ApprovalNotifier, notice, retry_delay, shown_address
from gateway.errors import ConfigError

URL = "https://bot:hunter2@hooks.example.com:8443/services/T0/B0/webhook-secret?sig=query-secret#frag"
TOKEN = "Bearer header-secret-value"
CONSOLE = "https://gateway.internal/console/"


class Clock:
    """Wall time that moves only when the notifier sleeps."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class Lines(logging.Handler):
    """The notifier's log lines, waited for without sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._changed = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[str]:
        with anyio.fail_after(5):
            while len(self.lines) < count:
                await self._changed.wait()
        return self.lines


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger(notify.__name__)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def entry(clock: Clock, *, ttl: float = 120.0, client: str = "agent 1.0", entry_id: str = "abcd2345") -> Entry:
    call = AskedCall(
        call_id="c1",
        session="s1",
        client=client,
        principal="alice",
        tool="box__write_note",
        upstream="box",
        upstream_tool="write_note",
        arguments={"path": "notes/a", "body": "deploy key [masked:aws-access-key:3f0c9a1d5e7b2c84]"},
        rules=("writes-need-approval",),
        reason="writes change the disk",
        revision="r1",
    )
    return Entry(entry_id, clock.now, clock.now + ttl, Status.PENDING, "sha256:x", call)


class Receiver:
    """Answers each POST with the next status in `statuses` (an exception is raised instead), recording it."""

    def __init__(self, *statuses: int | Exception, retry_after: str | None = None) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx2.Request] = []
        self.retry_after = retry_after
        self._changed = anyio.Event()

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        self._changed.set()
        self._changed = anyio.Event()
        status = self.statuses.pop(0) if self.statuses else 200
        if isinstance(status, Exception):
            raise status
        headers = {"retry-after": self.retry_after} if self.retry_after is not None else {}
        return httpx2.Response(status, headers=headers, text="ok")

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(5):
            while len(self.requests) < count:
                await self._changed.wait()


async def delivered(
    receiver: Receiver, clock: Clock, entries: list[Entry], until: Callable[[], object]
) -> ApprovalNotifier:
    """Run a notifier posting to `receiver`, queue `entries`, and stop once `until` is awaited."""
    notifier = ApprovalNotifier(
        URL, {"X-Api-Key": TOKEN}, CONSOLE, transport=httpx2.MockTransport(receiver), clock=clock, sleep=clock.sleep
    )
    for each in entries:
        notifier.notify(each)
    async with anyio.create_task_group() as tg:
        await tg.start(notifier.run)
        await until()  # type: ignore[misc]
        tg.cancel_scope.cancel()
    return notifier


@pytest.mark.parametrize(
    ("attempt", "status", "retry_after", "expected"),
    [
        pytest.param(1, None, None, 1.0, id="no-answer-then-1s"),
        pytest.param(2, 500, None, 2.0, id="5xx-then-2s"),
        pytest.param(3, 503, None, 4.0, id="then-4s"),
        pytest.param(4, 429, None, 8.0, id="429-then-8s"),
        pytest.param(5, 500, None, None, id="fifth-attempt-is-the-last"),
        pytest.param(1, 404, None, None, id="4xx-not-retried"),
        pytest.param(1, 401, None, None, id="401-not-retried"),
        pytest.param(1, 302, None, None, id="redirect-not-followed-nor-retried"),
        pytest.param(1, 429, "30", 30.0, id="retry-after-seconds-obeyed"),
        pytest.param(1, 503, "3600", 60.0, id="retry-after-capped"),
        pytest.param(3, 503, "1", 4.0, id="retry-after-never-shortens"),
        pytest.param(1, 500, "soon", 1.0, id="unreadable-retry-after-ignored"),
    ],
)
def test_when_a_failed_notice_is_tried_again(
    attempt: int, status: int | None, retry_after: str | None, expected: float | None
) -> None:
    assert retry_delay(attempt, status, retry_after, now=0.0, expires=3600.0) == expected


def test_a_retry_after_date_and_the_expiry_bound_the_wait() -> None:
    now = 1_000_000.0
    date = format_datetime(datetime.fromtimestamp(now + 20, UTC), usegmt=True)
    assert retry_delay(1, 503, date, now=now, expires=now + 100) == 20.0
    assert retry_delay(1, 503, date, now=now, expires=now + 20) is None  # it would arrive expired
    assert retry_delay(3, 500, None, now=now, expires=now + 3) is None


def test_the_address_is_logged_without_its_secrets() -> None:
    assert shown_address(URL) == "https://hooks.example.com:8443/services/…"
    assert shown_address("http://[::1]:9000/hook") == "http://[::1]:9000/hook"
    assert shown_address("http://127.0.0.1") == "http://127.0.0.1"


def test_the_notice_says_what_waits_and_links_to_the_console() -> None:
    clock = Clock()
    waiting = entry(clock, client="<!channel> <https://evil.example|click> `x`\nsecond line")
    payload = notice(waiting, CONSOLE, clock.now + 20)
    link = f"{CONSOLE}#approval-abcd2345"
    first, second = payload["text"].split("\n")
    assert "`box__write_note`" in first and "(id abcd2345)" in first and "expires in 100s" in first
    assert "; rule `writes-need-approval`: `writes change the disk`; " in first and "`alice` via " in first
    named = replace(waiting, call=replace(waiting.call, reason="rule 'writes-need-approval' asks: writes"))
    assert "; `rule 'writes-need-approval' asks: writes`; " in notice(named, None, clock.now)["text"]
    assert "<" not in first and "&lt;!channel&gt;" in first  # no mention, no link the agent chose
    assert second == f"Decide: {link}"
    assert payload["console"] == link
    assert payload["approval"] == waiting.to_record(clock.now + 20)
    assert json.loads(json.dumps(payload)) == payload
    alone = notice(waiting, None, clock.now)
    assert alone["console"] is None and "\n" not in alone["text"]


def test_a_notice_of_huge_arguments_carries_them_as_the_prompt_shows_them() -> None:
    """Arguments may be as large as a message, and a hundred notices may wait: past the bound a notice
    carries every key, long values shortened with their size and digest."""
    clock = Clock()
    waiting = entry(clock)
    huge = replace(waiting, call=replace(waiting.call, arguments={"path": "notes/a", "body": "x" * 1_000_000}))
    approval = notice(huge, None, clock.now)["approval"]
    assert len(json.dumps(approval)) < 16_000 and approval["arguments_shown_as_text"] is True
    shown = approval["arguments"]
    assert shown.startswith('"path": "notes/a"') and "1,000,000 characters" in shown
    assert "arguments_shown_as_text" not in notice(waiting, None, clock.now)["approval"]


def test_a_client_name_cannot_reorder_or_hide_what_the_notice_says() -> None:
    """A bidi override would show `alice via agent` as the agent chose to have it read; a zero-width
    character would pass one name off as another."""
    clock = Clock()
    text = notice(entry(clock, client="agent\u202e\u2066 1.0\u200b\x1b[2J"), None, clock.now)["text"]
    assert not any(char in text for char in "\u202e\u2066\u200b\x1b")
    assert "`agent\\u202e\\u2066 1.0\\u200b\\u001b[2J`" in text


@pytest.mark.anyio
async def test_a_notice_answered_500_twice_is_sent_on_the_third_attempt(lines: Lines) -> None:
    clock = Clock()
    receiver = Receiver(500, 503)
    await delivered(receiver, clock, [entry(clock)], lambda: receiver.wait_for(3))
    assert len(receiver.requests) == 3 and clock.slept == [1.0, 2.0]
    sent = receiver.requests[-1]
    assert sent.headers["x-api-key"] == TOKEN and sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == "Basic Ym90Omh1bnRlcjI="  # the address's userinfo: bot:hunter2
    assert json.loads(sent.content)["approval"]["id"] == "abcd2345"
    assert lines.lines == [
        "approval notice for abcd2345 to https://hooks.example.com:8443/services/… failed (attempt 1): "
        "answered 500; trying again in 1s",
        "approval notice for abcd2345 to https://hooks.example.com:8443/services/… failed (attempt 2): "
        "answered 503; trying again in 2s",
    ]


@pytest.mark.anyio
async def test_a_refused_notice_is_not_tried_again(lines: Lines) -> None:
    clock = Clock()
    receiver = Receiver(403)
    await delivered(receiver, clock, [entry(clock)], lambda: lines.wait_for(1))
    assert len(receiver.requests) == 1 and clock.slept == []
    assert lines.lines[0].endswith("failed (attempt 1): answered 403; not sent")


@pytest.mark.anyio
async def test_an_unreachable_receiver_is_tried_five_times_and_no_secret_is_logged(lines: Lines) -> None:
    clock = Clock()
    refused = [httpx2.ConnectError(f"cannot reach {URL} with {TOKEN}") for _ in range(5)]
    receiver = Receiver(*refused)
    await delivered(receiver, clock, [entry(clock)], lambda: lines.wait_for(5))
    assert len(receiver.requests) == 5 and clock.slept == [1.0, 2.0, 4.0, 8.0]
    assert lines.lines[-1].endswith("failed (attempt 5): could not be delivered (ConnectError); not sent")
    logged = "\n".join(lines.lines)
    for secret in ("hunter2", "webhook-secret", "query-secret", "header-secret-value", "frag"):
        assert secret not in logged


@pytest.mark.anyio
async def test_no_notice_is_sent_after_its_approval_expires(lines: Lines) -> None:
    clock = Clock()
    receiver = Receiver(500, 500, 500, 500)
    await delivered(receiver, clock, [entry(clock, ttl=5)], lambda: lines.wait_for(3))
    assert len(receiver.requests) == 3 and clock.slept == [1.0, 2.0]  # a 4 s wait would end at 7 s
    assert lines.lines[-1].endswith("answered 500; not sent")


@pytest.mark.anyio
async def test_a_full_queue_drops_the_notice_and_says_so(lines: Lines) -> None:
    clock = Clock()
    receiver = Receiver()
    entries = [entry(clock, entry_id=f"id{number:06d}") for number in range(notify.QUEUE_SIZE + 1)]
    await delivered(receiver, clock, entries, lambda: receiver.wait_for(notify.QUEUE_SIZE))
    assert len(receiver.requests) == notify.QUEUE_SIZE
    assert lines.lines == [
        f"approval notice for id{notify.QUEUE_SIZE:06d} to https://hooks.example.com:8443/services/… dropped: "
        f"{notify.QUEUE_SIZE} notices are already waiting to be sent"
    ]


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        pytest.param('{ Authorization = "Bearer a\\nX-Bad: 1" }', "the value of 'Authorization' has", id="newline"),
        pytest.param('{ Authorization = "Bearer caf\u00e9" }', "the value of 'Authorization' has", id="non-ascii"),
        pytest.param('{ "X Bad" = "v" }', "'X Bad' is not an HTTP header name", id="name"),
    ],
)
def test_a_header_no_request_can_carry_is_refused_at_load_without_its_value(
    tmp_path: Path, headers: str, problem: str
) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(
        f'[gateway.approvals]\nnotify = "https://hooks.example.com/x"\nnotify_headers = {headers}\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "notify_headers" in message and problem in message
    assert "Bearer" not in message and "\n" not in message
