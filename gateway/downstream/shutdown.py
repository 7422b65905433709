"""Stopping on SIGTERM or SIGINT: in order (every session's end recorded), and for certain after a grace period."""

from __future__ import annotations

import logging
import os
import signal
import threading

import anyio

logger = logging.getLogger(__name__)

STOP_GRACE = 3.0
"""Seconds a signalled gateway has to stop in order before it exits regardless."""


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM or SIGINT: stop serving in order (calls in flight are recorded as cancelled).

    Should shutting down stall (a call that will not finish, an upstream that will not stop), the
    process exits after a grace period anyway.
    """
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            scope.cancel()
            stopping(received)
            return


def stopping(received: int) -> None:
    """The signal `received` asks the gateway to stop: say so, and exit the process `STOP_GRACE` seconds
    from now (status 128 + the signal), stopped in order or not."""
    logger.info("%s received: shutting down", signal.Signals(received).name)
    deadline = threading.Timer(STOP_GRACE, os._exit, (128 + received,))
    deadline.daemon = True
    deadline.start()
