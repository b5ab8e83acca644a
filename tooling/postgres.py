"""A private PostgreSQL cluster: created, stopped, restarted and removed at will.

For checks and tests that must never touch the machine's shared server (they restart theirs
on purpose): ``initdb`` in a temporary directory, as the ``postgres`` OS user when run as root
(PostgreSQL refuses root), on a free loopback port, ``fsync`` off. The admin (``postgres``)
is trusted over TCP and the socket; an app role (``APP_ROLE``) must log in with a random
password. ``hba`` adds lines to ``pg_hba.conf`` (a standby's ``replication`` line, say), and
:meth:`PrivatePostgres.run` runs any other server program (``pg_basebackup``) the same way.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from tooling.servers import loopback_socket

APP_ROLE = "reliability_app"
PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs: ``PG_BIN``, ``PATH``, or the newest."""
    if "PG_BIN" in os.environ:
        return Path(os.environ["PG_BIN"])
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if not versions:
        raise RuntimeError(
            "PostgreSQL's initdb was not found: install the PostgreSQL server package, or set "
            "PG_BIN to the directory holding initdb and pg_ctl."
        )
    return Path(versions[-1])


class PrivatePostgres:
    """A throwaway cluster on 127.0.0.1 and a free port, in a temporary directory."""

    def __init__(self, hba: str = "", prefix: str = "alchemy-scope-postgres-") -> None:
        self.bin, self.hba = postgres_bin(), PG_HBA + hba
        with loopback_socket() as probe:  # a port that nothing listens on right now
            self.port = probe.getsockname()[1]
        self.password = "pw-" + secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data, self.log = self.root / "data", self.root / "postgresql.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def run(self, program: str, *args: str) -> None:
        """Run one of PostgreSQL's programs as the server's OS user."""
        command = [str(self.bin / program), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    _run = run  # the name tests/replicas.py calls

    def create(self) -> None:
        """Initialise the cluster and start it."""
        options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        self.run("initdb", "-D", str(self.data), *options)
        (self.data / "pg_hba.conf").write_text(self.hba)
        self.start()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=60 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self.run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        """Stop the server the way an operator restarting it would: fast shutdown."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs and delete every file of the cluster."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_dsn(self, database: str = "postgres") -> str:
        """An asyncpg DSN of the trusted admin role."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin_url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of the trusted admin role."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def app_url(self, database: str) -> str:
        """The SQLAlchemy URL of the app's role, with its password."""
        return f"postgresql+asyncpg://{APP_ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    async def admin(self, *statements: str, database: str = "postgres") -> list[Any]:
        """Run statements as the admin on a connection of their own; the rows of the last."""
        connection = await asyncpg.connect(self.admin_dsn(database), timeout=10)
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = list(await connection.fetch(statement))
            return rows
        finally:
            await connection.close()

    async def create_app_role(self) -> None:
        """Create the app's role, which logs in with ``self.password``."""
        await self.admin(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.password}'")

    async def create_database(self, name: str) -> None:
        """Create a database owned by the app's role."""
        await self.admin(f"CREATE DATABASE {name} OWNER {APP_ROLE}")

    async def set_app_password(self, password: str) -> None:
        """Change the app's password and end its sessions: its next logins need the new one."""
        await self.admin(
            f"ALTER ROLE {APP_ROLE} PASSWORD '{password}'",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{APP_ROLE}'",
        )
