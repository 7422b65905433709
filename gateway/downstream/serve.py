"""Running the gateway downstream: over stdio (the default), or streamable HTTP at `/mcp`.

stdio is served by `gateway.downstream.stdio`, without the SDK in the process; HTTP by the SDK's server and
web stack (`gateway.downstream.http`), imported only when HTTP is asked for.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from gateway.audit.anchor import Anchoring
from gateway.audit.events import GatewayEvents
from gateway.audit.recorder import Recorder
from gateway.audit.shared import SharedRecorder
from gateway.audit.stages import CallAudit
from gateway.catalog.shared_pins import serving_pins
from gateway.config.models import Config
from gateway.core.gateway import Gateway
from gateway.downstream.shutdown import stop_on_signal
from gateway.downstream.stdio import serve_stdio_connection
from gateway.errors import ConfigError
from gateway.policy.files import load_engine
from gateway.policy.shared_rates import SharedRates
from gateway.store.postgres import database
from gateway.upstream.pool import UpstreamPool

logger = logging.getLogger(__name__)

YOUNG_COLLECTION_THRESHOLD = 10_000
"""Containers allocated, net, between two collections of the youngest generation (CPython's default
is 700). A served call allocates a few hundred, nearly all freed by reference counting as it ends;
at the default the collector walks what is in flight every other call or two (over HTTP, about a
tenth of the gateway's CPU), to find the few reference cycles a call leaves behind a little sooner."""


async def serve_stdio(config: Config) -> None:
    """Serve one agent over this process's stdin/stdout until it hangs up (or SIGTERM / SIGINT)."""
    async with gateway_for(config, transport="stdio") as gateway, anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        await tg.start(gateway.run)
        await serve_stdio_connection(gateway)
        gateway.sessions.end(gateway.stdio_session, "the client disconnected")
        tg.cancel_scope.cancel()


async def serve_http(config: Config, host: str, port: int) -> None:
    """Serve streamable HTTP at http(s)://HOST:PORT/mcp until cancelled (port 0 picks a free port)."""
    if config.token_unset is not None:  # never serve unguarded what the file meant to guard
        raise ConfigError(config.token_unset)
    from gateway.downstream.http import serve_streamable_http  # the SDK and its web stack load only for HTTP
    from gateway.downstream.http_edge import tls_files
    from gateway.principals.store import LocalTokens

    tls = tls_files(config)  # files that cannot serve stop the start here, before anything opens
    principals = LocalTokens.open(config.principals_path)  # one that cannot be read stops start-up, as a line
    async with gateway_for(config, transport="http") as gateway:
        await serve_streamable_http(gateway, config, host, port, principals, tls=tls)


@asynccontextmanager
async def gateway_for(config: Config, *, transport: str) -> AsyncIterator[Gateway]:
    """Load the policies (a broken set stops start-up with one line), open the audit log, assemble the gateway.

    The audit recorder outlives everything that serves, so calls cancelled at shutdown still get
    their outcome recorded; then every session still open is recorded as ended.
    """
    engine = load_engine(config)
    store = database(config)
    if store is not None:  # rate limits counted in the store, across every replica
        engine.shared = SharedRates(store)
    if engine.monitor_mode:
        logger.warning("monitor mode: policy decisions are recorded, nothing is refused")
    lock = await anyio.to_thread.run_sync(serving_pins, config)
    recorder: Recorder | SharedRecorder
    if store is not None:
        recorder = SharedRecorder(store, sync=config.gateway.audit_sync, anchoring=Anchoring.of(config))
    else:
        recorder = Recorder(config.audit_path, sync=config.gateway.audit_sync, anchoring=Anchoring.of(config))
    async with recorder.running():
        audit = CallAudit(recorder, engine)
        events = GatewayEvents(recorder, engine)
        gateway = Gateway(UpstreamPool(config, lock=lock), engine, audit, events, transport=transport)
        # What is loaded by now (modules, the protocol's models, the policies) lives as long as the
        # process: kept out of the collector's sight, so its full collections do not walk it.
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD)
        try:
            yield gateway
        finally:
            audit.end_calls("the gateway shut down")
            gateway.sessions.end_all("the gateway shut down")
            if engine.shared is not None:
                await engine.shared.close()
