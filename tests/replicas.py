"""A private PostgreSQL primary and a streaming standby of it, for the replica routing tests.

The reliability suite's private cluster (``reliability/postgres.py``: initdb in a temporary
directory, as the ``postgres`` user when run as root, on a free loopback port) is the
primary; the standby is a ``pg_basebackup -R`` of it on another port. Both are stopped and
removed when the test session ends. Without PostgreSQL's server programs the tests skip,
except on CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from reliability.postgres import PrivatePostgres

DATABASE = "replicas"
# Physical replication for the admin role, over the primary's socket.
_REPLICATION_HBA = "local replication postgres trust\n"


class _Primary(PrivatePostgres):
    """The reliability cluster, letting the admin role replicate."""

    def start(self) -> None:
        hba = self.data / "pg_hba.conf"
        if _REPLICATION_HBA not in hba.read_text():
            with hba.open("a") as config:
                config.write(_REPLICATION_HBA)
        super().start()


class ReplicaCluster:
    """A primary and its standby: URLs, and the levers the tests pull on the standby."""

    def __init__(self) -> None:
        self.primary = _Primary()
        self.standby = PrivatePostgres()
        while self.standby.port == self.primary.port:  # two probes may get the same free port
            self.standby.remove()
            self.standby = PrivatePostgres()

    def create(self) -> None:
        """Start the primary, create the test database, clone it into a running standby."""
        self.primary.create()
        asyncio.run(self._admin(self.primary, f"CREATE DATABASE {DATABASE}"))
        self.primary._run(
            "pg_basebackup",
            "-D",
            str(self.standby.data),
            "-h",
            str(self.primary.root),
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-R",  # standby.signal and primary_conninfo: a streaming standby
            "-X",
            "stream",
            "-c",
            "fast",  # no wait for a spread checkpoint
            "--no-sync",
        )
        self.standby.start()

    def remove(self) -> None:
        """Stop both servers and delete their files."""
        self.standby.remove()
        self.primary.remove()

    @property
    def primary_url(self) -> str:
        """The primary's async SQLAlchemy URL."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.primary.port}/{DATABASE}"

    @property
    def standby_url(self) -> str:
        """The standby's async SQLAlchemy URL."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.standby.port}/{DATABASE}"

    @staticmethod
    async def _admin(server: PrivatePostgres, *statements: str) -> list[asyncpg.Record]:
        """Run statements as the admin on ``server``; the last one's rows."""
        return await _fetch(server.admin_dsn(), statements)

    async def on_primary(self, *statements: str) -> list[asyncpg.Record]:
        """Run statements on the primary's test database, on a connection of their own."""
        return await _fetch(self.primary.admin_dsn(DATABASE), statements)

    async def pause_replay(self) -> None:
        """Stop the standby from applying WAL: it falls behind from the primary's next write."""
        await self._admin(self.standby, "SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        """Let the standby apply WAL again."""
        await self._admin(self.standby, "SELECT pg_wal_replay_resume()")

    async def caught_up(self, timeout: float = 10.0) -> None:
        """Wait until the standby has replayed everything the primary has written so far."""
        (row,) = await self._admin(self.primary, "SELECT pg_current_wal_insert_lsn()::text AS lsn")
        target = row["lsn"]
        deadline = time.monotonic() + timeout
        while True:
            (replayed,) = await self._admin(
                self.standby, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn AS done"
            )
            if replayed["done"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby did not replay up to {target} in {timeout} s")
            await asyncio.sleep(0.02)

    def stop_standby(self) -> None:
        """Stop the standby the way an operator would (fast shutdown: sessions are ended)."""
        self.standby.stop()

    def start_standby(self) -> None:
        """Start the standby again; it resumes streaming from the primary."""
        self.standby.start()


async def _fetch(dsn: str, statements: tuple[str, ...]) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        rows: list[asyncpg.Record] = []
        for statement in statements:
            rows = await connection.fetch(statement)
        return rows
    finally:
        await connection.close()


def _programs_missing() -> str | None:
    """Why PostgreSQL's server programs cannot run here, or ``None`` if they can.

    Where they are: ``PG_BIN``, else ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin``; ``PG_BIN`` is then set for the private clusters.
    """
    if "PG_BIN" not in os.environ:
        try:
            found = subprocess.run(
                ["pg_config", "--bindir"], check=True, capture_output=True, text=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            versions = sorted(
                glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4])
            )
            found = versions[-1] if versions else ""
        if found:
            os.environ["PG_BIN"] = found
    directory = Path(os.environ.get("PG_BIN", "/nonexistent"))
    missing = [p for p in ("initdb", "pg_ctl", "pg_basebackup") if not (directory / p).exists()]
    return f"{', '.join(missing)} not found in {directory}" if missing else None


@pytest.fixture(scope="session")
def replica_cluster() -> Iterator[ReplicaCluster]:
    """A running primary and standby for the whole test session (CI: missing programs fail)."""
    missing = _programs_missing()
    if missing is not None:
        reason = f"PostgreSQL's server programs are needed for the replica tests: {missing}"
        if os.environ.get("CI"):
            pytest.fail(reason + " (on CI they must be installed: .ci/run installs them)")
        pytest.skip(reason)
    # One test run's private cluster at a time on this machine (CI runs two test sessions side
    # by side): the second waits for the first's to be removed.
    with open(Path(tempfile.gettempdir()) / "alchemy-scope-replica-cluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster = ReplicaCluster()
        try:
            cluster.create()
            yield cluster
        finally:
            cluster.remove()
