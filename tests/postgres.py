"""A real PostgreSQL server for the tests: a throwaway cluster made with `initdb` in a temporary directory,
on a free port, stopped at the end.

Debian's `postgresql` package provides the server (`.ci/run` installs it). The server refuses to run as
root, so as root the cluster belongs to the `postgres` user the package creates. Each test that asks
for `store_url` gets a database of its own, with a password-protected role, so tests never see each
other's rows.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest

PASSWORD = "armor-test-secret"
_numbers = count(1)


def server_binaries() -> Path | None:
    """The directory of the newest installed PostgreSQL server's programs, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[4]))
    return Path(found[-1]).parent if found else None


def server_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here (`None` when they can)."""
    if server_binaries() is None:
        return "no PostgreSQL server installed (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """A running throwaway PostgreSQL cluster."""

    bin: Path
    data: Path
    port: int
    owner: str | None
    """The OS user it runs as when the tests run as root (`postgres`), else `None` (the tests' own)."""

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=on"
        log = str(self.data.parent / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser (over the Unix socket); its output."""
        result = self._run(
            "psql", "-h", str(self.data.parent), "-p", str(self.port), "-U", "postgres", "-d", database,
            "-v", "ON_ERROR_STOP=1", "-Atc", sql,
        )  # fmt: skip
        return result.stdout

    def url(self, database: str, *, user: str = "armor", password: str = PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new, empty database owned by the `armor` role; its name."""
        name = f"armor_{os.getpid()}_{next(_numbers)}"
        self.psql(f"CREATE DATABASE {name} OWNER armor ENCODING 'UTF8' TEMPLATE template0")
        return name


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """Start a throwaway cluster; stop and remove it at the end."""
    binaries = server_binaries()
    assert binaries is not None
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="mcp-armor-pg-"))
    if owner is not None:
        entry = pwd.getpwnam(owner)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    found = Cluster(binaries, root / "data", free_port(), owner)
    try:
        found._run("initdb", "-D", str(found.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        # Only the superuser over the Unix socket is trusted; every other connection needs a password.
        rules = ["local all postgres trust", "local all all scram-sha-256", "host all all 127.0.0.1/32 scram-sha-256"]
        (found.data / "pg_hba.conf").write_text("\n".join(rules) + "\n", encoding="utf-8")
        found.start()
        found.psql(f"CREATE ROLE armor LOGIN PASSWORD '{PASSWORD}'")
        yield found
    finally:
        found.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """One throwaway PostgreSQL cluster for the whole session (skipped where no server is installed)."""
    why = server_missing()
    if why is not None:
        pytest.skip(why)
    with cluster() as running:
        yield running


@pytest.fixture
def store_url(postgres: Cluster) -> str:
    """The URL of a new, empty database of its own (password in it) on the session's cluster."""
    return postgres.url(postgres.new_database())
