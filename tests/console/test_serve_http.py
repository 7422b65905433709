"""The console under `serve --http`: principals with a console role, their own token as the key."""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest

from gateway.config.models import load_config
from gateway.console.access import CSP
from gateway.principals.store import PrincipalStore
from tests.conftest import fixture_upstream, http_gateway, write_config

pytestmark = pytest.mark.anyio


async def test_roles_decide_who_may_open_watch_and_approve_and_mcp_is_served_beside_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"box": fixture_upstream("toolbox.py")})
    store = PrincipalStore(load_config(config).principals_path)
    tokens = {
        name: store.add(name, roles, record=lambda issued: None).token
        for name, roles in (("alice", ["approver"]), ("bob", ["viewer"]), ("carol", []))
    }
    async with http_gateway(config) as url, httpx2.AsyncClient(timeout=30) as http:
        base = url.removesuffix("/mcp")
        origin = {"origin": base}
        assert (await http.get(f"{base}/console/")).status_code == 401
        refused = await http.get(f"{base}/console/", params={"token": tokens["carol"]})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
        assert refused.headers["content-security-policy"] == CSP
        wrong = await http.get(f"{base}/console/", params={"token": tokens["alice"][:-2] + "xx"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        rebinding = await http.get(f"{base}/console/", params={"token": tokens["alice"]}, headers={"host": "evil:80"})
        assert rebinding.status_code == 421
        scripted = await http.get(f"{base}/console/state", headers={"authorization": f"Bearer {tokens['bob']}"})
        assert scripted.status_code == 200 and scripted.json()[0]["viewer"] == "bob"

        for name, may_approve in (("alice", True), ("bob", False)):
            http.cookies.clear()
            answer = await http.get(f"{base}/console/", params={"token": tokens[name]})
            assert answer.status_code == 303 and "HttpOnly" in answer.headers["set-cookie"]
            http.cookies = answer.cookies
            page = await http.get(f"{base}/console/")
            csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
            state = (await http.get(f"{base}/console/state")).json()
            assert state[0]["viewer"] == name and state[0]["approver"] is may_approve
            headers = {**origin, "x-csrf-token": csrf}
            decided = await http.post(
                f"{base}/console/approvals/abcdefgh", json={"approve": True, "binding": "b"}, headers=headers
            )
            assert decided.status_code == (409 if may_approve else 403), decided.text

        store.revoke("alice", record=lambda principal, ids: None)
        http.cookies.clear()
        answer = await http.get(f"{base}/console/", params={"token": tokens["alice"]})
        assert answer.status_code == 401
        mcp = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert mcp.status_code == 401 and "www-authenticate" in mcp.headers  # /mcp keeps its own guard
