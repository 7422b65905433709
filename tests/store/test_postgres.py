"""The shared store's database: connecting, the schema and its versions, and what a message may show."""

from __future__ import annotations

import pytest

from gateway.errors import StoreError
from gateway.store.postgres import Database, shown
from gateway.store.schema import SCHEMA_VERSION
from tests.postgres import PASSWORD, Cluster


def test_a_new_store_is_migrated_once_and_then_found_current(store_url: str) -> None:
    database = Database(store_url)
    assert database.migrate() == (0, SCHEMA_VERSION)
    assert database.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    with database.session() as db:
        database.check_schema(db)
        assert db.execute("SELECT seq, hash FROM head").fetchone() == (0, "0" * 64)


def test_a_schema_from_a_newer_gateway_is_refused_and_left_as_it_is(store_url: str) -> None:
    database = Database(store_url)
    database.migrate()
    with database.session() as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=f"schema {SCHEMA_VERSION + 1} was written by a newer mcp-armor"):
        database.migrate()
    with database.session() as db, pytest.raises(StoreError, match="store migrate"):
        database.check_schema(db)


def test_a_reader_of_a_store_never_set_up_is_told_how_to_set_it_up(store_url: str) -> None:
    database = Database(store_url)
    with database.session() as db, pytest.raises(StoreError, match="no mcp-armor schema yet"):
        database.check_schema(db)


def test_a_wrong_password_is_reported_without_any_password(postgres: Cluster) -> None:
    url = postgres.url("postgres", password="not-the-password")
    with pytest.raises(StoreError) as raised:
        Database(url).connect()
    assert "password authentication failed" in str(raised.value)
    assert "not-the-password" not in str(raised.value) and PASSWORD not in str(raised.value)
    assert str(raised.value).startswith(f"postgresql://armor@127.0.0.1:{postgres.port}/postgres: ")


def test_an_unreachable_store_is_one_line_naming_it(postgres: Cluster) -> None:
    from tests.postgres import free_port

    url = f"postgresql://armor:{PASSWORD}@127.0.0.1:{free_port()}/armor"
    with pytest.raises(StoreError, match=r"^postgresql://armor@127\.0\.0\.1:\d+/armor: cannot connect") as raised:
        Database(url).connect()
    assert "\n" not in str(raised.value) and PASSWORD not in str(raised.value)


def test_the_shown_url_keeps_user_host_and_database_and_drops_password_and_query() -> None:
    assert shown("postgresql://armor:s3cret@db.example:5432/armor?sslmode=require&password=x") == (
        "postgresql://armor@db.example:5432/armor"
    )
    assert shown("postgres://db/armor") == "postgres://db/armor"


def test_events_cannot_be_changed_or_removed_through_sql(store_url: str) -> None:
    database = Database(store_url)
    database.migrate()
    with database.session() as db:
        db.execute(
            "SELECT * FROM append_events(%s, true)",
            ("\x1f".join(['{"kind":"catalog"}', "catalog", *["\x1d"] * 5, "t", "\x1d", "\x1d"]),),
        )
    for statement in ("UPDATE events SET body = '{}'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(StoreError, match="appended, never changed or removed"), database.session() as db:
            db.execute(statement)


def test_a_shared_key_is_made_once_and_every_replica_reads_the_same(store_url: str) -> None:
    from gateway.store.postgres import shared_key

    database = Database(store_url)
    database.migrate()
    with database.session() as first, database.session() as second:
        key = shared_key(first, "approvals")
        assert len(key) == 32
        assert shared_key(second, "approvals") == key
        assert shared_key(second, "mask") != key


@pytest.mark.parametrize("password", ["Qx#Zq", "Qx?Zq", "Qx/Zq", "Qx@Zq", "Qx%zzZq", "Qx#?/@%zzZq"])
def test_no_part_of_a_password_with_url_characters_in_it_is_ever_shown(password: str) -> None:
    url = f"postgresql://armor:{password}@db.example:5432/armor"
    assert shown(url) == "postgresql://armor@db.example:5432/armor"
    try:
        Database(url)
    except StoreError as exc:  # one libpq would misread: refused, naming the fix and not the password
        assert str(exc).startswith("postgresql://armor@db.example:5432/armor: the password in the store URL must")
        assert "Qx" not in str(exc) and "Zq" not in str(exc)


def test_a_password_libpq_would_read_as_the_host_is_refused_before_connecting() -> None:
    for url in ("postgresql://armor:p@ss@db/armor", "postgresql://armor:p/ss@db/armor", "postgresql://a:p%zz@db/x"):
        with pytest.raises(StoreError, match="must be percent-encoded"):
            Database(url)
    Database("postgresql://armor:p%40ss@db/armor?password=x")  # percent-encoded: read as it is written


def test_a_url_shown_never_carries_its_query_or_a_password_in_it() -> None:
    assert shown("postgresql://db/armor?password=a@b") == "postgresql://db/armor"
    assert shown("postgresql://armor:pw@h1:5432,h2:5433/armor") == "postgresql://armor@h1:5432,h2:5433/armor"
    assert shown("host=db password=s3cret") == "the store URL"
    assert shown("postgresql://armor:a[b@db/armor") == "postgresql://armor@db/armor"


def test_a_schema_another_role_made_first_is_refused_never_used(postgres: Cluster, store_url: str) -> None:
    # A role allowed to create schemas in the database makes `mcp_armor` before the first gateway, and
    # lets the store's user create in it: as its owner it could later drop and replace the chain's tables.
    name = store_url.rsplit("/", 1)[1]
    intruder = f"intruder_{name}"
    postgres.psql(f"CREATE ROLE {intruder}; GRANT CREATE ON DATABASE {name} TO {intruder}")
    postgres.psql(f"CREATE SCHEMA mcp_armor AUTHORIZATION {intruder}; GRANT ALL ON SCHEMA mcp_armor TO armor", name)
    with pytest.raises(StoreError, match=f"schema mcp_armor belongs to role {intruder}, which could change"):
        Database(store_url).migrate()
    assert "events" not in postgres.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'mcp_armor'", name)
