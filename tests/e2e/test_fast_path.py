"""The call path the gateway runs itself: the upstream channel's id map, and `tools/call` on stdio.

Unit tests drive `gateway.wire.channel.Channel` with a peer written inline (answers in any order, late,
twice, or for ids never issued). The checks that skip the specification's models for the plainest
calls and results are held to the models' verdicts and output, on chosen cases and on thousands of
seeded near misses. End-to-end tests drive a real gateway process over its pipes with a
plain JSON-RPC client: many calls in flight with mixed id types, a cancel racing its answer, and an
upstream that answers out of order and writes stray lines.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    CallToolRequestParams,
)
from mcp_types.methods import serialize_server_result, validate_client_request
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from gateway.core.requests import ToolRequest
from gateway.downstream.messages import checked_plain_call, plain_call
from gateway.errors import ChannelClosed, RemoteError, RequestTimeout
from gateway.upstream.processes import discard_ahead, start_ahead, started_ahead
from gateway.upstream.spawn import spawn
from gateway.wire.channel import Channel
from gateway.wire.framing import dumps
from gateway.wire.results import check_tool_result, plain_text_result, shape
from tests.conftest import (
    REPO,
    RawSession,
    answers,
    calls,
    events,
    fixture_upstream,
    gateway_process,
    ready,
    write_config,
)

pytestmark = pytest.mark.anyio
TOOLBOX = REPO / "tests" / "fixtures" / "toolbox.py"


class Peer:
    """The far end of a `Channel`: collects what the channel writes, answers when told to."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.arrived = anyio.Event()

    def write(self, line: bytes) -> None:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        self.sent.append(json.loads(line))
        self.arrived.set()

    def replies(self) -> dict[Any, dict[str, Any]]:
        return {message["id"]: message for message in self.sent if "method" not in message}

    async def wait_until(self, done: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not done():
                self.arrived = anyio.Event()
                await self.arrived.wait()

    def requests(self, method: str = "tools/call") -> list[dict[str, Any]]:
        return [message for message in self.sent if message.get("method") == method and "id" in message]

    def cancels(self) -> list[Any]:
        return [m["params"]["requestId"] for m in self.sent if m.get("method") == "notifications/cancelled"]

    async def wait_for(self, count: int, method: str = "tools/call") -> list[dict[str, Any]]:
        await self.wait_until(lambda: len(self.requests(method)) >= count)
        return self.requests(method)


def answer(request: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request["id"], "result": {"echo": request["params"]["arguments"]["n"]}}


async def test_concurrent_requests_each_get_their_own_answer_whatever_the_order() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    results: dict[int, Any] = {}

    async def ask(n: int) -> None:
        reply = await channel.request("tools/call", {"name": "t", "arguments": {"n": n}}, seconds=5)
        results[n] = reply["echo"]

    async with anyio.create_task_group() as tg:
        for n in range(64):
            tg.start_soon(ask, n)
        requests = await peer.wait_for(64)
        assert len({request["id"] for request in requests}) == 64  # every request got an id of its own
        random.Random(7).shuffle(requests)
        for request in requests:
            channel.receive(answer(request))
    assert results == {n: n for n in range(64)}


async def test_an_answer_for_an_unknown_or_settled_id_is_dropped() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    channel.receive({"jsonrpc": "2.0", "id": 41, "result": {"stray": True}})  # never issued
    channel.receive({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}})
    channel.receive(["not", "an", "object"])
    async with anyio.create_task_group() as tg:
        got: list[Any] = []

        async def ask() -> None:
            got.append(await channel.request("tools/call", {"name": "t", "arguments": {"n": 1}}, seconds=5))

        tg.start_soon(ask)
        [request] = await peer.wait_for(1)
        channel.receive(answer(request))
        channel.receive({"jsonrpc": "2.0", "id": request["id"], "result": {"echo": "again"}})  # a second answer
    assert got == [{"echo": 1}]


