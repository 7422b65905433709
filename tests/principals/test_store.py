"""The principals store and its authenticator: tokens issued once and kept as hashes, several per principal,
refused once revoked or expired (the very next request, with no reload), and a store that cannot be read
refusing every token of its kind."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import PrincipalsError
from gateway.principals import Principal, Unauthenticated
from gateway.principals.store import Issued, LocalTokens, PrincipalStore

START = datetime(2027, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def nothing(*_: object) -> None:
    pass


def moved(path: Path) -> None:
    path.rename(path.with_name("moved.db"))


def garbled(path: Path) -> None:
    path.write_bytes(b"this is not a database, and it is long enough to be read as one page" * 100)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "principals.db"


@pytest.fixture
def store(path: Path, clock: Clock) -> PrincipalStore:
    return PrincipalStore(path, clock)


@pytest.mark.anyio
async def test_a_token_stands_for_its_principal_with_its_roles(store: PrincipalStore, path: Path, clock: Clock) -> None:
    issued = store.add("alice", ["admin", "ops"], record=nothing)
    assert issued.token.startswith(f"mcpa_{issued.token_id}_") and len(issued.token) == 5 + 8 + 1 + 43
    found = await LocalTokens(path, clock).authenticate(issued.token)
    assert found == Principal("alice", frozenset({"role:admin", "role:ops"}), via="token", credential=issued.token_id)


@pytest.mark.anyio
async def test_other_kinds_of_credential_are_left_to_other_authenticators(store: PrincipalStore, path: Path) -> None:
    store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    for other in ("eyJhbGciOiJSUzI1NiJ9.e30.sig", "shared-token-0123456789", "mcpa_1234_short", ""):
        assert await tokens.authenticate(other) is None


@pytest.mark.anyio
async def test_an_unknown_or_altered_token_of_the_right_shape_is_refused(store: PrincipalStore, path: Path) -> None:
    issued = store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    altered = issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")
    unknown = "mcpa_00000000_" + issued.token.split("_", 2)[2]
    for token in (altered, unknown if not issued.token_id == "00000000" else altered):
        with pytest.raises(Unauthenticated, match="not one the gateway issued"):
            await tokens.authenticate(token)


@pytest.mark.anyio
async def test_rotation_revoking_one_token_keeps_the_other(store: PrincipalStore, path: Path) -> None:
    old = store.add("alice", ["admin"], record=nothing)
    new = store.add("alice", ["ops"], record=nothing)
    tokens = LocalTokens(path)  # opened before the revocation, as a running gateway's is
    assert store.revoke(old.token_id, record=nothing) == ("alice", [old.token_id])
    with pytest.raises(Unauthenticated, match="revoked"):
        await tokens.authenticate(old.token)
    found = await tokens.authenticate(new.token)
    assert found is not None and found.attributes == frozenset({"role:admin", "role:ops"})
    assert store.revoke("alice", record=nothing) == ("alice", [new.token_id])
    with pytest.raises(Unauthenticated, match="revoked"):
        await tokens.authenticate(new.token)
    assert store.revoke("alice", record=nothing) == ("alice", [])


@pytest.mark.anyio
async def test_an_unchanged_store_is_not_read_again_and_a_change_is_read_on_the_next_request(
    store: PrincipalStore, path: Path
) -> None:
    issued = store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    statements: list[str] = []
    assert tokens._db is not None
    tokens._db.set_trace_callback(statements.append)
    for _ in range(3):
        assert await tokens.authenticate(issued.token) is not None
    assert sum("FROM tokens" in statement for statement in statements) == 1
    store.revoke(issued.token_id, record=nothing)
    with pytest.raises(Unauthenticated, match="revoked"):
        await tokens.authenticate(issued.token)
    assert sum("FROM tokens" in statement for statement in statements) == 2


@pytest.mark.anyio
async def test_a_token_is_refused_from_the_moment_it_expires(store: PrincipalStore, path: Path, clock: Clock) -> None:
    issued = store.add("ci", expires=START + timedelta(hours=1), record=nothing)
    tokens = LocalTokens(path, clock)
    clock.now = START + timedelta(minutes=59)
    assert await tokens.authenticate(issued.token) is not None
    clock.now = START + timedelta(hours=1)
    with pytest.raises(Unauthenticated, match="expired"):
        await tokens.authenticate(issued.token)
    [listed] = store.principals()
    assert [token.state(store.now()) for token in listed.tokens] == ["expired"]


def test_the_store_holds_hashes_never_the_tokens(store: PrincipalStore, path: Path) -> None:
    issued = [store.add("alice", record=nothing), store.add("bob", record=nothing)]
    data = b"".join(file.read_bytes() for file in path.parent.iterdir())
    for one in issued:
        assert one.token.encode() not in data and one.token.split("_", 2)[2].encode() not in data
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


@pytest.mark.parametrize(
    ("name", "roles", "expires", "error"),
    [
        ("bad name", (), None, "principal name 'bad name' must match"),
        ("-alice", (), None, "must match"),
        ("a" * 65, (), None, "must match"),
        ("alice", ("role:admin",), None, "role 'role:admin' must match"),
        ("deadbeef", (), None, "would read as a token id"),
        ("token", (), None, "is the one `[gateway.http] token` stands for"),
        ("alice", (), START, "is not in the future"),
    ],
)
def test_bad_names_roles_and_past_expiry_are_refused_and_nothing_is_written(
    store: PrincipalStore, path: Path, name: str, roles: tuple[str, ...], expires: datetime | None, error: str
) -> None:
    with pytest.raises(PrincipalsError, match=error.replace("[", r"\[").replace("]", r"\]")):
        store.add(name, roles, expires, record=nothing)
    assert store.principals() == []


def test_a_change_that_cannot_be_recorded_is_not_made(store: PrincipalStore) -> None:
    def refuse(_: Issued) -> None:
        raise PrincipalsError("the audit log is unavailable")

    kept = store.add("alice", record=nothing)
    with pytest.raises(PrincipalsError, match="unavailable"):
        store.add("alice", record=refuse)
    with pytest.raises(PrincipalsError, match="unavailable"):
        store.revoke("alice", record=lambda *_: refuse(kept))
    [alice] = store.principals()
    assert [token.id for token in alice.tokens] == [kept.token_id] and alice.tokens[0].revoked is None


def test_revoking_what_does_not_exist_is_an_error(store: PrincipalStore) -> None:
    with pytest.raises(PrincipalsError, match="no principal or token 'nobody'"):
        store.revoke("nobody", record=nothing)
    store.add("alice", record=nothing)
    with pytest.raises(PrincipalsError, match="no principal or token '0badc0de'"):
        store.revoke("0badc0de", record=nothing)


@pytest.mark.anyio
async def test_a_missing_store_holds_no_principals(path: Path) -> None:
    tokens = LocalTokens.open(path)
    assert not tokens.holds_principals()
    with pytest.raises(Unauthenticated, match="not one the gateway issued"):
        await tokens.authenticate("mcpa_00000000_" + "A" * 43)


@pytest.mark.anyio
async def test_a_store_replaced_or_removed_under_a_running_gateway_is_followed(
    store: PrincipalStore, path: Path
) -> None:
    issued = store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    assert await tokens.authenticate(issued.token) is not None
    moved(path)
    with pytest.raises(Unauthenticated):
        await tokens.authenticate(issued.token)
    assert not tokens.holds_principals()


@pytest.mark.anyio
async def test_an_unreadable_store_stops_start_up_and_refuses_requests(
    store: PrincipalStore, path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issued = store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    garbled(path)
    with pytest.raises(PrincipalsError, match=f"^{path}: "):
        LocalTokens.open(path)
    with pytest.raises(Unauthenticated, match=r"^the gateway cannot check this token now$"):
        await tokens.authenticate(issued.token)
    assert f"the principals store cannot be read ({path}: " in caplog.text


def linked(path: Path, planted: Path) -> None:
    path.unlink()
    path.symlink_to(planted)


def opened_to_others(path: Path, planted: Path) -> None:
    os.chmod(planted, 0o666)
    planted.replace(path)


@pytest.mark.anyio
@pytest.mark.parametrize("plant", [linked, opened_to_others])
async def test_a_store_others_could_have_written_is_refused_not_read(
    tmp_path: Path, store: PrincipalStore, path: Path, plant: Any
) -> None:
    elsewhere = PrincipalStore(tmp_path / "elsewhere" / "principals.db")
    planted = elsewhere.add("admin", record=nothing)
    store.add("alice", record=nothing)
    tokens = LocalTokens(path)
    plant(path, elsewhere.path)
    with pytest.raises(Unauthenticated, match=r"^the gateway cannot check this token now$"):
        await tokens.authenticate(planted.token)
    with pytest.raises(PrincipalsError, match=f"^{path}: the principals store (is a symbolic link|can be written by)"):
        LocalTokens.open(path)
    with pytest.raises(PrincipalsError):
        tokens.holds_principals()  # a gateway started without credentials guards, as for an unreadable store
