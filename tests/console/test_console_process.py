"""`mcp-armor console` as a real process beside a real gateway: the printed URL, the live stream showing
calls as they are made, and a waiting call released by Approve in the console."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx2
import pytest

from tests.conftest import (
    NOTES_NEED_APPROVAL,
    REPO,
    ServerLog,
    fixture_upstream,
    gateway_client,
    run_cli,
    text_of,
    write_config,
)

pytestmark = pytest.mark.anyio

POLICY = NOTES_NEED_APPROVAL


@asynccontextmanager
async def console_process(config: Path, *extra: str) -> AsyncIterator[tuple[str, ServerLog]]:
    """Run `mcp-armor console` and yield the URL it prints (with its token), once it is listening."""
    command = [sys.executable, "-m", "gateway", "console", "--config", str(config), *extra]
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", ""), "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"]}
    log = ServerLog()
    async with await anyio.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout

        async def pump() -> None:
            async for chunk in stdout:
                log.add(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                match = await log.wait_for(r"open (http://127\.0\.0\.1:\d+/console/\?token=[A-Za-z0-9_-]+)", seconds=30)
                yield match[1], log
            except BaseException:
                print(log.text, file=sys.stderr)  # the console's own account, beside the failure
                raise
            finally:
                proc.terminate()
                with anyio.fail_after(20):
                    await proc.wait()
                tg.cancel_scope.cancel()


class Stream:
    """The console's SSE stream, read as it comes: every message, and a way to wait for one."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._changed = anyio.Event()

    async def read(self, http: httpx2.AsyncClient, url: str, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with http.stream("GET", url) as answer:
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
            task_status.started()
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    self.messages += json.loads(line[6:])["messages"]
                    self._changed.set()
                    self._changed = anyio.Event()

    async def wait_for(self, check: Any, *, seconds: float = 30) -> dict[str, Any]:
        with anyio.fail_after(seconds):
            while True:
                for message in self.messages:
                    if check(message):
                        return message
                await self._changed.wait()


async def test_a_waiting_call_shows_live_and_approve_in_the_console_releases_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")}, policy=POLICY)
    async with console_process(config) as (url, _), httpx2.AsyncClient(timeout=30) as http:
        base = url.split("/console/")[0]
        answer = await http.get(url)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/"
        http.cookies = answer.cookies
        page = await http.get(f"{base}/console/")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        stream = Stream()
        async with anyio.create_task_group() as tg:
            await tg.start(stream.read, http, f"{base}/console/events")
            async with gateway_client(config) as client:
                done: list[str] = []
                finished = anyio.Event()

                async def call() -> None:
                    result = await client.call_tool("box__write_note", {"path": "notes/a.txt", "body": "hi"})
                    done.append(text_of(result))
                    finished.set()

                tg.start_soon(call)
                shown = await stream.wait_for(lambda m: m["type"] == "approvals" and m["pending"])
                (pending,) = shown["pending"]
                assert pending["tool"] == "box__write_note" and pending["rule"] == "notes-need-approval"
                assert pending["args"].splitlines()[0] == '"path": "notes/a.txt"'
                decision = {"approve": True, "binding": pending["binding"]}
                headers = {"origin": base, "x-csrf-token": csrf[1]}
                answer = await http.post(f"{base}/console/approvals/{pending['id']}", json=decision, headers=headers)
                assert answer.status_code == 200, answer.text
                ended = await stream.wait_for(lambda m: m["type"] == "call" and m["outcome"] == "ok")
                assert ended["tool"] == "box__write_note" and ended["decision"] == "ask"
                assert ended["duration"].endswith(" ms")
                await stream.wait_for(lambda m: m["type"] == "approvals" and not m["pending"])
                with anyio.fail_after(30):
                    await finished.wait()
                assert done == ["stored notes/a.txt"]
                await client.call_tool("box__echo", {"text": "after"})
                await stream.wait_for(lambda m: m["type"] == "call" and m["tool"] == "box__echo" and m["outcome"])
            await stream.wait_for(lambda m: m["type"] == "session" and m["state"] == "ended")
            assert any(
                m["type"] == "upstream" and m["upstream"] == "box" and m["state"] == "up" for m in stream.messages
            )
            tg.cancel_scope.cancel()
    approvals = [
        json.loads(line)
        for line in run_cli("audit", "export", "--config", str(config), cwd=tmp_path).stdout.splitlines()
    ]
    (approval,) = [event for event in approvals if event["kind"] == "approval"]
    assert approval["approval"] == "approved" and approval["channel"] == "console"


def test_the_console_refuses_to_listen_beyond_loopback_without_tls_and_principals(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    result = run_cli("console", "--config", str(config), "--listen", "0.0.0.0:0", cwd=tmp_path)
    assert result.returncode == 2
    assert "only over TLS" in result.stderr and "Traceback" not in result.stderr
