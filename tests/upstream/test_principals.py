"""Upstreams served per principal: each principal's calls run on a connection (a process, for a command)
of its own, with its own credentials; a caller the upstream has no credentials for is refused and
recorded, never served on another's connection; the agent's own token never reaches an upstream."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.types import Receive, Scope, Send

from gateway.calls import SessionInfo
from gateway.config.models import load_config, parse_config
from gateway.core.gateway import Gateway
from gateway.core.requests import Caller, Request
from gateway.downstream.http_edge import listening_socket
from gateway.downstream.serve import gateway_for
from gateway.errors import ConfigError, ProtocolError
from gateway.upstream import pool
from tests.conftest import events, fixture_upstream, http_gateway, text_of, write_config

pytestmark = pytest.mark.anyio
LABEL = "upstreams.toml"
TOKEN = "shared-http-token-0123456789"


def _parse(upstreams: dict[str, Any], environ: dict[str, str] | None = None) -> Any:
    return parse_config({"upstreams": upstreams}, Path("/tmp/upstreams.toml"), label=LABEL, environ=environ or {})


# ---- the file -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "line"),
    [
        (
            {"url": "https://gh.example/mcp", "principals": {"alice": {"env": {"TOKEN": "x"}}}},
            "[upstreams.gh]: principals.alice.env: applies to 'command' upstreams; give 'headers'",
        ),
        (
            {"command": "gh-mcp", "principals": {"alice": {"headers": {"Authorization": "x"}}}},
            "[upstreams.gh]: principals.alice.headers: apply to 'url' upstreams; give 'env'",
        ),
        (
            {"command": "gh-mcp", "principals": {"alice": {"token": "x"}}},
            "[upstreams.gh.principals.alice] token: unknown key",
        ),
        (
            {"command": "gh-mcp", "principals": {"alice": {"env": {"1TOKEN": "x"}}}},
            "[upstreams.gh]: principals.alice.env: '1TOKEN' is not a valid environment variable name",
        ),
        (
            {"command": "gh-mcp", "principals": {"ci-*": {}}},
            "[upstreams.gh]: principals: 'ci-*': a table is for one principal, named exactly (not a glob)",
        ),
        (
            {"command": "gh-mcp", "principals": {"al\nice": {}}},
            "[upstreams.gh]: principals: 'al\\nice' holds a control character, which no principal's name does",
        ),
        ({"command": "gh-mcp", "principals": "alice"}, "[upstreams.gh] principals: Input should be a valid dictionary"),
        (
            {"command": "gh-mcp", "args": ["--user", "${principal.name}"]},
            "[upstreams.gh] args.1: '${principal.name}' is only taken in headers and env values",
        ),
        (
            {"command": "gh-mcp", "env": {"ON_BEHALF_OF": "${principal.name:-nobody}"}},
            "[upstreams.gh] env.ON_BEHALF_OF: '${principal.name:-nobody}' takes no default",
        ),
    ],
)
def test_a_malformed_principal_table_or_reference_is_one_line_naming_the_upstream_and_key(
    table: dict[str, Any], line: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse({"gh": table})
    assert str(caught.value) == f"{LABEL}: {line}"


def test_an_upstream_with_principal_tables_refuses_callers_without_one_unless_its_values_name_the_caller() -> None:
    config = _parse(
        {
            "tabled": {"command": "x", "principals": {"alice": {"env": {"UPSTREAM_TOKEN": "${ALICE_TOKEN}"}}}},
            "named": {"url": "https://x.example/mcp", "headers": {"X-On-Behalf-Of": "${principal.name}"}},
            "shared": {"command": "x", "env": {"UPSTREAM_TOKEN": "${ALICE_TOKEN}"}},
        },
        {"ALICE_TOKEN": "alice-secret"},
    )
    tabled, named, shared = (config.upstreams[name] for name in ("tabled", "named", "shared"))
    assert tabled.refusal("alice") is None
    assert (
        tabled.refusal("bob")
        == "upstream 'tabled' has no credentials for principal 'bob' (no [upstreams.tabled.principals.bob] table)"
    )
    assert "not authenticated" in (tabled.refusal("") or "")
    assert named.refusal("bob") is None and "not authenticated" in (named.refusal("") or "")
    assert named.for_principal("bob").headers == {"X-On-Behalf-Of": "bob"}
    assert named.for_catalogue().headers == {}  # listed without any principal's name
    assert tabled.for_principal("alice").env == {"UPSTREAM_TOKEN": "alice-secret"}
    assert tabled.for_catalogue().env == {}
    assert not shared.per_principal and shared.refusal("") is None


def test_a_principals_header_replaces_the_upstreams_however_either_spells_its_name() -> None:
    table = {
        "url": "https://x.example/mcp",
        "headers": {"authorization": "Bearer listing", "X-Org": "acme"},
        "principals": {"alice": {"headers": {"AUTHORIZATION": "Bearer alice"}}},
    }
    assert _parse({"gh": table}).upstreams["gh"].for_principal("alice").headers == {
        "X-Org": "acme",
        "AUTHORIZATION": "Bearer alice",
    }


def test_a_variable_whose_value_is_the_principal_reference_is_not_taken_for_it() -> None:
    config = _parse(
        {
            "gh": {
                "url": "https://x.example/mcp",
                "headers": {"X-User": "${SOMEONE}", "X-Text": "$${principal.name}"},
            }
        },
        {"SOMEONE": "${principal.name}"},
    )
    spec = config.upstreams["gh"]
    assert not spec.per_principal
    assert spec.for_principal("alice").headers == {"X-User": "${principal.name}", "X-Text": "${principal.name}"}


def test_one_principals_variables_never_pass_to_another_principals_process_through_a_glob() -> None:
    config = _parse(
        {
            "gh": {
                "command": "x",
                "pass_env": ["*_TOKEN"],
                "principals": {
                    "alice": {"env": {"UPSTREAM_TOKEN": "${ALICE_TOKEN}"}},
                    "bob": {"env": {"UPSTREAM_TOKEN": "${BOB_TOKEN}"}},
                },
            }
        },
        {"ALICE_TOKEN": "a", "BOB_TOKEN": "b"},
    )
    bob, listing = config.passing("gh", "bob"), config.passing("gh")
    assert not bob.passes("ALICE_TOKEN") and bob.passes("BOB_TOKEN") and bob.passes("OTHER_TOKEN")
    assert not listing.passes("ALICE_TOKEN") and not listing.passes("BOB_TOKEN")


# ---- serving, in process ------------------------------------------------------------------------


@asynccontextmanager
async def _serving(config: Path) -> AsyncIterator[Gateway]:
    async with gateway_for(load_config(config), transport="http") as gateway, anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        with anyio.fail_after(30):
            await gateway.wait_for_startup()
        yield gateway
        tg.cancel_scope.cancel()


async def _call(gateway: Gateway, principal: str, tool: str = "who__whoami") -> dict[str, Any]:
    session = SessionInfo(f"session-of-{principal or 'nobody'}", "http", "2025-11-25", principal=principal)
    request = Request(Caller(session, modern=False, can_elicit=False), "tools/call", {"name": tool, "arguments": {}})
    with anyio.fail_after(30):
        return await gateway.dispatcher.dispatch(request)


def _seen(result: dict[str, Any]) -> dict[str, Any]:
    assert not result.get("isError"), result
    seen: dict[str, Any] = json.loads(result["content"][0]["text"])
    return seen


def _refusals(config_dir: Path) -> dict[str | None, str]:
    """Per principal, the reason of each call refused for want of credentials (decision and outcome recorded)."""
    recorded = events(config_dir)
    refused = {e["call_id"]: e for e in recorded if e["kind"] == "decision" and e.get("stage") == "credentials"}
    outcomes = {e["call_id"]: e for e in recorded if e["kind"] == "outcome" and e["call_id"] in refused}
    assert {call_id: e["outcome"] for call_id, e in outcomes.items()} == dict.fromkeys(refused, "refused")
    return {e["principal"]: e["reason"] for e in refused.values()}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture
def whoami_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALICE_TOKEN", "alice-secret")
    monkeypatch.setenv("BOB_TOKEN", "bob-secret")
    table = {
        **fixture_upstream("whoami.py"),
        "pass_env": ["*_TOKEN"],
        "principals": {
            "alice": {"env": {"UPSTREAM_TOKEN": "${ALICE_TOKEN}", "ON_BEHALF_OF": "${principal.name}"}},
            "bob": {"env": {"UPSTREAM_TOKEN": "${BOB_TOKEN}", "ON_BEHALF_OF": "${principal.name}"}},
        },
    }
    return write_config(tmp_path, {"who": table})


async def test_two_principals_run_in_two_processes_each_with_only_its_own_credentials(whoami_config: Path) -> None:
    async with _serving(whoami_config) as gateway:
        alice, bob = _seen(await _call(gateway, "alice")), _seen(await _call(gateway, "bob"))
        again = _seen(await _call(gateway, "alice"))
    # `pass_env = ["*_TOKEN"]` hands a principal's process the variable of its own table, never another's.
    assert alice["env"] == {"UPSTREAM_TOKEN": "alice-secret", "ON_BEHALF_OF": "alice", "ALICE_TOKEN": "alice-secret"}
    assert bob["env"] == {"UPSTREAM_TOKEN": "bob-secret", "ON_BEHALF_OF": "bob", "BOB_TOKEN": "bob-secret"}
    assert alice["pid"] != bob["pid"] and again["pid"] == alice["pid"]  # kept for the principal's next call


async def test_an_unauthenticated_caller_and_a_principal_without_a_table_are_refused_and_recorded(
    whoami_config: Path,
) -> None:
    async with _serving(whoami_config) as gateway:
        nobody, carol = await _call(gateway, ""), await _call(gateway, "carol")
        assert _seen(await _call(gateway, "alice"))["env"]["UPSTREAM_TOKEN"] == "alice-secret"
    assert nobody["isError"] and "not authenticated" in nobody["content"][0]["text"]
    assert carol["isError"] and "no credentials for principal 'carol'" in carol["content"][0]["text"]
    refusals = _refusals(whoami_config.parent)
    assert refusals[None] == (
        "upstream 'who' runs each call with the calling principal's own credentials, and this caller is not "
        "authenticated as a principal"
    )
    assert (
        refusals["carol"]
        == "upstream 'who' has no credentials for principal 'carol' (no [upstreams.who.principals.carol] table)"
    )
    assert set(refusals) == {None, "carol"}


@pytest.mark.parametrize("principal", ["x/../alice", "..", "bob; admin=1", "bob, alice", "carol smith", "\u00e5lice"])
async def test_a_principal_named_like_a_path_or_a_list_is_never_written_into_the_values_that_name_the_caller(
    tmp_path: Path, principal: str
) -> None:
    """An access token can name a principal with any printable characters; `${principal.name}` is a path in
    one value and a cookie or a list item in another: a name that would mean more there than a name (a
    path separator, `..`, a separator of cookies or lists, a space, anything outside `principal add`'s
    characters) is refused and recorded, and no process is started for it."""
    table = {**fixture_upstream("whoami.py"), "env": {"ON_BEHALF_OF": "/run/credentials/${principal.name}.json"}}
    config = write_config(tmp_path, {"who": table})
    async with _serving(config) as gateway:
        carol = _seen(await _call(gateway, "carol.o-k@example.com"))
        refused = await _call(gateway, principal)
        opened = {key[1] for key in gateway.pool._opened}
    assert carol["env"] == {"ON_BEHALF_OF": "/run/credentials/carol.o-k@example.com.json"}
    said = refused["content"][0]["text"]
    assert refused.get("isError") and f"cannot carry the name of principal {principal!r}" in said
    assert list(_refusals(tmp_path)) == [principal] and _refusals(tmp_path)[principal] in said
    assert opened == {"carol.o-k@example.com"}


async def test_each_principals_process_ends_when_the_gateway_shuts_down(whoami_config: Path) -> None:
    async with _serving(whoami_config) as gateway:
        pids = [_seen(await _call(gateway, name))["pid"] for name in ("alice", "bob")]
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)  # stopped (and waited for) as the gateway shut down


async def test_a_principals_idle_process_is_closed_and_its_next_call_starts_another(
    whoami_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "PRINCIPAL_IDLE", 0.2)
    async with _serving(whoami_config) as gateway:
        first = _seen(await _call(gateway, "alice"))["pid"]
        with anyio.fail_after(10):
            for _ in itertools.count():  # an external process: polled, under the deadline
                if not _alive(first):
                    break
                await anyio.sleep(0.05)
        second = _seen(await _call(gateway, "alice"))
    assert second["pid"] != first and second["env"]["UPSTREAM_TOKEN"] == "alice-secret"


async def test_a_principals_connection_listing_otherwise_is_logged_and_its_calls_follow_the_catalogue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    principals = {"alice": {"env": {"WHOAMI_EXTRA": "1"}}}
    config = write_config(tmp_path, {"who": {**fixture_upstream("whoami.py"), "principals": principals}})
    async with _serving(config) as gateway:
        assert _seen(await _call(gateway, "alice"))["pid"]
        with pytest.raises(ProtocolError, match="Unknown tool: who__extra"):  # not in the catalogue
            await _call(gateway, "alice", "who__extra")
    assert (
        "upstream 'who' lists other definitions for principal 'alice' than it is listed with; its calls follow "
        "the catalogue's"
    ) in caplog.text


# ---- a URL upstream that records what it receives ----------------------------------------------


class _Recording:
    """A streamable-HTTP MCP upstream (JSON answers) noting the headers of every request it receives."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body", False):
                break
        if scope["method"] != "POST":
            await _answer(send, 405, b"")
            return
        message = json.loads(body)
        self.requests.append((message.get("method", ""), headers))
        if "id" not in message:
            await _answer(send, 202, b"")
            return
        method, result = message["method"], {}
        if method == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "recording", "version": "1"},
            }
        elif method == "tools/list":
            result = {"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]}
        elif method == "tools/call":
            seen = {key: headers.get(key) for key in ("authorization", "x-on-behalf-of")}
            result = {"content": [{"type": "text", "text": json.dumps(seen)}]}
        await _answer(send, 200, json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode())


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def _recording_upstream() -> AsyncIterator[tuple[str, _Recording]]:
    recording = _Recording()
    server = uvicorn.Server(uvicorn.Config(recording, log_level="warning", lifespan="off"))
    with listening_socket("127.0.0.1", 0) as sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", recording
            server.should_exit = True


def _url_table(url: str, principals: dict[str, str]) -> dict[str, Any]:
    return {
        "url": url,
        "headers": {"X-On-Behalf-Of": "${principal.name}"},
        "principals": {name: {"headers": {"Authorization": f"Bearer ${{{var}}}"}} for name, var in principals.items()},
    }


async def test_a_url_upstream_receives_each_principals_own_headers_and_is_listed_without_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALICE_TOKEN", "alice-secret")
    monkeypatch.setenv("BOB_TOKEN", "bob-secret")
    async with _recording_upstream() as (url, recording):
        config = write_config(tmp_path, {"who": _url_table(url, {"alice": "ALICE_TOKEN", "bob": "BOB_TOKEN"})})
        async with _serving(config) as gateway:
            listed = list(recording.requests)
            alice, bob = _seen(await _call(gateway, "alice")), _seen(await _call(gateway, "bob"))
            carol = await _call(gateway, "carol")
    assert alice == {"authorization": "Bearer alice-secret", "x-on-behalf-of": "alice"}
    assert bob == {"authorization": "Bearer bob-secret", "x-on-behalf-of": "bob"}
    # The upstream's own values name the caller: a principal without a table runs with them alone.
    assert _seen(carol) == {"authorization": None, "x-on-behalf-of": "carol"}
    assert ("tools/list", listed[-1][1]) == listed[-1] and all(
        "authorization" not in headers and "x-on-behalf-of" not in headers for _, headers in listed
    )
    calls = [headers for method, headers in recording.requests if method == "tools/call"]
    assert [headers.get("x-on-behalf-of") for headers in calls] == ["alice", "bob", "carol"]


async def test_over_http_the_shared_token_principal_runs_with_its_own_table_and_the_agents_token_stays_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_UPSTREAM_TOKEN", "upstream-credential")
    async with _recording_upstream() as (url, recording):
        config = write_config(
            tmp_path, {"who": _url_table(url, {"token": "TEAM_UPSTREAM_TOKEN"})}, http={"token": TOKEN}
        )
        async with (
            http_gateway(config) as gateway_url,
            httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=httpx2.Timeout(30, read=60)
            ) as http,
            Client(streamable_http_client(gateway_url, http_client=http)) as client,  # type: ignore[arg-type]
        ):
            seen = json.loads(text_of(await client.call_tool("who__whoami", {})))
    assert seen == {"authorization": "Bearer upstream-credential", "x-on-behalf-of": "token"}
    assert recording.requests and all(TOKEN not in json.dumps(headers) for _, headers in recording.requests)
    assert os.environ["TEAM_UPSTREAM_TOKEN"] == "upstream-credential"


