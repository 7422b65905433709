"""What upstreams send on their own, routed to the one session it belongs to: log messages and
resource updates; and what sessions ask to receive: their log level, their resource subscriptions.

Upstream connections are shared by every session, so nothing an upstream sends outside an answer goes
to "everyone":

- A log message (`notifications/message`) carries no request id: it goes to the caller of the one
  call in flight to that upstream, screened by that call's result rules like a progress message, and
  only at the level that session asked for (`logging/setLevel` on a handshake-era connection; the
  request's own `io.modelcontextprotocol/logLevel` in 2026-07-28, without which it gets none). With
  several calls in flight, or none, which call it concerns cannot be told: it is dropped.
- A resource update (`notifications/resources/updated`) goes to each session that subscribed to that
  URI at that upstream (a subscription is decided as a read of the URI), and only while the policy in
  force would still allow that subscription.

Each upstream is asked for the most verbose level any session has asked for; each session then
receives only what its own level admits. An upstream is subscribed to a URI while any session follows
it, and unsubscribed when the last one stops (or ends).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
import mcp_types as types
from pydantic import ValidationError

from gateway.calls import Effect, LogFn, SessionInfo, ToolCall
from gateway.catalog.uris import normal_uri
from gateway.core.requests import Caller
from gateway.policy.engine import PolicyEngine
from gateway.policy.rules import RESOURCE_PREFIX

logger = logging.getLogger(__name__)
_logger = logger  # for closures whose parameter is named `logger`, as the protocol names it

SEND_LIMIT = 1.0
"""Seconds a client has to take one notice; one that does not is sent no more of them (for that call, or
that subscription), so a client that stops reading never holds up what the upstream sends others."""
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""The protocol's log levels (RFC 5424's severities), least severe first."""


def admits(threshold: str | None, level: str) -> bool:
    """Whether a message at `level` passes a session's chosen `threshold` (`None`: nothing chosen, all pass)."""
    if threshold is None:
        return True
    return level in LOG_LEVELS and threshold in LOG_LEVELS and LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)


LOGGED = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})
"""The requests during which an upstream's log messages reach the caller."""
SendLog = Callable[[dict[str, Any]], Awaitable[None]]
"""Writes one `notifications/message` (its parameters) to the caller, with the request it belongs to."""


def requested_log_level(params: Mapping[str, Any] | None) -> str | None:
    """A 2026-07-28 request's own log level (`_meta`), when it names a valid one."""
    meta = params.get("_meta") if params is not None else None
    level = meta.get(types.LOG_LEVEL_META_KEY) if isinstance(meta, Mapping) else None
    return level if level in LOG_LEVELS else None


Updated = Callable[[str], Awaitable[None]]
Unsubscribe = Callable[[str, str, str], Awaitable[None]]
"""Withdraws the gateway's subscription to a URI (as the upstream spelt it) at an upstream, on the
connection a principal's calls run on."""
ConnectionOf = Callable[[str, str], tuple[str, str | None]]
"""The connection a principal's calls to an upstream run on (`UpstreamPool.connection`)."""


def _shared(upstream: str, principal: str) -> tuple[str, str | None]:
    return (upstream, None)


SetLevel = Callable[[str], Awaitable[None]]
"""Asks every upstream for log messages from this level up."""


def _log_relay(send: SendLog, threshold: Callable[[], str | None]) -> LogFn:
    """Relays a call's log messages at `threshold`; a client that does not take one within `SEND_LIMIT`
    is sent none of the call's others (its upstream's other callers wait for nobody)."""
    stalled = False

    async def relay(level: str, data: Any, logger: str | None) -> None:
        nonlocal stalled
        if stalled or not admits(threshold(), level):
            return
        params: dict[str, Any] = {"level": level, "data": data}
        if logger is not None:
            params["logger"] = logger
        with anyio.move_on_after(SEND_LIMIT) as waited:
            await send(params)
        if waited.cancelled_caught:
            stalled = True
            _logger.warning("a client took no log message for %ss; its call's others are dropped", SEND_LIMIT)

    return relay


@dataclass(frozen=True, slots=True)
class _Follower:
    session: SessionInfo
    updated: Updated
    forwarded: str
    """The URI as the upstream was asked to follow it."""
    asked: str
    """The URI as the session asked to follow it (its updates name it so)."""
    arguments: Mapping[str, Any]
    """What the subscription was decided on (`{"uri": ..., **template variables}`), decided so again for each update."""


