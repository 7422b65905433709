"""Running the gateway downstream: over stdio (the default), or streamable HTTP at `/mcp`.

stdio is served by `gateway.stdio`, without the SDK in the process; HTTP by the SDK's server and
web stack (`gateway.sdk_server`), imported only when HTTP is asked for.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from gateway.audit import CallAudit, Recorder
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.pins import load_lock
from gateway.policy_files import load_engine
from gateway.server import Gateway
from gateway.stdio import serve_stdio_connection
from gateway.upstreams import UpstreamPool

logger = logging.getLogger(__name__)

STOP_GRACE = 3.0
"""Seconds a signalled gateway has to stop in order before it exits regardless."""


async def serve_stdio(config: Config) -> None:
    """Serve one agent over this process's stdin/stdout until it hangs up (or SIGTERM / SIGINT)."""
    async with gateway_for(config, transport="stdio") as gateway, anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope)
        await tg.start(gateway.run)
        await serve_stdio_connection(gateway)
        gateway.audit.end_session(gateway.stdio_session, "the client disconnected")
        tg.cancel_scope.cancel()


async def serve_http(config: Config, host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp until cancelled (port 0 picks a free port)."""
    if config.token_unset is not None:  # never serve unguarded what the file meant to guard
        raise ConfigError(config.token_unset)
    from gateway.sdk_server import serve_streamable_http  # the SDK and its web stack load only for HTTP

    async with gateway_for(config, transport="http") as gateway:
        await serve_streamable_http(gateway, config, host, port)


@asynccontextmanager
async def gateway_for(config: Config, *, transport: str) -> AsyncIterator[Gateway]:
    """Load the policies (a broken set stops start-up with one line), open the audit log, assemble the gateway.

    The audit recorder outlives everything that serves, so calls cancelled at shutdown still get
    their outcome recorded; then every session still open is recorded as ended.
    """
    engine = load_engine(config)
    if engine.monitor_mode:
        logger.warning("monitor mode: policy decisions are recorded, nothing is refused")
    lock = load_lock(config)
    async with Recorder(config.audit_path, sync=config.gateway.audit_sync).running() as recorder:
        audit = CallAudit(recorder, engine)
        gateway = Gateway(UpstreamPool(config, lock=lock), engine, audit, transport=transport)
        # What is loaded by now (modules, the protocol's models, the policies) lives as long as the
        # process: kept out of the collector's sight, so its full collections do not walk it.
        gc.freeze()
        try:
            yield gateway
        finally:
            audit.end_all("the gateway shut down")


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM or SIGINT: stop serving in order (calls in flight are recorded as cancelled).

    Should shutting down stall (a call that will not finish, an upstream that will not stop), the
    process exits after a grace period anyway.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("%s received: shutting down", signal.Signals(received).name)
            scope.cancel()
            exit_after_grace(received)
            return


def exit_after_grace(received: int) -> None:
    """Exit the process `STOP_GRACE` seconds from now (status 128 + the signal), stopped in order or not."""
    deadline = threading.Timer(STOP_GRACE, os._exit, (128 + received,))
    deadline.daemon = True
    deadline.start()
