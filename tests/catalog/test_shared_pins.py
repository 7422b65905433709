"""Approved pins in the shared store: what one replica approves every other reads, approvals made at
once all land, the lock file seeds an empty store once, and an unreachable store never counts as no pins."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from gateway.catalog.pins import Item, Kind, Lock
from gateway.catalog.shared_pins import SharedPins, pins_needed, read_pins, serving_pins, write_pins
from gateway.config.models import load_config
from gateway.errors import ConfigError, LockError, StoreError
from gateway.schema import digest
from gateway.store.postgres import Database
from tests.conftest import write_config
from tests.postgres import PASSWORD, cluster, free_port, server_missing


def item(upstream: str, name: str, description: str = "Read a file.") -> Item:
    form = {"name": name, "description": description, "inputSchema": {"type": "object"}}
    return Item(upstream, Kind.TOOL, name, form, digest(form))


def approving(upstream: str, *items: Item) -> Callable[[Lock | None], Lock]:
    return lambda now: (now or Lock()).pinning(upstream, items)


def replica(url: str, tmp_path: Path, name: str) -> SharedPins:
    """One replica's view of the store (its own config directory, where no lock file lies)."""
    return SharedPins(Database(url), tmp_path / name / "upstreams.lock")


@pytest.fixture
def store(store_url: str) -> str:
    Database(store_url).migrate()
    return store_url


def test_an_approval_on_one_replica_is_read_by_another(store: str, tmp_path: Path) -> None:
    a, b = replica(store, tmp_path, "a"), replica(store, tmp_path, "b")
    assert b.read() == (0, None)
    assert a.update(approving("files", item("files", "read"))) == 1
    revision, lock = b.read()
    assert revision == 1 and lock is not None
    assert set(lock.upstreams["files"].pins) == {(Kind.TOOL, "read")}
    changed = item("files", "read", "Read a file. Also mail it.")
    assert b.update(approving("files", changed)) == 2
    assert a.lock() == Lock().pinning("files", [changed])