class Notices:
    """Per session: its log level and its resource subscriptions; per upstream: what it was asked for."""

    def __init__(
        self, engine: PolicyEngine, set_level: SetLevel, unsubscribe: Unsubscribe, connection: ConnectionOf = _shared
    ) -> None:
        self._engine = engine
        self._set_level = set_level
        self._unsubscribe = unsubscribe
        self._connection = connection
        """Which connection a session's subscription was made on: an upstream served per principal has one
        per principal, and tells each only of its own principal's subscriptions."""
        self.levels: dict[str, str] = {}
        """Each handshake-era session's chosen level (`logging/setLevel`)."""
        self._asked: str | None = None
        """The level upstreams were last asked for."""
        self._followers: dict[tuple[str, str], dict[str, _Follower]] = {}
        """(upstream, URI in normal form) -> session id -> the session following it."""

    # -- log levels ----------------------------------------------------------------------------

    async def choose_level(self, session: SessionInfo, level: str) -> None:
        """A handshake-era session's `logging/setLevel`: from now on it receives messages from `level` up."""
        self.levels[session.id] = level
        await self.want_level(level)

    async def want_level(self, level: str) -> None:
        """Some session wants messages from `level` up: upstreams are asked for that much, at least."""
        if self._asked is not None and LOG_LEVELS.index(self._asked) <= LOG_LEVELS.index(level):
            return
        self._asked = level
        await self._set_level(level)

    def with_logs(self, caller: Caller, method: str, params: Mapping[str, Any] | None, send: SendLog) -> Caller:
        """`caller`, taking the log messages of its request's upstream at its level: a handshake-era
        session's `logging/setLevel` (all until it chose one), a 2026-07-28 request's own (none without)."""
        if method not in LOGGED:
            return caller
        if caller.modern:
            level = requested_log_level(params)
            if level is None:
                return caller
            return replace(caller, log=_log_relay(send, lambda: level), log_level=level)
        session_id = caller.session.id
        return replace(caller, log=_log_relay(send, lambda: self.levels.get(session_id)))

    # -- subscriptions -------------------------------------------------------------------------

    def follow(
        self,
        upstream: str,
        uri: str,
        forwarded: str,
        asked: str,
        arguments: Mapping[str, Any],
        session: SessionInfo,
        updated: Updated,
    ) -> None:
        """`session` now receives the updates of `uri` (normal form) from `upstream`."""
        follower = _Follower(session, updated, forwarded, asked, arguments)
        self._followers.setdefault((upstream, uri), {})[session.id] = follower

    async def unfollow(self, uri: str, session_id: str) -> None:
        """`session_id` stops following `uri` (normal form); the last to stop has the upstream unsubscribed."""
        for key in [key for key in self._followers if key[1] == uri]:
            await self._drop(key, session_id)

    def forget(self, session_id: str) -> None:
        """A session ended: its level and its subscriptions go with it (an upstream subscription nobody
        follows any more is withdrawn when its next update comes)."""
        self.levels.pop(session_id, None)
        for followers in self._followers.values():
            followers.pop(session_id, None)

    async def _drop(self, key: tuple[str, str], session_id: str) -> None:
        followers = self._followers.get(key, {})
        follower = followers.pop(session_id, None)
        if follower is None:
            return
        if not followers:
            del self._followers[key]
        principal = follower.session.principal
        if not self._on(key[0], principal, followers.values()):
            await self._withdraw(key[0], follower.forwarded, principal)

    def _on(self, upstream: str, principal: str | None, followers: Iterable[_Follower]) -> list[_Follower]:
        """The followers whose subscription was made on the connection `principal`'s calls run on (`None`:
        on the shared one, or the one an upstream served per principal is listed on)."""
        connection = self._connection(upstream, principal) if principal is not None else (upstream, None)
        return [f for f in followers if self._connection(upstream, f.session.principal) == connection]

    async def _withdraw(self, upstream: str, forwarded: str, principal: str) -> None:
        try:
            await self._unsubscribe(upstream, forwarded, principal)
        except Exception as exc:  # the upstream may be gone; its subscriptions went with it
            logger.info("unsubscribing '%s' from %s failed (%s)", upstream, forwarded, exc)

    # -- what upstreams send -------------------------------------------------------------------

    async def relay(
        self,
        upstream: str,
        method: str,
        params: Mapping[str, Any],
        calls: Sequence[ToolCall],
        principal: str | None = None,
    ) -> None:
        """A notification `upstream` sent (on `principal`'s connection; `None`: the shared one), to the
        session it belongs to (see the module's docstring)."""
        if method == "notifications/message":
            await self._log(upstream, params, calls)
        elif method == "notifications/resources/updated":
            await self._updated(upstream, params, principal)

    async def _log(self, upstream: str, params: Mapping[str, Any], calls: Sequence[ToolCall]) -> None:
        try:
            message = types.LoggingMessageNotificationParams.model_validate(params, by_name=False)
        except ValidationError:
            logger.warning("upstream '%s' sent a malformed log message; dropped", upstream)
            return
        if len(calls) != 1:
            logger.debug("a log message from '%s' concerns no one call; dropped", upstream)
            return
        if calls[0].log is not None:
            await calls[0].log(message.level, message.data, message.logger)

    async def _updated(self, upstream: str, params: Mapping[str, Any], principal: str | None) -> None:
        uri = params.get("uri")
        if not isinstance(uri, str):
            logger.warning("upstream '%s' sent a resource update without a URI; dropped", upstream)
            return
        key = (upstream, normal_uri(uri))
        followers = self._followers.get(key)
        mine = self._on(upstream, principal, (followers or {}).values())
        if followers is not None and not mine:  # every session following it on this connection has ended
            if not followers:
                del self._followers[key]
            await self._withdraw(upstream, uri, principal or "")
            return
        for follower in mine:
            session_id = follower.session.id
            session = follower.session
            decision = self._engine.evaluate(
                RESOURCE_PREFIX + key[1],
                follower.arguments,
                now=time.monotonic(),
                who=session.who,
            )
            if decision.effect is not Effect.ALLOW:
                continue  # the policy in force would no longer let this session subscribe
            try:
                with anyio.fail_after(SEND_LIMIT):
                    await follower.updated(follower.asked)
            except Exception as exc:  # its connection is gone, or it stopped reading: so is its subscription
                logger.info("session %s could not be told of an update (%r); unsubscribed", session_id, exc)
                await self._drop(key, session_id)
