"""Opening an upstream's link (a child's pipes, or an HTTP connection), and describing why one failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, TextIO

from gateway.config.environment import Passing
from gateway.config.models import UpstreamSpec
from gateway.errors import UpstreamFault, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream.processes import command_line
from gateway.upstream.session import Link
from gateway.upstream.spawn import spawn
from gateway.wire.channel import NotificationHandler, RequestHandler
from gateway.wire.framing import MAX_LINE


class Ended(Protocol):
    """Set when a connection to an upstream has ended."""

    async def wait(self) -> Any: ...


@asynccontextmanager
async def open_link(
    spec: UpstreamSpec,
    passing: Passing,
    errlog: TextIO,
    answer: RequestHandler,
    on_notify: NotificationHandler,
    limit: int = MAX_LINE,
) -> AsyncIterator[tuple[Link, Ended]]:
    """The upstream's `Link`, and an event set when its connection ends (`limit`: the largest message a
    child may send, in bytes).

    A command runs as a child process spoken to over its pipes directly; a URL goes through the SDK's
    streamable-HTTP client and JSON-RPC dispatcher.
    """
    if spec.command is not None:
        async with spawn(
            spec.name,
            command_line(spec.command, spec.args, spec.env),
            env=spec.env,
            cwd=spec.cwd,
            stderr=errlog,
            passing=passing,
            on_request=answer,
            on_notify=on_notify,
            limit=limit,
        ) as child:
            yield child.channel, child.ended
        return
    if spec.url is None:
        raise ValueError(f"upstream '{spec.name}' has neither command nor url")
    from gateway.upstream.http import open_http_link  # the SDK's HTTP client loads only for URL upstreams

    async with open_http_link(spec, answer, on_notify, limit) as (link, closed):
        yield link, closed


def describe_failure(exc: BaseException) -> str:
    """Why a connection attempt failed, in one line (the upstream's name left off: the caller names it)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_failure(inner) for inner in exc.exceptions)
    if isinstance(exc, UpstreamTimeout | UpstreamUnavailable | UpstreamFault):
        text = str(exc)
        return text.split(" ", 2)[2] if text.startswith("upstream '") else text
    if isinstance(exc, FileNotFoundError | PermissionError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"could not be started: {exc.strerror or exc}"
    if type(exc).__module__.split(".")[0] == "httpx2":  # only ever raised once an HTTP upstream loaded it
        return f"HTTP error: {exc}"
    return f"{type(exc).__name__}: {exc}"
