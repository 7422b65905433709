"""The console's routes: the page, its static files, the live stream, and the decisions made there.

`console_app` is the Starlette app (paths under `/console`), wrapped in the `Guard`; the same app is
served by `mcp-armor console` and mounted by `serve --http`. A decision made here is recorded in the
audit log (an `approval` event) inside the queue's transaction, before it takes effect: if it cannot be
recorded, nothing is decided.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from functools import partial
from importlib.resources import files
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.audit.approvals import Entry, decision_event
from gateway.audit.logs import record_first
from gateway.audit.shared_approvals import approval_queue
from gateway.catalog.pins import Assessment
from gateway.catalog.shared_pins import pins_needed, shared_pins
from gateway.config.models import Config
from gateway.console.access import PREFIX, Gate, Guard, Viewer, viewer_of
from gateway.console.feed import AuditFeed, Message, QueueFeed, Walks
from gateway.downstream.http_edge import respond
from gateway.errors import ApprovalsError, ConfigError, GatewayError
from gateway.upstream import review

POLL = 0.25
"""Seconds between looks at the audit log and the queue while a page is connected."""
INTEGRITY_EVERY = 10.0
"""Seconds between walks of the chain while it grows (the walk reads the whole log: longer on a big one)."""
RECHECK_EVERY = 2.0
"""Seconds between checks that a connected page's session (its principal's token) still holds."""
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
_CSRF_MARK = "__CSRF_TOKEN__"
MAX_STREAMS = 8
"""Live streams one viewer may hold open at once (each looks at the log and the queue four times a second)."""
MAX_BODY = 64 * 1024
"""The largest decision a page sends (a deny reason is cut to 500 characters)."""


def console_app(config: Config, gate: Gate, allowed_hosts: Sequence[str], *, tls: bool) -> Guard:
    """The console, guarded: every path under `/console`."""
    console = Console(config)
    routes = [
        Route("/console/", console.page),
        Route("/console/static/{name}", console.static),
        Route("/console/events", console.events),
        Route("/console/state", console.state),
        Route("/console/approvals/{entry_id}", console.decide, methods=["POST"]),
        Route("/console/pins", console.pins),
        Route("/console/pins/approve", console.approve_pin, methods=["POST"]),
    ]
    return Guard(Starlette(routes=routes), gate, allowed_hosts, tls=tls)


class Mounted:
    """The console's paths (`/console`, `/console/…`) to the console, everything else to `rest` (404 when
    there is none, without a word about the console)."""

    def __init__(self, console: ASGIApp, rest: ASGIApp | None = None) -> None:
        self._console = console
        self._rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ours = scope["type"] == "http" and (scope["path"] == PREFIX or scope["path"].startswith(PREFIX + "/"))
        if ours or (self._rest is None and scope["type"] == "http"):
            await (self._console if ours else _not_here)(scope, receive, send)
        elif self._rest is not None:
            await self._rest(scope, receive, send)


async def _not_here(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, 404, b'{"error": "not found"}', [(b"content-type", b"application/json")])


class Console:
    """The console's handlers, over one config's audit log and approval queue."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.queue = approval_queue(config)
        self._reviewing = anyio.Lock()
        """One review at a time: each starts every upstream once."""
        self.streams: dict[str, int] = {}
        """Live streams open, by viewer."""
        self.walks = Walks(INTEGRITY_EVERY)

    async def page(self, request: Request) -> Response:
        session, _ = viewer_of(request.scope)
        text = (files("gateway.console") / "static" / "index.html").read_text(encoding="utf-8")
        # The CSRF token is URL-safe base64: nothing in it needs escaping in an attribute.
        return Response(text.replace(_CSRF_MARK, session.csrf), media_type="text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return JSONResponse({"error": "not found"}, status_code=404)
        body = (files("gateway.console") / "static" / name).read_bytes()
        return Response(body, media_type=STATIC[name])

    async def state(self, request: Request) -> Response:
        """Everything a page is sent on connect, as one JSON list (for scripts and tests)."""
        session, _ = viewer_of(request.scope)
        feed = AuditFeed(self.config)
        try:
            messages = await anyio.to_thread.run_sync(self._first, feed, QueueFeed(self.queue), session.viewer)
        finally:
            await anyio.to_thread.run_sync(feed.close)
        return JSONResponse(messages)

    def _first(self, feed: AuditFeed, queue: QueueFeed, viewer: Viewer) -> list[Message]:
        hello = {"type": "hello", "viewer": viewer.name, "approver": viewer.approver, "on_disk": feed.on_disk}
        walked = self.walks.integrity(feed, self.walks.clock() - self.walks.every())  # never None: one is due
        return [hello, *feed.history(), *([walked] if walked else []), feed.policy(), *queue.poll(force=True)]

    async def events(self, request: Request) -> Response:
        session, gate = viewer_of(request.scope)
        name = session.viewer.name
        if self.streams.get(name, 0) >= MAX_STREAMS:
            error = f"'{name}' has {MAX_STREAMS} console pages connected already: close one"
            return JSONResponse({"error": error}, status_code=429)
        self.streams[name] = self.streams.get(name, 0) + 1
        return _Counted(self.streams, name, self._stream(session.viewer, gate))

    async def _stream(self, viewer: Viewer, gate: Gate) -> AsyncIterator[str]:
        feed, queue = AuditFeed(self.config), QueueFeed(approval_queue(self.config))
        try:
            try:
                first = await anyio.to_thread.run_sync(self._first, feed, queue, viewer)
            except GatewayError as exc:
                first = [{"type": "error", "text": str(exc)}]
            yield _sse({"type": "batch", "messages": first})
            clock = anyio.current_time
            rechecked = clock()
            unverified: float | None = self.walks.clock()  # the walk sent may be older than the page
            while True:
                await anyio.sleep(POLL)
                try:
                    messages = await anyio.to_thread.run_sync(feed.poll)
                    grew = bool(messages)
                    messages += await anyio.to_thread.run_sync(queue.poll)
                except GatewayError as exc:  # a file busy or being made: said on the page, looked at again
                    messages, grew = [{"type": "error", "text": str(exc)}], True
                if grew and unverified is None:
                    unverified = self.walks.clock()
                if unverified is not None and self.walks.ready(unverified):
                    walked = await anyio.to_thread.run_sync(self.walks.integrity, feed, unverified)
                    if walked is not None:
                        messages.append(walked)
                        unverified = None
                if clock() - rechecked >= RECHECK_EVERY:
                    if not await gate.still(viewer):
                        return  # revoked: the stream ends, and the page's next request is refused
                    rechecked = clock()
                yield _sse({"type": "batch", "messages": messages}) if messages else ": keep-alive\n\n"
        finally:
            await anyio.to_thread.run_sync(queue.queue.close)
            await anyio.to_thread.run_sync(feed.close)

    async def decide(self, request: Request) -> Response:
        session, _ = viewer_of(request.scope)
        viewer = session.viewer
        body = await _decision(request, viewer, '{"approve": true|false, "binding": "...", "note": "..."}')
        if isinstance(body, Response):
            return body
        approve, binding, note = body.get("approve"), body.get("binding"), body.get("note", "")
        if not isinstance(approve, bool) or not isinstance(binding, str) or not isinstance(note, str):
            return JSONResponse({"error": 'expected {"approve": true|false, "binding": "...", "note": "..."}'}, 400)
        entry_id = request.path_params["entry_id"]

        def decide() -> Entry:
            return self.queue.decide(
                entry_id,
                approve=approve,
                by=viewer.name,
                channel="console",
                note=note[:500],
                binding=binding,
                record=lambda decided: record_approval(self.config, decided),
            )

        try:
            decided = await anyio.to_thread.run_sync(decide)
        except GatewayError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse({"id": decided.id, "status": decided.status.value, "by": decided.decided_by})

    async def pins(self, request: Request) -> Response:
        """What is new, changed or poisoned against `upstreams.lock`: each with its diff and findings. For
        approvers only: a review starts every upstream once, which watching must not be able to cause."""
        session, _ = viewer_of(request.scope)
        if not session.viewer.approver:
            note = "definitions to review are shown to approvers (a review starts every upstream)"
            return JSONResponse({"pins": [], "note": note})
        async with self._reviewing:
            try:
                found = await review.review(self.config)
            except GatewayError as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
        shown = to_review(self.config, found)
        if found.lock is None:
            note = f"no {self.config.lock_path.name}: nothing is pinned yet (`mcp-armor lock` pins what is on offer)"
            return JSONResponse({"pins": [], "note": note})
        down = "".join(f"; upstream '{name}' did not answer" for name in found.upstreams.down)
        return JSONResponse({"pins": shown, "note": f"{len(shown)} to review{down}"})

    async def approve_pin(self, request: Request) -> Response:
        """Pin what was shown for a selector, as `mcp-armor pins approve` does, if it is still what is offered."""
        session, _ = viewer_of(request.scope)
        viewer = session.viewer
        body = await _decision(request, viewer, '{"selector": "UPSTREAM[.NAME]", "digest": "..."}')
        if isinstance(body, Response):
            return body
        selector, digest = body.get("selector"), body.get("digest")
        if not isinstance(selector, str) or not isinstance(digest, str):
            return JSONResponse({"error": 'expected {"selector": "UPSTREAM[.NAME]", "digest": "..."}'}, 400)
        async with self._reviewing:
            try:
                await anyio.to_thread.run_sync(pins_needed, self.config)
                found = await review.review(self.config)
                now = {item["selector"]: item["digest"] for item in to_review(self.config, found)}
                if now.get(selector) != digest:
                    raise ConfigError(
                        f"{selector}: not what the page showed (it changed, or was approved): review again"
                    )
                approved = await anyio.to_thread.run_sync(
                    partial(review.approve, self.config, found, selector, who=viewer.name, via="console")
                )
            except GatewayError as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
        names = ", ".join(a.item.label for a in approved.chosen) or "its server"
        shared = shared_pins(self.config)
        where = self.config.lock_path.name if shared is None else shared.label
        message = f"approved {names}; {where} written (a running gateway picks it up by itself)"
        return JSONResponse({"message": message})


class _Counted(StreamingResponse):
    """A live stream, counted against its viewer until it ends however it ends (the viewer's count is
    taken before it is returned: nothing can come between)."""

    def __init__(self, streams: dict[str, int], name: str, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"x-accel-buffering": "no"})
        self._streams, self._name = streams, name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams[self._name] -= 1