def test_approvals_made_at_once_on_two_replicas_both_land(store: str, tmp_path: Path) -> None:
    a, b = replica(store, tmp_path, "a"), replica(store, tmp_path, "b")
    a.update(approving("base", item("base", "ping")))
    # Both read revision 1 before either writes: one write is refused and applied again to revision 2.
    both_read = threading.Barrier(2, timeout=20)
    calls = {"files": 0, "notes": 0}

    def change(upstream: str) -> Callable[[Lock | None], Lock]:
        def apply(now: Lock | None) -> Lock:
            calls[upstream] += 1
            if calls[upstream] == 1:
                both_read.wait()
            return approving(upstream, item(upstream, "read"))(now)

        return apply

    async def race() -> list[int]:
        revisions: list[int] = []

        async def approve(side: SharedPins, upstream: str) -> None:
            revisions.append(await anyio.to_thread.run_sync(side.update, change(upstream)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(approve, a, "files")
            tg.start_soon(approve, b, "notes")
        return revisions

    revisions = anyio.run(race)
    assert sorted(revisions) == [2, 3]
    assert sorted(calls.values()) == [1, 2]  # the loser applied its approval again, on the winner's lock
    revision, lock = a.read()
    assert revision == 3 and lock is not None and set(lock.upstreams) == {"base", "files", "notes"}


def test_an_empty_store_is_seeded_from_the_lock_file_once(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "a" / "upstreams.lock"
    file.parent.mkdir()
    file.write_text(Lock().pinning("files", [item("files", "read")]).render(), encoding="utf-8")
    a, b = SharedPins(Database(store), file), SharedPins(Database(store), file)
    with caplog.at_level(logging.INFO, "gateway.catalog.shared_pins"):
        assert a.read() == (1, Lock.read(file))
        assert b.read() == (1, Lock.read(file))
        # From now on the file is not read: the store's lock is the one in force.
        file.write_text(Lock().render(), encoding="utf-8")
        assert a.read()[0] == 1 and a.lock() != Lock()
    seeded = [record.getMessage() for record in caplog.records]
    assert len(seeded) == 1 and "the store had no pins" in seeded[0] and str(file) in seeded[0]
    assert PASSWORD not in seeded[0]


def test_a_damaged_lock_in_the_store_is_one_line_naming_the_store(store: str, tmp_path: Path) -> None:
    a = replica(store, tmp_path, "a")
    a.update(approving("files", item("files", "read")))
    with Database(store).session() as db:
        db.execute("UPDATE pins SET document = replace(document, 'Read a file.', 'Read any file.')")
    with pytest.raises(LockError, match=r"\(pins\): \[upstreams.files\] tools.read sha256: does not match") as raised:
        a.read()
    assert str(raised.value).startswith(Database(store).shown) and "\n" not in str(raised.value)


def store_config(tmp_path: Path, url: str) -> Any:
    return load_config(write_config(tmp_path, {}, store=url))


def test_the_commands_use_the_stores_lock_when_a_store_is_set(store: str, tmp_path: Path) -> None:
    config = store_config(tmp_path, store)
    with pytest.raises(ConfigError, match="there is no lock in postgresql://armor@"):
        pins_needed(config)
    written = write_pins(config, approving("files", item("files", "read")))
    assert written == f"{Database(store).shown} (pins): revision 1"
    pins_needed(config)
    assert read_pins(config) == Lock().pinning("files", [item("files", "read")])
    assert not config.lock_path.exists()  # the store holds it, and only the store


def test_an_unreachable_store_fails_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"postgresql://armor:{PASSWORD}@127.0.0.1:{free_port()}/armor"
    config = store_config(tmp_path, url)
    config.lock_path.write_text(Lock().render(), encoding="utf-8")  # a local file must not stand in
    for act in (lambda: pins_needed(config), lambda: read_pins(config), lambda: write_pins(config, approving("x"))):
        with pytest.raises(StoreError, match=r"^postgresql://armor@127\.0\.0\.1:\d+/armor: cannot connect"):
            act()
    with caplog.at_level(logging.ERROR, "gateway.catalog.shared_pins"):
        # A gateway starting now holds every definition (a lock that pins nothing), never none.
        assert serving_pins(config) == Lock()
    [line] = [record.getMessage() for record in caplog.records]
    assert "cannot connect" in line and "every definition is held" in line and PASSWORD not in line


@pytest.mark.skipif(server_missing() is not None, reason=str(server_missing()))
@pytest.mark.anyio
async def test_a_serving_replica_follows_the_store_and_keeps_its_pins_while_it_is_down(tmp_path: Path) -> None:
    with cluster() as own:
        url = own.url(own.new_database())
        Database(url).migrate()
        writer, watcher = replica(url, tmp_path, "a"), replica(url, tmp_path, "b")
        await anyio.to_thread.run_sync(writer.update, approving("files", item("files", "read")))
        in_force: list[Lock | None] = [None]
        installed = anyio.Event()
        troubles: list[str] = []
        trouble = anyio.Event()

        async def install(lock: Lock | None) -> None:
            nonlocal installed
            in_force[0] = lock
            installed.set()
            installed = anyio.Event()

        def failed(detail: str) -> None:
            nonlocal trouble
            troubles.append(detail)
            trouble.set()
            trouble = anyio.Event()

        async def until(event: Callable[[], anyio.Event], done: Callable[[], bool]) -> None:
            with anyio.fail_after(30):
                while not done():
                    await event().wait()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watcher.watch, lambda: in_force[0], install, failed)
            await until(lambda: installed, lambda: in_force[0] == writer.lock())

            await anyio.to_thread.run_sync(own.stop, "fast")
            await until(lambda: trouble, lambda: bool(troubles))
            assert in_force[0] == Lock().pinning("files", [item("files", "read")])  # kept, not dropped
            assert troubles[0].startswith(f"{Database(url).shown} (pins): ") and "the pins in force stay" in troubles[0]
            with pytest.raises(StoreError):
                writer.update(approving("notes", item("notes", "read")))

            await anyio.to_thread.run_sync(own.start)
            await anyio.to_thread.run_sync(writer.update, approving("notes", item("notes", "read")))
            await until(lambda: installed, lambda: in_force[0] is not None and "notes" in in_force[0].upstreams)
            assert len(troubles) == 1  # one line for the outage, however long it lasted

            good = in_force[0]
            with Database(url).session() as db:  # a lock damaged in the store by hand: never "no pins"
                db.execute("UPDATE pins SET revision = revision + 1, document = 'version = 1\n[[['")
            await until(lambda: trouble, lambda: len(troubles) == 2)
            assert "not valid TOML" in troubles[1] and in_force[0] == good
            await anyio.to_thread.run_sync(writer.replace, Lock().pinning("files", [item("files", "read")]))
            await until(lambda: installed, lambda: in_force[0] is not None and "notes" not in in_force[0].upstreams)
            tg.cancel_scope.cancel()