async def test_a_cancel_racing_the_answer_leaves_the_channel_consistent() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def ask() -> None:
            with scope:
                outcome.append(
                    str(await channel.request("tools/call", {"name": "t", "arguments": {"n": 1}}, seconds=5))
                )
            outcome.append("cancelled" if scope.cancelled_caught else "answered")

        tg.start_soon(ask)
        [request] = await peer.wait_for(1)
        # The answer and the cancellation land in the same turn of the event loop.
        channel.receive(answer(request))
        scope.cancel()
    # Either way the caller saw exactly one ending, and no cancel went out for an answered request.
    assert outcome in (["{'echo': 1}", "answered"], ["cancelled"])
    if outcome == ["cancelled"]:
        assert peer.cancels() in ([], [request["id"]])
    channel.receive(answer(request))  # the late duplicate is dropped
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(channel.request, "tools/call", {"name": "t", "arguments": {"n": 2}}, seconds=5))
        second = (await peer.wait_for(2))[1]
        channel.receive(answer(second))
    assert second["id"] != request["id"]


async def test_a_cancelled_caller_sends_a_courtesy_cancel_and_a_late_answer_is_dropped() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(channel.request, "tools/call", {"name": "t", "arguments": {"n": 1}}, seconds=5))
        [request] = await peer.wait_for(1)
        tg.cancel_scope.cancel()
    assert peer.cancels() == [request["id"]]
    channel.receive(answer(request))


async def test_a_timeout_raises_and_cancels_upstream() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    with pytest.raises(RequestTimeout):
        await channel.request("tools/call", {"name": "t", "arguments": {"n": 1}}, seconds=0.05)
    [request] = peer.requests()
    assert peer.cancels() == [request["id"]]
    without = await _ask_without_cancel(channel, peer)
    assert without == []


async def _ask_without_cancel(channel: Channel, peer: Peer) -> list[Any]:
    before = len(peer.cancels())
    with pytest.raises(RequestTimeout):
        await channel.request("initialize", {}, seconds=0.05, cancel_on_abandon=False)
    return peer.cancels()[before:]


async def test_errors_closing_and_progress() -> None:
    peer = Peer()
    channel = Channel("test", peer.write)
    progress: list[tuple[float, float | None, str | None]] = []
    relayed = anyio.Event()

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))
        relayed.set()

    async with anyio.create_task_group() as tg:
        errors: list[BaseException] = []

        async def ask(n: int) -> None:
            try:
                await channel.request(
                    "tools/call", {"name": "t", "arguments": {"n": n}}, seconds=5, on_progress=on_progress
                )
            except (RemoteError, ChannelClosed) as exc:
                errors.append(exc)

        tg.start_soon(ask, 1)
        tg.start_soon(ask, 2)
        first, _ = await peer.wait_for(2)
        token = first["params"]["_meta"]["progressToken"]
        channel.receive(
            {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progressToken": token, "progress": 1, "total": 4},
            }
        )
        channel.receive(
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 999, "progress": 1}}
        )
        with anyio.fail_after(5):
            await relayed.wait()
        channel.receive({"jsonrpc": "2.0", "id": first["id"], "error": {"code": -32602, "message": "bad n"}})
        channel.close("the pipe broke")
    assert progress == [(1.0, 4.0, None)]
    assert sorted(type(exc).__name__ for exc in errors) == ["ChannelClosed", "RemoteError"]
    remote = next(exc for exc in errors if isinstance(exc, RemoteError))
    assert (remote.code, remote.message) == (-32602, "bad n")
    with pytest.raises(ChannelClosed):
        await channel.request("ping", None, seconds=1)