async def _decision(request: Request, viewer: Viewer, expected: str) -> dict[str, Any] | Response:
    """A decision's JSON object, from an approver; otherwise the answer refusing it (403, or 400)."""
    if not viewer.approver:
        return JSONResponse({"error": f"'{viewer.name}' may watch, not decide (role:approver)"}, status_code=403)
    too_big = JSONResponse({"error": f"a decision is at most {MAX_BODY} bytes"}, status_code=413)
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return too_big
    read = bytearray()
    async for chunk in request.stream():  # a chunked body says no length: counted as it comes
        read += chunk
        if len(read) > MAX_BODY:
            return too_big
    try:
        body = json.loads(read)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        body = None
    return body if isinstance(body, dict) else JSONResponse({"error": f"expected {expected}"}, status_code=400)


def to_review(config: Config, found: review.Review) -> list[Message]:
    """Each thing to approve, by the selector `pins approve` takes: a changed server's whole upstream, or
    one definition; its diff, its findings, and a digest of what was shown (approved only if still so)."""
    shown: list[Message] = []
    changed = {s["upstream"]: s for s in review.servers(config, found.lock, found.upstreams) if s["change"]}
    for name, server in changed.items():
        held = [a for a in found.assessments if a.item.upstream == name and a.suspect]
        diff = [f"== server {name}: not the server pinned ({server['state']})", *review.server_diff(server)]
        for assessment in held:
            diff += [f"== {assessment.item.label}", *review.definition_diff(found.lock, assessment)]
        what = [server["offered"], *(a.item.digest for a in held)]
        shown.append(_pin(name, f"server {name}: {server['change']}", diff, held, what))
    for assessment in found.assessments:
        if assessment.suspect and assessment.item.upstream not in changed:
            item = assessment.item
            title = f"{item.kind} {item.label}: {assessment.verdict}"
            diff = review.definition_diff(found.lock, assessment)
            shown.append(_pin(item.label, title, diff, [assessment], [item.digest]))
    return shown


def _pin(selector: str, title: str, diff: list[str], held: list[Assessment], what: list[Any]) -> Message:
    findings = [f"{f.severity}: {f.kind}: {f.where}: {f.detail}" for a in held for f in a.findings]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
    return {"selector": selector, "title": title, "diff": "\n".join(diff), "findings": findings, "digest": digest}


def record_approval(config: Config, decided: Entry) -> None:
    """Record a decision in the audit log before the queue commits it; raises if it cannot be recorded."""
    record_first(config, [decision_event(decided)], ApprovalsError)


def _sse(message: Message) -> str:
    return f"data: {json.dumps(message, ensure_ascii=False)}\n\n"
