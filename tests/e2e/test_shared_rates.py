"""Rate limits across gateway replicas: two gateway processes sharing one PostgreSQL store admit a
principal's budget once between them, whichever replica each call reaches."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx2
import pytest

from gateway.store.postgres import Database
from tests.conftest import fixture_upstream, http_gateway
from tests.conftest import write_config as write_gateway_config
from tests.e2e.test_http_and_cli import TOKEN, answer_of
from tests.e2e.test_http_sessions import MODERN, POLICY, modern_echo, went_ahead

pytestmark = pytest.mark.anyio


async def test_two_replicas_admit_one_budget_between_them(tmp_path: Path, store_url: str) -> None:
    Database(store_url).migrate()
    configs = []
    for name in ("one", "two"):
        directory = tmp_path / name
        directory.mkdir()
        upstreams = {"box": fixture_upstream("toolbox.py", TOOLBOX_RECORD=str(directory / "calls.jsonl"))}
        config = write_gateway_config(directory, upstreams, policy=POLICY, store=store_url, http={"token": TOKEN})
        configs.append(config)
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with (
        http_gateway(configs[0]) as one,
        http_gateway(configs[1]) as two,
        httpx2.AsyncClient(headers=headers, timeout=30) as http,
    ):
        answers = []
        for number in range(6):  # the budget is 3 per minute for the principal, on whichever replica
            sent = {**MODERN, "mcp-session-id": uuid.uuid4().hex}
            url = (one, two)[number % 2]
            answers.append(answer_of(await http.post(url, json=modern_echo(number), headers=sent), number))
    # Alone, each replica would have let its own first three go ahead: replica two refuses its second.
    assert [went_ahead(answer) for answer in answers] == [True] * 3 + [False] * 3
    refusal = answers[3]["result"]["content"][0]["text"]
    assert "rule 'echo-budget' allows 3 calls per minute per principal and that limit is reached" in refusal
    assert "try again in" in refusal