# ---- reads, gets, completions and subscriptions ---------------------------------------------------

NOTES = "chatty://files/notes.txt"


def _recorded(path: Path) -> list[tuple[str, Any]]:
    if not path.exists():
        return []
    return [(line["method"], line["params"]) for line in map(json.loads, path.read_text().splitlines())]


async def test_reads_gets_completions_and_subscriptions_follow_the_callers_own_connection(
    tmp_path: Path,
) -> None:
    record = {name: tmp_path / f"{name}.jsonl" for name in ("alice", "bob")}
    principals = {name: {"env": {"CHATTY_RECORD": str(path)}} for name, path in record.items()}
    config = write_config(tmp_path, {"chatty": {**fixture_upstream("chatty.py"), "principals": principals}})
    updates: dict[str, list[str]] = {"alice": [], "bob": []}

    async def ask(principal: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        async def updated(uri: str) -> None:
            updates[principal].append(uri)

        session = SessionInfo(f"session-of-{principal or 'nobody'}", "http", "2025-11-25", principal=principal)
        caller = Caller(session, modern=False, can_elicit=False, updated=updated)
        with anyio.fail_after(30):
            return await gateway.dispatcher.dispatch(Request(caller, method, params))

    prompt = {"name": "chatty__open", "arguments": {"file": "notes.txt"}}
    completion = {"ref": {"type": "ref/prompt", "name": "chatty__open"}, "argument": {"name": "file", "value": "n"}}
    async with _serving(config) as gateway:
        for method, params in [
            ("resources/read", {"uri": NOTES}),
            ("prompts/get", prompt),
            ("completion/complete", completion),
            ("resources/subscribe", {"uri": NOTES}),
        ]:
            for stranger in ("", "carol"):
                with pytest.raises(ProtocolError) as refused:
                    await ask(stranger, method, params)
                assert "credentials" in refused.value.message
        assert (await ask("alice", "resources/read", {"uri": NOTES}))["contents"][0]["text"] == f"contents of {NOTES}"
        assert (await ask("alice", "prompts/get", prompt))["messages"][0]["content"]["text"] == "Open notes.txt"
        assert (await ask("alice", "completion/complete", completion))["completion"]["values"] == [
            "notes.txt",
            "naughty.txt",
            "news.txt",
        ]
        for principal in ("alice", "bob"):
            await ask(principal, "resources/subscribe", {"uri": NOTES})
        touched = await ask("alice", "tools/call", {"name": "chatty__touch", "arguments": {"uri": NOTES}})
        assert touched["content"][0]["text"] == f"touched {NOTES}"
        # An answer goes after the notices its upstream sent before it: the update has been handed on.
        assert updates == {"alice": [NOTES], "bob": []}  # alice's connection's update reached her session alone
        await ask("alice", "resources/unsubscribe", {"uri": NOTES})
    assert [method for method, _ in _recorded(record["alice"])] == [
        "completion/complete",
        "resources/subscribe",
        "resources/unsubscribe",
    ]
    assert _recorded(record["bob"]) == [("resources/subscribe", {"uri": NOTES})]  # bob still follows it
    refusals = [e for e in events(tmp_path) if e["kind"] == "decision" and e.get("stage") == "credentials"]
    assert len(refusals) == 8
