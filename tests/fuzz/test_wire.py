"""Fuzzing the wire: the line reader (arbitrary bytes, split anywhere) and the dispatcher's admission
(arbitrary methods and parameters). Neither may raise; every request with a readable id is answered once."""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.calls import SessionInfo
from gateway.core.dispatch import Caps, Dispatcher, Route, check_spec
from gateway.core.requests import Caller, Request
from gateway.downstream.messages import Unreadable, error_reply, read_message
from gateway.errors import ProtocolError
from gateway.wire.framing import LineBuffer, Oversize
from gateway.wire.peer import is_request_id

LIMIT = 512
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
ids = st.integers(min_value=-(2**40), max_value=2**40) | st.text(max_size=6)
valid = st.builds(
    lambda request_id, method: {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}},
    ids,
    st.sampled_from(["ping", "tools/list", "tools/call"]),
)
noise = (
    st.binary(max_size=40)
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error"]), json_values).map(
        lambda value: json.dumps(value).encode()
    )
    | st.just(b"[" * 5000)
    | st.just(b'{"jsonrpc": "2.0", "id": 3, "method": "x", "params": {"n": NaN}}')
    | st.binary(min_size=LIMIT + 1, max_size=LIMIT + 50)
).map(lambda line: line.replace(b"\n", b" "))


def _readable_id(line: bytes) -> Any:
    """The id a line's request carries, when it is a JSON object with a method and a string or integer id."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if isinstance(message, dict) and "method" in message and is_request_id(message.get("id")):
        return message["id"]
    return None


@given(
    st.lists(st.one_of(valid.map(lambda message: json.dumps(message).encode()), noise), max_size=12),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_the_reader_never_raises_answers_each_readable_request_once_and_serves_every_valid_one(
    lines: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    chunks = [stream[start:end] for start, end in zip([0, *points], [*points, len(stream)], strict=True)]
    buffer = LineBuffer(LIMIT)
    read: list[bytes | Oversize] = []
    for chunk in chunks:
        read.extend(buffer.feed(chunk))
    assert len(read) == len(lines)  # one line out per line in, however the bytes were split
    for line, got in zip(lines, read, strict=True):
        if len(line) > LIMIT:
            assert isinstance(got, Oversize) and got.size == len(line)
            continue
        assert got == line
        outcome = read_message(got, LIMIT)
        request_id = _readable_id(line)
        if isinstance(outcome, Unreadable):
            if request_id is not None:  # answered exactly once, with its own id
                assert outcome.error is not None and outcome.id == request_id, (line, outcome)
        else:
            assert isinstance(outcome, dict)
            if "method" in outcome and "id" in outcome:
                assert outcome["id"] == request_id  # served, and answered by the connection
    for line in lines:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(message, dict) and message.get("jsonrpc") == "2.0" and message.get("params") == {}:
            assert read_message(line, LIMIT) == message  # every valid request mixed in is taken as sent


RESULTS = {"tools/call": "content", "tools/list": "tools", "resources/read": "contents", "prompts/get": "messages"}


async def _serve(request: Any, params: Any) -> dict[str, Any]:
    return {RESULTS[request.method]: []}


DISPATCHER = Dispatcher(
    {
        "tools/call": Route(types.CallToolRequestParams, _serve),
        "tools/list": Route(types.PaginatedRequestParams, _serve),
        "resources/read": Route(types.ReadResourceRequestParams, _serve),
        "prompts/get": Route(types.GetPromptRequestParams, _serve),
    },
    None,  # type: ignore[arg-type]  # nothing here is recorded: only routed methods are sent
    lambda *event: None,
    Caps(),
)
CALLER = Caller(SessionInfo("fuzz", "stdio", "2025-11-25"), modern=False, can_elicit=False)


@given(
    st.sampled_from(["tools/call", "tools/list", "resources/read", "prompts/get"]) | st.text(max_size=20),
    st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    st.sampled_from(["2025-06-18", "2025-11-25", "2026-07-28"]),
)
def test_the_dispatcher_answers_any_method_and_parameters_with_a_result_or_a_json_rpc_error(
    method: str, params: dict[str, Any] | None, version: str
) -> None:
    async def admit() -> dict[str, Any]:
        try:
            if DISPATCHER.unserved(method, version, params) is not None:
                return {"error": "refused"}
            check_spec(method, version, params)
            return {"result": await DISPATCHER.dispatch(Request(CALLER, method, params))}
        except (ProtocolError, ValidationError) as exc:
            error = error_reply(exc, method)
            assert isinstance(error["code"], int) and error["code"] != types.INTERNAL_ERROR
            return {"error": error}

    answer = anyio.run(admit)
    assert ("result" in answer) != ("error" in answer)
    assert DISPATCHER.in_flight == 0
