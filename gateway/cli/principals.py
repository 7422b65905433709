"""`principal add | list | revoke`: the named callers of `serve --http` and their tokens.

A token is printed once, when it is made; the store keeps its hash. `add` for a principal that exists
gives it another token (rotation: hand out the new one, then revoke the old by its id). Each token
added or revoked is recorded in the audit log before the store changes; if it cannot be recorded,
nothing changes. A running gateway reads the store on every request: a revocation holds at once.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.audit.logs import record_first
from gateway.audit.store import event, os_user
from gateway.cli.common import parse_moment, print_table
from gateway.config.models import Config
from gateway.errors import PrincipalsError
from gateway.principals.store import Issued, PrincipalStore


def add(config: Config, name: str, expires: str | None, roles: list[str], as_json: bool) -> int:
    until = parse_moment(expires, "--expires", '"30d", "12h"', ahead=True) if expires is not None else None
    command = f"`principal add {name}`"

    def record(issued: Issued) -> None:
        _record(config, [_event(issued.principal, issued.token_id, "token_added", command, expires=issued.expires)])

    issued = PrincipalStore(config.principals_path).add(name, roles, until, record=record)
    if as_json:
        fields = {"principal": issued.principal, "token_id": issued.token_id, "token": issued.token}
        print(json.dumps({**fields, "expires": issued.expires}))
        return 0
    print(f"principal '{issued.principal}': token {issued.token_id}" + _until(issued.expires))
    print(issued.token)
    print("this token is shown now and never again: only its hash is stored")
    return 0


def list_principals(config: Config, as_json: bool) -> int:
    store = PrincipalStore(config.principals_path)
    now = store.now()
    found = store.principals()
    if as_json:
        listed: list[dict[str, Any]] = [
            {
                "name": principal.name,
                "roles": list(principal.roles),
                "created": principal.created,
                "tokens": [
                    {
                        "id": token.id,
                        "created": token.created,
                        "expires": token.expires,
                        "revoked": token.revoked,
                        "state": token.state(now),
                    }
                    for token in principal.tokens
                ],
            }
            for principal in found
        ]
        print(json.dumps(listed))
        return 0
    rows = [
        (
            principal.name,
            ",".join(principal.roles),
            token.id,
            token.created,
            token.expires,
            token.revoked,
            token.state(now),
        )
        for principal in found
        for token in principal.tokens
    ]
    print_table(
        ("PRINCIPAL", "ROLES", "TOKEN", "CREATED", "EXPIRES", "REVOKED", "STATE"), rows, empty="(no principals)"
    )
    return 0


def revoke(config: Config, selector: str) -> int:
    command = f"`principal revoke {selector}`"

    def record(principal: str, ids: list[str]) -> None:
        _record(config, [_event(principal, token_id, "token_revoked", command) for token_id in ids])

    principal, ids = PrincipalStore(config.principals_path).revoke(selector, record=record)
    if not ids:
        print(f"principal '{principal}': nothing to revoke (its tokens were revoked already)")
    for token_id in ids:
        print(f"principal '{principal}': token {token_id} revoked")
    return 0


def _until(expires: str | None) -> str:
    return f", expires {expires}" if expires is not None else ", does not expire"


def _event(principal: str, token_id: str, change: str, command: str, **fields: Any) -> dict[str, Any]:
    done = change.removeprefix("token_")
    reason = f"token {token_id} of principal '{principal}' {done} by {os_user()} ({command})"
    return event("principal", principal=principal, credential=token_id, change=change, reason=reason, **fields)


def _record(config: Config, bodies: list[dict[str, Any]]) -> None:
    """Record the change before the store commits it; if that cannot be recorded, nothing changes."""
    record_first(config, bodies, PrincipalsError)
