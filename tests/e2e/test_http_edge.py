"""The HTTP edge with a real `mcp-armor serve --http` process: TLS, the client address behind trusted
proxies, and the 2026-07-28 routing headers (`Mcp-Method`, `Mcp-Name`) checked against the body."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import (
    ServerLog,
    events,
    fixture_upstream,
    gateway_client,
    gateway_process,
    http_gateway,
    run_cli,
    text_of,
    write_config,
)
from tests.e2e.test_attacks_http import MODERN
from tests.e2e.test_http_and_cli import RawHttpSession, answer_of
from tests.e2e.test_wire_faults import ENVELOPE

pytestmark = pytest.mark.anyio
TOKEN = "edge-token-0123456789abcdef"


def _recording_config(tmp_path: Path, **http: Any) -> tuple[Path, Path]:
    """A config whose toolbox upstream records every call it receives, and that record's path."""
    record = tmp_path / "received.jsonl"
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(record))
    return write_config(tmp_path, {"box": box}, http=http) if http else write_config(tmp_path, {"box": box}), record


def _called(name: str, request_id: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": {"text": "routed"}}
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


MISROUTED = {
    "a method header naming another method": {"mcp-method": "tools/list", "mcp-name": "box__echo"},
    "a name header naming another tool": {"mcp-method": "tools/call", "mcp-name": "box__add"},
    "no name header": {"mcp-method": "tools/call"},
    "no method header": {"mcp-name": "box__echo"},
}


@pytest.mark.parametrize("case", sorted(MISROUTED))
async def test_a_2026_request_whose_routing_headers_disagree_with_its_body_is_answered_400_and_not_forwarded(
    tmp_path: Path, case: str
) -> None:
    config, record = _recording_config(tmp_path)
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        refused = await http.post(url, json=_called("box__echo", 1, ENVELOPE), headers={**MODERN, **MISROUTED[case]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == types.HEADER_MISMATCH
        served = await http.post(
            url,
            json=_called("box__echo", 2, ENVELOPE),
            headers={**MODERN, **MISROUTED["no name header"]} | {"mcp-name": "box__echo"},
        )
        assert "routed" in json.dumps(answer_of(served, 2)["result"])
    assert len(record.read_text().splitlines()) == 1
    decided = [event for event in events(tmp_path) if event["kind"] == "decision"]
    assert len(decided) == 1


@pytest.mark.parametrize("case", ["a method header naming another method", "a name header naming another tool"])
async def test_a_handshake_era_request_carrying_routing_headers_that_disagree_with_its_body_is_answered_400(
    tmp_path: Path, case: str
) -> None:
    """A proxy in front may route or filter on these headers whatever the era: the gateway never serves a
    request they misdescribe (a handshake-era client that sends none is served as before)."""
    config, record = _recording_config(tmp_path)
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        session = RawHttpSession(http, url)
        await session.open()
        refused = await http.post(url, json=_called("box__echo", 1), headers={**session.headers(), **MISROUTED[case]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == types.HEADER_MISMATCH
        matching = {"mcp-method": "tools/call", "mcp-name": "box__echo"}
        served = await http.post(url, json=_called("box__echo", 2), headers={**session.headers(), **matching})
        assert "routed" in json.dumps(answer_of(served, 2)["result"])
        assert "routed" in json.dumps(await session.ask(3, "tools/call", _called("box__echo", 3)["params"]))
    assert len(record.read_text().splitlines()) == 2
    assert len([event for event in events(tmp_path) if event["kind"] == "decision"]) == 2


def _listed_by(client: str, request_id: int) -> dict[str, Any]:
    """A 2026-07-28 `tools/list` from a client of its own name: a stateless session of its own."""
    meta = {**ENVELOPE, "io.modelcontextprotocol/clientInfo": {"name": client, "version": "1"}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/list", "params": {"_meta": meta}}


class _Forwarded(RawHttpSession):
    """A handshake-era session whose every request carries the same forwarding headers."""

    def __init__(self, http: httpx2.AsyncClient, url: str, forwarding: dict[str, str]) -> None:
        super().__init__(http, url)
        self.forwarding = forwarding

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.forwarding}


async def _list_as_each(url: str, forwarding: dict[str, dict[str, str]]) -> dict[str, str]:
    """Each client opens a session of its own (stateless 2026-07-28 requests would all be the one
    anonymous session) and lists the tools, sending its own forwarding headers: its session's id."""
    async with httpx2.AsyncClient(timeout=30) as http:
        return {client: await _Forwarded(http, url, headers).open() for client, headers in forwarding.items()}


def _recorded_addresses(config_dir: Path, sessions: dict[str, str]) -> dict[str, str | None]:
    starts = [event for event in events(config_dir) if event["kind"] == "session_start"]
    recorded = {event["session_id"]: event["address"] for event in starts}
    return {client: recorded.get(session_id) for client, session_id in sessions.items()}


SPOOFED = {
    "x-forwarded-for": {"x-forwarded-for": "203.0.113.9"},
    "forwarded": {"forwarded": "for=203.0.113.9"},
    "both": {"x-forwarded-for": "203.0.113.9", "forwarded": 'for="[2001:db8::9]"'},
    "none": {},
}


async def test_forwarding_headers_from_a_peer_that_is_not_a_trusted_proxy_are_ignored(tmp_path: Path) -> None:
    """With no trusted proxies, a loopback client cannot choose the address recorded (uvicorn's own
    proxy handling would have believed X-Forwarded-For from 127.0.0.1)."""
    config, _ = _recording_config(tmp_path)
    async with http_gateway(config) as url:
        sessions = await _list_as_each(url, SPOOFED)
    assert _recorded_addresses(tmp_path, sessions) == dict.fromkeys(SPOOFED, "127.0.0.1")


FORWARDED_BY_TRUSTED = {
    "appended": ({"x-forwarded-for": "198.51.100.7, 203.0.113.9, 10.1.2.3"}, "203.0.113.9"),
    "one hop": ({"x-forwarded-for": "198.51.100.7"}, "198.51.100.7"),
    "with a port": ({"x-forwarded-for": "203.0.113.9:4711"}, "203.0.113.9"),
    "rfc 7239": ({"forwarded": 'for=198.51.100.7, for="[2001:db8::1]:4711";proto=https, for=10.0.0.5'}, "2001:db8::1"),
    "all trusted": ({"x-forwarded-for": "10.9.9.9, 10.1.2.3"}, "10.9.9.9"),
    "unknown hop": ({"forwarded": "for=198.51.100.7, for=unknown, for=10.0.0.5"}, "10.0.0.5"),
    "garbage": ({"x-forwarded-for": ",, not-an-address ;; [::1"}, "127.0.0.1"),
    "empty forwarded": ({"forwarded": ""}, "127.0.0.1"),
    "both": ({"x-forwarded-for": "203.0.113.9", "forwarded": "for=198.51.100.7"}, "127.0.0.1"),
}


async def test_a_trusted_proxy_names_the_client_by_the_right_most_address_not_itself_a_trusted_proxy(
    tmp_path: Path,
) -> None:
    config, _ = _recording_config(tmp_path, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    log: list[ServerLog] = []
    async with http_gateway(config, log) as url:
        sessions = await _list_as_each(url, {client: headers for client, (headers, _) in FORWARDED_BY_TRUSTED.items()})
    recorded = _recorded_addresses(tmp_path, sessions)
    assert recorded == {client: address for client, (_, address) in FORWARDED_BY_TRUSTED.items()}
    assert "carries both Forwarded and X-Forwarded-For" in log[0].text


async def test_a_refused_request_is_logged_with_the_client_address(tmp_path: Path) -> None:
    config, _ = _recording_config(tmp_path, token=TOKEN, trusted_proxies=["127.0.0.1"])
    log: list[ServerLog] = []
    async with http_gateway(config, log) as url, httpx2.AsyncClient(timeout=30) as http:
        sent = {**MODERN, "mcp-method": "tools/list", "x-forwarded-for": "203.0.113.9"}
        refused = await http.post(url, json=_listed_by("nobody", 1), headers=sent)
        assert refused.status_code == 401
        await log[0].wait_for(r"an HTTP request from 203\.0\.113\.9 was refused")
        misrouted = {**sent, "authorization": f"Bearer {TOKEN}", "mcp-method": "tools/call"}
        refused = await http.post(url, json=_listed_by("nobody", 2), headers=misrouted)
        assert refused.status_code == 400
        await log[0].wait_for(r"an HTTP client at 203\.0\.113\.9 sent the mcp-method header")


def _self_signed(directory: Path, name: str = "gateway") -> tuple[Path, Path]:
    """A fresh key and a certificate for 127.0.0.1 and localhost signed by it, written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return certificate_file, key_file


def _trusting(certificate: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate))


async def test_https_serves_a_client_that_verifies_its_certificate_and_plain_http_is_not_served(tmp_path: Path) -> None:
    _self_signed(tmp_path)
    config, _ = _recording_config(tmp_path, token=TOKEN, tls_certificate="gateway.crt", tls_key="gateway.key")
    log: list[ServerLog] = []
    async with http_gateway(config, log) as url:
        assert url.startswith("https://127.0.0.1:")
        authorised = {"Authorization": f"Bearer {TOKEN}"}
        async with (
            httpx2.AsyncClient(headers=authorised, verify=_trusting(tmp_path / "gateway.crt"), timeout=30) as http,
            Client(streamable_http_client(url, http_client=http), mode="auto") as client,
        ):
            assert text_of(await client.call_tool("box__echo", {"text": "over tls"})) == "over tls"
            origin = url.removesuffix("/mcp")
            listed = await http.post(
                url, json=_listed_by("browser", 1), headers={**MODERN, "mcp-method": "tools/list", "origin": origin}
            )
            assert "box__echo" in json.dumps(answer_of(listed, 1)["result"])
        async with httpx2.AsyncClient(timeout=30) as unverified:
            with pytest.raises(httpx2.ConnectError):
                await unverified.post(url, json=_listed_by("anyone", 2), headers={**MODERN, **authorised})
        async with httpx2.AsyncClient(timeout=30) as plain:
            with pytest.raises(httpx2.TransportError):
                await plain.post(
                    url.replace("https://", "http://"), json=_listed_by("anyone", 3), headers={**MODERN, **authorised}
                )
    assert "can be read by others" not in log[0].text


UNUSABLE_TLS = {
    "missing key": ({"tls_key": "absent.key"}, "tls_key: cannot read"),
    "certificate not PEM": ({"tls_certificate": "junk.pem"}, "tls_certificate:"),
    "key not PEM": ({"tls_key": "junk.pem"}, "tls_key:"),
    "encrypted key": ({"tls_key": "encrypted.key"}, "tls_key:"),
    "key of another certificate": ({"tls_key": "other.key"}, "is not the key of the certificate"),
    "certificate without key": ({"tls_key": ""}, "give both tls_certificate and tls_key"),
}
"""Broken TLS settings (files `_write_unusable` writes), each with what the refusal must say."""


def _write_unusable(directory: Path) -> None:
    _self_signed(directory, "other")
    (directory / "junk.pem").write_text("not a certificate\n")
    key = serialization.load_pem_private_key((directory / "gateway.key").read_bytes(), None)
    encrypted = serialization.BestAvailableEncryption(b"secret")
    (directory / "encrypted.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encrypted)
    )


@pytest.mark.parametrize("case", sorted(UNUSABLE_TLS))
def test_tls_files_that_cannot_serve_stop_the_gateway_with_one_line_naming_the_key_and_file(
    tmp_path: Path, case: str
) -> None:
    _self_signed(tmp_path)
    _write_unusable(tmp_path)
    settings, message = UNUSABLE_TLS[case]
    http = {"tls_certificate": "gateway.crt", "tls_key": "gateway.key", **settings}
    config, _ = _recording_config(tmp_path, **{key: value for key, value in http.items() if value})
    result = run_cli("serve", "--config", str(config), "--http", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    assert "[gateway.http]" in lines[0] and message in lines[0], lines[0]
    named = {**http, **settings}
    assert case == "certificate without key" or any(
        name in lines[0] for name in (named["tls_certificate"], named["tls_key"])
    )


def test_a_port_already_taken_stops_the_gateway_with_one_line_naming_it(tmp_path: Path) -> None:
    config, _ = _recording_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--config", str(config), "--http", f"127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines == [f"mcp-armor: error: cannot listen on 127.0.0.1:{port}: Address already in use"], result.stderr


async def test_a_key_file_others_can_read_is_warned_about(tmp_path: Path) -> None:
    _, key = _self_signed(tmp_path)
    key.chmod(0o644)
    config, _ = _recording_config(tmp_path, tls_certificate="gateway.crt", tls_key="gateway.key")
    log: list[ServerLog] = []
    async with http_gateway(config, log):
        await log[0].wait_for(r"tls_key: \S+gateway\.key can be read by others \(mode 644\)")


async def test_serving_beyond_loopback_with_credentials_but_without_tls_warns_that_tokens_travel_in_clear_text(
    tmp_path: Path,
) -> None:
    config, _ = _recording_config(tmp_path, token=TOKEN)
    async with gateway_process(config, "--http", "0.0.0.0:0") as (_, log):
        await log.wait_for(r"without TLS \(\[gateway\.http\] tls_certificate\): bearer tokens travel in clear text")


async def test_a_stdio_session_records_no_address(tmp_path: Path) -> None:
    config, _ = _recording_config(tmp_path)
    async with gateway_client(config) as client:
        assert "box__echo" in {tool.name for tool in (await client.list_tools()).tools}
    (start,) = [event for event in events(tmp_path) if event["kind"] == "session_start"]
    assert start["transport"] == "stdio" and start["address"] is None