async def test_the_peers_own_requests_are_answered() -> None:
    peer = Peer()

    async def on_request(method: str, params: Any) -> dict[str, Any]:
        if method == "ping":
            return {}
        raise RemoteError(-32601, f"'{method}' is not served")

    channel = Channel("test", peer.write, on_request=on_request)
    channel.receive({"jsonrpc": "2.0", "id": "p1", "method": "ping"})
    channel.receive({"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {}})
    await peer.wait_until(lambda: len(peer.replies()) == 2)
    replies = peer.replies()
    assert replies["p1"] == {"jsonrpc": "2.0", "id": "p1", "result": {}}
    assert replies[5]["error"]["code"] == -32601


async def test_a_request_the_peer_cancels_is_stopped_and_never_answered() -> None:
    peer = Peer()
    started, stopped = anyio.Event(), anyio.Event()

    async def on_request(method: str, params: Any) -> dict[str, Any]:
        if method == "ping":
            return {}
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()
        raise AssertionError("not reached")

    channel = Channel("test", peer.write, on_request=on_request)
    channel.receive({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}})
    with anyio.fail_after(5):
        await started.wait()
        # "1" is not 1: a cancel for another id leaves it running (the ping is answered after the
        # cancelled task, had it been cancelled, would have stopped).
        channel.receive({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "1"}})
        channel.receive({"jsonrpc": "2.0", "id": "1", "method": "ping"})
        await peer.wait_until(lambda: len(peer.replies()) == 1)
        assert not stopped.is_set()
        channel.receive({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        await stopped.wait()
    assert peer.replies() == {"1": {"jsonrpc": "2.0", "id": "1", "result": {}}}  # never an answer for 1


def test_lines_are_compact_and_never_carry_nan() -> None:
    assert dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}\n'.encode()
    assert json.loads(dumps({"x": float("nan"), "y": [float("inf")]})) == {"x": None, "y": [None]}
    # A lone surrogate cannot be UTF-8: it stays escaped, as JSON carried it.
    assert dumps({"t": "a\ud800é"}) == b'{"t":"a\\ud800\\u00e9"}\n'
    assert json.loads(dumps({"t": "a\ud800é"})) == {"t": "a\ud800é"}


VERSIONS = [*HANDSHAKE_PROTOCOL_VERSIONS, *MODERN_PROTOCOL_VERSIONS]
TEXT = {"type": "text", "text": "hello é"}
PLAIN_RESULTS: list[dict[str, Any]] = [
    {"content": [TEXT]},
    {"content": [TEXT, {"type": "text", "text": ""}], "isError": False},
    {"content": [], "isError": True},
    {"content": [TEXT], "isError": None},
]
OTHER_RESULTS: list[dict[str, Any]] = [
    {"content": [TEXT], "structuredContent": {"n": 1}},
    {"content": [{**TEXT, "annotations": {"priority": 0.5}}]},
    {"content": [{**TEXT, "extra": 1}], "isError": 0},
    {"content": [{"type": "image", "data": "aGk=", "mimeType": "image/png"}]},
    {"content": [TEXT], "_meta": {"k": "v"}, "unknown": 1},
    {"content": [TEXT], "resultType": "input_required"},
]


@pytest.mark.parametrize("version", VERSIONS)
def test_an_upstream_result_is_shaped_as_the_specifications_sieve_shapes_it(version: str) -> None:
    modern = version in MODERN_PROTOCOL_VERSIONS
    for raw in PLAIN_RESULTS + OTHER_RESULTS:
        expected = serialize_server_result("tools/call", version, {**raw, "resultType": "complete"} if modern else raw)
        checked = check_tool_result(raw, version)
        assert json.dumps(checked) == json.dumps(expected), raw  # the same keys, in the same order
        assert json.dumps(shape("tools/call", version, checked)) == json.dumps(expected), raw
        assert (plain_text_result(raw, modern=modern) is not None) == (raw in PLAIN_RESULTS)
        # A plain result, once checked, is shaped on the fast path too (a 2026 one carries its resultType).
        assert raw not in PLAIN_RESULTS or plain_text_result(checked, modern=modern) is not None
    for malformed in ({"content": [{"type": "text", "text": 5}]}, {"content": "text"}, {"isError": False}):
        with pytest.raises(ValidationError):
            check_tool_result(malformed, version)


def test_a_plain_call_gets_the_models_verdict_and_parameters() -> None:
    plain = [
        {"name": "box__echo", "arguments": {"text": "hi", "n": [1, {"a": None}]}},
        {"name": "box__echo"},
        {"name": "", "arguments": None},
        {"name": "t", "arguments": {}, "_meta": {"progressToken": 7}},
        {"name": "t", "_meta": {"progressToken": "p"}},
    ]
    others = [
        None,
        {},
        {"name": 5},
        {"name": "t", "arguments": []},
        {"name": "t", "arguments": "x"},
        {"name": "t", "_meta": {}},
        {"name": "t", "_meta": {"progressToken": True}},
        {"name": "t", "_meta": {"progressToken": 1.5}},
        {"name": "t", "_meta": {"progressToken": 1, "other": 2}},
        {"name": "t", "_meta": []},
        {"name": "t", "task": {"ttl": 5}},
    ]
    for params in plain:
        built = plain_call(params)
        assert built is not None, params
        for version in HANDSHAKE_PROTOCOL_VERSIONS:
            validate_client_request("tools/call", version, params)  # the specification admits it
        assert built == ToolRequest.of(CallToolRequestParams.model_validate(params, by_name=False))
    for params in others:
        assert plain_call(params) is None, params


Field = tuple[float, Callable[[random.Random], Any]]
"""How often a field is present, and how its value is drawn."""


def near_miss(rng: random.Random, fields: dict[str, Field]) -> dict[str, Any]:
    """A dict with each field present as often as it says (and now and then a stray key)."""
    drawn = {key: value(rng) for key, (present, value) in fields.items() if rng.random() < present}
    if rng.random() < 0.05:
        drawn["stray"] = any_value(rng)
    return drawn


def any_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, small, nested now and then."""
    atoms = [None, True, False, 0, 7, -1, 1.5, "", "text", "é ☃", "\ud800"]
    roll = rng.random()
    if depth < 2 and roll < 0.15:
        return [any_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if depth < 2 and roll < 0.3:
        return {rng.choice(["a", "text", "type", "n"]): any_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice(atoms)


def mostly(right: Callable[[random.Random], Any], odds: float = 0.85) -> Callable[[random.Random], Any]:
    """Draw with `right` most of the time, any value otherwise."""
    return lambda rng: right(rng) if rng.random() < odds else any_value(rng)


def text_block(rng: random.Random) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text" if rng.random() < 0.9 else "image", "text": mostly(lambda _: "é")(rng)}
    if rng.random() < 0.1:
        block[rng.choice(["annotations", "_meta", "mimeType", "stray"])] = rng.choice([{}, {"priority": 0.5}, "x"])
    if rng.random() < 0.05:
        del block["text"]
    return block


CALL_FIELDS: dict[str, Field] = {
    "name": (0.95, mostly(lambda rng: rng.choice(["box__echo", "", "é"]))),
    "arguments": (0.7, mostly(lambda rng: rng.choice([{}, {"text": "hi", "n": [1, None]}, {"a": {"b": "\ud800"}}]))),
    "_meta": (0.4, mostly(lambda rng: {"progressToken": rng.choice([1, "p", 0, True, 1.5, None, [], {}])}, 0.7)),
    "task": (0.05, lambda rng: {"ttl": 5}),
}
RESULT_FIELDS: dict[str, Field] = {
    "content": (0.95, mostly(lambda rng: [mostly(text_block, 0.9)(rng) for _ in range(rng.randrange(3))])),
    "isError": (0.5, mostly(lambda rng: rng.choice([True, False, None]))),
    "structuredContent": (0.05, lambda rng: {"n": 1}),
    "_meta": (0.05, lambda rng: {"k": "v"}),
}


def envelope(version: str) -> dict[str, Any]:
    return {
        PROTOCOL_VERSION_META_KEY: version,
        CLIENT_CAPABILITIES_META_KEY: {},
        CLIENT_INFO_META_KEY: {"name": "near-miss", "version": "1"},
    }


def test_random_near_misses_never_pass_the_fast_checks_wrongly() -> None:
    """Thousands of seeded, almost-right calls and results: whatever the fast paths accept, the
    specification's models accept too, with the same values (and the same bytes for a result)."""
    rng = random.Random(20261124)
    for _ in range(3000):
        params = near_miss(rng, CALL_FIELDS)
        built = plain_call(params)
        try:
            expected = ToolRequest.of(CallToolRequestParams.model_validate(params, by_name=False))
            for version in HANDSHAKE_PROTOCOL_VERSIONS:
                validate_client_request("tools/call", version, params)
        except ValidationError:
            assert built is None, params
            continue
        assert built is None or built == expected, params
    for _ in range(3000):
        params = near_miss(rng, CALL_FIELDS)
        version = rng.choice(VERSIONS)
        if version in MODERN_PROTOCOL_VERSIONS:  # the 2026 envelope, and whatever else `_meta` was drawn with
            meta = params["_meta"] if isinstance(params.get("_meta"), dict) else {}
            params["_meta"] = {**meta, **envelope(version)}
        try:
            validate_client_request("tools/call", version, params)
        except ValidationError:
            continue
        # Passed by the specification's model: built as it is, it is what the SDK's model builds, and
        # where that model is stricter (a null progress token) it still decides.
        checked = checked_plain_call(params)
        try:
            expected = ToolRequest.of(CallToolRequestParams.model_validate(params, by_name=False))
        except ValidationError:
            assert checked is None, (version, params)
            continue
        assert checked is None or checked == expected, (version, params)
    for _ in range(3000):
        raw = near_miss(rng, RESULT_FIELDS)
        for version in VERSIONS:
            modern = version in MODERN_PROTOCOL_VERSIONS
            fast = plain_text_result(raw, modern=modern)
            try:
                expected = serialize_server_result(
                    "tools/call", version, {**raw, "resultType": "complete"} if modern else raw
                )
            except ValidationError:
                assert fast is None, raw
                continue
            if fast is not None:
                assert json.dumps(fast) == json.dumps(expected), (version, raw)


# -- end to end: the gateway's stdio front and its upstream channel ----------------------------------


@pytest.fixture
def shuffled(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"box": fixture_upstream("toolbox.py"), "mix": fixture_upstream("shuffler.py")})


