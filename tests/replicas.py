"""Gateway replicas behind a real HAProxy: K `mcp-armor serve --http` processes on one config, and HAProxy
running docs/deploy/haproxy.cfg as shipped, with only its `bind` address, certificate and `server` lines
replaced. TLS ends at the proxy, as the shipped file has it (a throwaway certificate for 127.0.0.1).

The replicas share the config's state directory (SQLite files) unless `store_url` names a PostgreSQL
store, which then goes into `[gateway] store`. Everything is stopped at the end; `Replicas.kill` ends one
replica on the spot.
"""

from __future__ import annotations

import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import httpx2
import pytest

from tests.conftest import REPO, ServerLog, free_port, gateway_process, serving_url, write_config

SHIPPED = REPO / "docs" / "deploy" / "haproxy.cfg"
BIND = re.compile(r"^(\s*bind )\S+( ssl crt )\S+(.*)$", re.MULTILINE)
SERVERS = re.compile(r"^\s*server \S+ \S+\n", re.MULTILINE)
READY_SECONDS = 60


@dataclass
class Replica:
    """One gateway process, reachable directly (not through the proxy) at `url`."""

    name: str
    port: int
    process: anyio.abc.Process
    log: ServerLog

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


@dataclass
class Replicas:
    """Running replicas and the proxy in front of them."""

    config: Path
    replicas: list[Replica]
    url: str
    """The gateway's /mcp through the proxy (https)."""
    tls: ssl.SSLContext
    """Trusts the proxy's certificate."""
    proxy_log: ServerLog

    def client(self, headers: dict[str, str] | None = None) -> httpx2.AsyncClient:
        """An HTTP client for the proxy (and, plain HTTP, for the replicas directly)."""
        return httpx2.AsyncClient(headers=headers, verify=self.tls, timeout=httpx2.Timeout(30, read=120))

    async def kill(self, replica: Replica, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one replica and wait for it to end."""
        replica.process.send_signal(sig)
        with anyio.fail_after(20):
            await replica.process.wait()


def proxy_config(shipped: str, port: int, certificate: Path, servers: list[tuple[str, int]]) -> str:
    """The shipped config with its bind address, certificate and server lines replaced; nothing else."""
    bound, found = BIND.subn(rf"\g<1>127.0.0.1:{port}\g<2>{certificate}\g<3>", shipped)
    assert found == 1, "docs/deploy/haproxy.cfg: expected one `bind ... ssl crt ...` line"
    lines = "".join(f"    server {name} 127.0.0.1:{server_port}\n" for name, server_port in servers)
    first = SERVERS.search(bound)
    assert first is not None, "docs/deploy/haproxy.cfg: expected `server` lines"
    return SERVERS.sub("", bound[: first.start()]) + lines + SERVERS.sub("", bound[first.start() :])


def proxy_certificate(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A PEM file holding a throwaway certificate for 127.0.0.1 and its key (as HAProxy reads them), and a
    client TLS context trusting it."""
    from tests.e2e.test_http_edge import _self_signed

    certificate, key = _self_signed(directory, "proxy")
    combined = directory / "proxy.pem"
    combined.write_bytes(certificate.read_bytes() + key.read_bytes())
    combined.chmod(0o600)
    return combined, ssl.create_default_context(cafile=str(certificate))


async def _until_healthy(url: str, tls: ssl.SSLContext | bool, seconds: float = READY_SECONDS) -> None:
    """Poll `url` (a /healthz) until it answers 200, within `seconds`."""
    async with httpx2.AsyncClient(verify=tls, timeout=5) as http:
        with anyio.fail_after(seconds):
            while True:
                try:
                    if (await http.get(url)).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                await anyio.sleep(0.1)  # polling an external process, bounded by the deadline above


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


@asynccontextmanager
async def running_replicas(
    directory: Path,
    upstreams: dict[str, Any],
    count: int = 3,
    *,
    policy: str,
    store_url: str | None = None,
    http: dict[str, Any] | None = None,
) -> AsyncIterator[Replicas]:
    """Write one config in `directory`, start `count` replicas on it and HAProxy in front; stop them all at the end.

    The replicas allow the proxy's `Host` (`allowed_hosts`) and trust it for the client's address
    (`trusted_proxies`), as docs/deploy.md says a replica behind a proxy must."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy; .ci/run does)")
    proxy_port = free_port()
    settings = {
        "allowed_hosts": [f"127.0.0.1:{proxy_port}", f"localhost:{proxy_port}"],
        "trusted_proxies": ["127.0.0.1"],
        **(http or {}),
    }
    gateway: dict[str, Any] = {}
    if store_url is not None:
        from gateway.store.postgres import Database

        Database(store_url).migrate()  # before the replicas, which would otherwise race to make the schema
        gateway["store"] = store_url
    config = write_config(directory, upstreams, policy=policy, http=settings, **gateway)
    async with AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(gateway_process(config, "--http", "127.0.0.1:0")) for _ in range(count)
        ]
        # Each picks its own port (0): one chosen here ahead could be taken by another process meanwhile.
        started = [
            Replica(f"replica{number}", _port(await serving_url(process, log, READY_SECONDS)), process, log)
            for number, (process, log) in enumerate(processes, start=1)
        ]
        certificate, tls = proxy_certificate(directory)
        cfg = directory / "haproxy.cfg"
        text = proxy_config(
            SHIPPED.read_text(encoding="utf-8"), proxy_port, certificate, [(r.name, r.port) for r in started]
        )
        cfg.write_text(text, encoding="utf-8")
        proxy_log = ServerLog()
        proxy = await stack.enter_async_context(
            await anyio.open_process(
                ["haproxy", "-f", str(cfg), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
        stack.push_async_callback(_stop, proxy)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        tg.start_soon(_pump, proxy, proxy_log)
        await _until_healthy(f"https://127.0.0.1:{proxy_port}/healthz", tls)
        yield Replicas(config, started, f"https://127.0.0.1:{proxy_port}/mcp", tls, proxy_log)


async def _pump(process: anyio.abc.Process, log: ServerLog) -> None:
    assert process.stdout is not None
    async for chunk in process.stdout:
        log.add(chunk)


async def _stop(process: anyio.abc.Process) -> None:
    if process.returncode is None:
        process.terminate()
    with anyio.fail_after(20):
        await process.wait()
