"""While the gateway serves, the collector's youngest generation is collected less often than CPython's default."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gateway.config.models import parse_config
from gateway.downstream.serve import YOUNG_COLLECTION_THRESHOLD, gateway_for

pytestmark = pytest.mark.anyio
CPYTHON_YOUNG_THRESHOLD = 700


async def test_serving_collects_the_young_generation_every_ten_thousand_containers(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    data = {"gateway": {"audit": str(tmp_path / "audit.db")}}
    config = parse_config(data, tmp_path / "upstreams.toml", label="upstreams.toml", environ={})
    previous = gc.get_threshold()
    # CPython's own threshold to start from, whatever a gateway served earlier in this process left behind.
    gc.set_threshold(CPYTHON_YOUNG_THRESHOLD, *previous[1:])
    try:
        async with gateway_for(config, transport="stdio"):
            assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD > CPYTHON_YOUNG_THRESHOLD
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()