async def test_many_calls_in_flight_with_mixed_ids_are_answered_by_id(shuffled: Path) -> None:
    async with gateway_process(shuffled) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        ids: list[Any] = [n if n % 2 else f"req-{n}" for n in range(1, 41)]
        batch = b"".join(
            (
                json.dumps({"jsonrpc": "2.0", **raw.call(i, "box__echo" if n % 4 else "mix__echo", {"text": f"t{n}"})})
                + "\n"
            ).encode()  # type: ignore[arg-type]
            for n, i in enumerate(ids, start=1)
        )
        assert proc.stdin is not None
        await proc.stdin.send(batch)  # all forty at once, in one write
        found = await answers(raw, set(ids))
    for n, request_id in enumerate(ids, start=1):
        assert found[request_id]["result"]["content"][0]["text"] == f"t{n}", found[request_id]
    outcomes = [event for event in events(shuffled.parent) if event["kind"] == "outcome"]
    assert len(outcomes) == 40 and {event["outcome"] for event in outcomes} == {"ok"}


async def test_a_clients_ids_7_and_string_7_are_two_requests_and_a_cancel_names_one(shuffled: Path) -> None:
    """Ids of different types are different ids: 7 and "7" are both answered, and a cancel naming "7"
    withdraws that request alone (a cancel naming "8" leaves request 8 running). They used to share one
    entry: a cancel naming "7" withdrew both, and neither was answered."""
    async with gateway_process(shuffled) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        with anyio.fail_after(30):
            await raw.send(raw.call(7, "mix__hold", {"n": 7}))
            await raw.send({**raw.call(0, "mix__hold", {"n": 70}), "id": "7"})
            await raw.send(raw.call(8, "mix__hold", {"n": 8}))
            await raw.send({"method": "notifications/cancelled", "params": {"requestId": "7"}})
            await raw.send({"method": "notifications/cancelled", "params": {"requestId": "8"}})
            await raw.send(raw.call(10, "mix__release", {}))
        found = await answers(raw, {7, 8, 10})
        with anyio.fail_after(30):
            await raw.send(raw.call(11, "mix__echo", {"text": "after"}))
            found.update(await answers(raw, {11}))
    assert found[7]["result"]["content"][0]["text"] == "held 7"
    assert found[8]["result"]["content"][0]["text"] == "held 8"
    assert "7" not in found  # the cancelled one is never answered


