"""The one id rule of the gateway's JSON-RPC peer: ids of different types are different ids.

`gateway.wire.peer.Peer` is driven with a far end written inline, as the gateway uses it towards a stdio
upstream (integer ids, through `Channel`) and towards its own stdio client (string ids): an answer,
a progress notification or a cancel naming an id of another type than the request's matches nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
import pytest

from gateway.errors import ChannelClosed, RequestTimeout
from gateway.wire.channel import Channel
from gateway.wire.peer import Peer, is_request_id

pytestmark = pytest.mark.anyio


class FarEnd:
    """What the peer writes, decoded; `arrived` is set on each line."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.arrived = anyio.Event()

    def write(self, line: bytes) -> None:
        self.sent.append(json.loads(line))
        self.arrived.set()

    async def request(self) -> dict[str, Any]:
        with anyio.fail_after(5):
            while not any("method" in message and "id" in message for message in self.sent):
                self.arrived = anyio.Event()
                await self.arrived.wait()
        return next(message for message in self.sent if "method" in message and "id" in message)


@pytest.mark.parametrize(
    ("value", "valid"),
    [(7, True), ("7", True), ("", True), (-1, True), (7.0, False), (None, False), (True, False), ([7], False)],
)
def test_only_strings_and_integers_are_ids(value: Any, valid: bool) -> None:
    assert is_request_id(value) is valid


@pytest.mark.parametrize("prefix", [None, "mcp-armor-"])
async def test_an_answer_matches_only_the_id_of_its_own_type(
    prefix: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Sent as 1 (or "mcp-armor-1"): "1", 1.0, true, null, [1] (or 1) are other ids; the same id is the answer."""
    far = FarEnd()
    peer = Peer("the far end", far.write, id_prefix=prefix)
    got: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: _append(got, peer.request("ask", {}, seconds=None)))
        request_id = (await far.request())["id"]
        assert request_id == (1 if prefix is None else "mcp-armor-1")
        # Of the type sent: an unknown id (logged for debugging). Of another type: named in a warning.
        unknown = [2] if prefix is None else ["mcp-armor-1 "]
        others: list[Any] = ["1", 1.0, True, None, [1]] if prefix is None else [1, None]
        with caplog.at_level(logging.DEBUG, logger="gateway.wire.peer"):
            for other in unknown + others:
                peer.receive({"jsonrpc": "2.0", "id": other, "result": {"taken": repr(other)}})
        assert got == []
        warned = [record.message for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warned) == len(others) and all("names no request sent to it" in line for line in warned)
        peer.receive({"jsonrpc": "2.0", "id": request_id, "result": {"taken": "the same id"}})
    assert got == [{"taken": "the same id"}]


async def _append(into: list[dict[str, Any]], waiting: Any) -> None:
    into.append(await waiting)


async def test_an_upstream_answering_7_as_a_string_is_not_taken_as_the_answer() -> None:
    """The upstream side's transcript change: a response naming "1" for the request sent as 1 used to be
    taken as its answer; now the request times out (with a courtesy cancel naming 1)."""
    far = FarEnd()
    channel = Channel("echoer", far.write)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                with pytest.raises(RequestTimeout):
                    await channel.request("tools/call", {"name": "t"}, seconds=0.2)

            tg.start_soon(ask)
            request_id = (await far.request())["id"]
            channel.receive({"jsonrpc": "2.0", "id": str(request_id), "result": {"content": []}})
    cancels = [m["params"]["requestId"] for m in far.sent if m.get("method") == "notifications/cancelled"]
    assert cancels == [request_id] and isinstance(request_id, int)


async def test_progress_tokens_follow_the_id_rule() -> None:
    far = FarEnd()
    channel = Channel("echoer", far.write)
    seen: list[float] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        seen.append(done)

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: channel.request("tools/call", {"name": "t"}, seconds=5, on_progress=on_progress))
        request = await far.request()
        token = request["params"]["_meta"]["progressToken"]
        for other in (str(token), float(token), None):
            channel.receive(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": other, "progress": 1},
                }
            )
        channel.receive(
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": token, "progress": 2}}
        )
        channel.receive({"jsonrpc": "2.0", "id": request["id"], "result": {}})
    assert seen == [2.0]


@pytest.mark.parametrize("other", ["1", 1.0, True, None])
async def test_a_cancel_of_another_type_leaves_the_upstreams_request_to_be_answered(other: Any) -> None:
    far = FarEnd()
    release = anyio.Event()

    async def on_request(method: str, params: Any) -> dict[str, Any]:
        await release.wait()
        return {"model": "m"}

    channel = Channel("asker", far.write, on_request=on_request)
    channel.receive({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}})
    channel.receive({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": other}})
    release.set()
    with anyio.fail_after(5):
        while not far.sent:
            far.arrived = anyio.Event()
            await far.arrived.wait()
    assert far.sent == [{"jsonrpc": "2.0", "id": 1, "result": {"model": "m"}}]


async def test_a_request_with_no_timeout_waits_until_answered_or_closed() -> None:
    far = FarEnd()
    peer = Peer("the client", far.write, id_prefix="mcp-armor-", abandoned="no longer needed")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                with pytest.raises(ChannelClosed, match="the client disconnected"):
                    await peer.request("elicitation/create", {}, seconds=None)

            tg.start_soon(ask)
            await far.request()
            peer.close("the client disconnected")
    with pytest.raises(ChannelClosed):
        await peer.request("elicitation/create", {}, seconds=None)


async def test_an_upstreams_request_is_answered_even_when_the_gateway_faults_on_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fault of the gateway's while answering an upstream's own request is an Internal error answer, so the
    upstream is not left waiting out its own timeout (and the fault is logged, not lost in a task)."""
    far = FarEnd()

    async def on_request(method: str, params: Any) -> dict[str, Any]:
        raise RuntimeError("broke while relaying")

    channel = Channel("asker", far.write, on_request=on_request)
    channel.receive({"jsonrpc": "2.0", "id": 9, "method": "sampling/createMessage", "params": {}})
    with anyio.fail_after(5):
        while not far.sent:
            far.arrived = anyio.Event()
            await far.arrived.wait()
    (reply,) = far.sent
    assert reply["id"] == 9 and reply["error"]["code"] == -32603 and "result" not in reply
    assert "broke while relaying" not in json.dumps(reply)  # the fault's text stays in the gateway's log
    assert any("failed answering sampling/createMessage" in record.message for record in caplog.records)