async def test_an_upstream_answering_out_of_order_with_stray_lines(shuffled: Path) -> None:
    async with gateway_process(shuffled) as (proc, log):
        raw = RawSession(proc)
        await ready(raw)
        with anyio.fail_after(30):
            for n in range(1, 4):
                await raw.send(raw.call(n, "mix__hold", {"n": n}))
            await raw.send(raw.call(10, "mix__release", {}))
        found = await answers(raw, {1, 2, 3, 10})
        # The upstream's stray answer and garbage line cost nothing: the session goes on.
        with anyio.fail_after(30):
            await raw.send(raw.call(11, "mix__echo", {"text": "still here"}))
            after = await answers(raw, {11})
        await log.wait_for(r"upstream 'mix' wrote a line that is not JSON; ignored")
    assert {n: found[n]["result"]["content"][0]["text"] for n in (1, 2, 3)} == {n: f"held {n}" for n in (1, 2, 3)}
    assert found[10]["result"]["content"][0]["text"] == "released"
    assert after[11]["result"]["content"][0]["text"] == "still here"


async def test_a_cancel_racing_its_answer_ends_the_call_once(shuffled: Path) -> None:
    async with gateway_process(shuffled) as (proc, _):
        raw = RawSession(proc)
        await ready(raw)
        lines = []
        for n in range(1, 21):
            lines.append({"jsonrpc": "2.0", **raw.call(n, "box__echo", {"text": f"r{n}"})})
            lines.append({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": n}})
        assert proc.stdin is not None
        await proc.stdin.send("".join(json.dumps(line) + "\n" for line in lines).encode())
        with anyio.fail_after(30):
            await raw.send(raw.call(99, "box__echo", {"text": "after"}))
            found = await answers(raw, {99})
    assert found[99]["result"]["content"][0]["text"] == "after"
    # A call the cancel caught is never answered; one it missed is answered correctly, and only once.
    for n in range(1, 21):
        if n in found:
            assert found[n]["result"]["content"][0]["text"] == f"r{n}"
    per_call: dict[str, list[str]] = {}
    for event in events(shuffled.parent):
        if event["kind"] in ("decision", "outcome"):
            per_call.setdefault(event["call_id"], []).append(event["kind"])
    assert len(per_call) == 21 and all(kinds == ["decision", "outcome"] for kinds in per_call.values())
    assert calls(shuffled.parent)["box__echo"]["outcome"]["outcome"] == "ok"


# -- upstreams started ahead of the gateway ------------------------------------------------------------


async def test_serve_adopts_the_upstream_it_started_ahead(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    async with gateway_process(config, "--verbose") as (proc, log):
        raw = RawSession(proc)
        await ready(raw)
        match = await log.wait_for(r"upstream 'box': adopted the process started ahead \(pid (\d+)\)")
        with anyio.fail_after(30):
            await raw.send(raw.call(1, "box__pid", {}))
            found = await answers(raw, {1})
    assert found[1]["result"]["content"][0]["text"] == match.group(1)


async def test_a_process_started_ahead_that_nobody_adopts_is_stopped(tmp_path: Path) -> None:
    script = tmp_path / "idle.py"
    script.write_text("import sys\nfor line in sys.stdin:\n    pass\n")
    with (tmp_path / "idle.log").open("a") as log:
        start_ahead([sys.executable, str(script)], env={}, cwd=None, stderr=log)
    [process] = started_ahead()
    assert process.poll() is None
    # The pool asks for something else (the config changed in between): the early one is left over.
    async with spawn("box", [sys.executable, str(TOOLBOX)], env={}, cwd=None, stderr=sys.stderr) as child:
        assert child.pid != process.pid
        assert started_ahead() == [process]
    await anyio.to_thread.run_sync(discard_ahead)
    assert process.poll() is not None and not started_ahead()


async def test_an_invalid_config_stops_what_was_started_ahead_from_it(tmp_path: Path) -> None:
    """The early start reads the file unvalidated; when the full reading refuses it, the command says
    why in one line and the process started ahead does not outlive it (even one that ignores EOF)."""
    script = tmp_path / "stubborn.py"
    pid_file = tmp_path / "pid"
    script.write_text(
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "sys.stdin.read()\n"
        "time.sleep(60)\n"
    )
    config = write_config(tmp_path, {"stubborn": {"command": sys.executable, "args": [str(script)]}}, colour="red")
    async with gateway_process(config) as (proc, log):
        await log.wait_for("unknown key")
        with anyio.fail_after(30):
            assert await proc.wait() == 2
    assert log.text.strip().splitlines() == [f"mcp-armor: error: {config}: [gateway] colour: unknown key"]
    assert ended(int(pid_file.read_text()))


def ended(pid: int) -> bool:
    """Whether a process (not necessarily a child of ours) has exited: gone, or a zombie left unreaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_serve_http_without_its_token_starts_nothing_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.launch import start_ahead

    monkeypatch.delenv("REVIEW_UNSET_TOKEN", raising=False)
    script = tmp_path / "idle.py"
    script.write_text("import sys\nfor line in sys.stdin:\n    pass\n")
    path = tmp_path / "upstreams.toml"
    path.write_text(
        f'[gateway.http]\ntoken = "${{REVIEW_UNSET_TOKEN}}"\n'
        f"[upstreams.idle]\ncommand = {json.dumps(sys.executable)}\nargs = [{json.dumps(str(script))}]\n"
    )
    try:
        start_ahead(["serve", "--http", "127.0.0.1:0", "--config", str(path)])
        assert started_ahead() == []
    finally:
        discard_ahead()


@pytest.mark.parametrize(
    ("words", "token", "started"),
    [
        (["serve", "--ht=127.0.0.1:0", "--config", "CONFIG"], None, 0),  # argparse reads `--ht` as `--http`
        (["serve", "--conf=CONFIG"], None, 1),  # serving stdio needs no token
        (["serve", "--http", "127.0.0.1:0", "--config", "CONFIG"], "t" * 24, 1),
    ],
    ids=["abbreviated-http-unset-token", "stdio-unset-token", "http-token-set"],
)
def test_serving_http_is_recognised_however_spelled_and_only_it_needs_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, words: list[str], token: str | None, started: int
) -> None:
    from gateway.launch import start_ahead

    if token is None:
        monkeypatch.delenv("ARMOR_TEST_AHEAD_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ARMOR_TEST_AHEAD_TOKEN", token)
    script = tmp_path / "idle.py"
    script.write_text("import sys\nfor line in sys.stdin:\n    pass\n")
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway.http]\ntoken = "${ARMOR_TEST_AHEAD_TOKEN}"\n'
        f"[upstreams.idle]\ncommand = {json.dumps(sys.executable)}\nargs = [{json.dumps(str(script))}]\n"
    )
    try:
        start_ahead([word.replace("CONFIG", str(path)) for word in words])
        assert len(started_ahead()) == started
    finally:
        discard_ahead()
