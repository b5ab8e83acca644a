"""A private PostgreSQL instance for one run: created, stopped, restarted and removed at will.

The run never touches the machine's shared server: it restarts its database on purpose.
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

import asyncpg

from tooling.servers import loopback_socket

APP_ROLE = "reliability_app"
# Trust for the admin and the local socket; the app's role must log in with its password.
PG_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def _postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs (``PG_BIN`` overrides the search)."""
    if "PG_BIN" in os.environ:
        return Path(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if not versions:
        raise RuntimeError(
            "PostgreSQL's initdb was not found: install the PostgreSQL server package, or set "
            "PG_BIN to the directory holding initdb and pg_ctl."
        )
    return Path(versions[-1])


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a free port, in a temporary directory.

    As root, the server runs as the ``postgres`` OS user (PostgreSQL refuses root). The app's
    role has a random password that a TCP login must give; the admin (``postgres``) is trusted.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        with loopback_socket() as probe:  # a port that nothing listens on right now
            self.port = probe.getsockname()[1]
        self.password = "pw-" + secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix="alchemy-scope-reliability-"))
        self.data = self.root / "data"
        self.log = self.root / "postgresql.log"
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def create(self) -> None:
        """Initialise the cluster and start it."""
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        (self.data / "pg_hba.conf").write_text(PG_HBA)
        self.start()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=60 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        """Stop the server the way an operator restarting it would: fast shutdown."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs and delete every file of the cluster."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def admin_dsn(self, database: str = "postgres") -> str:
        """An asyncpg DSN of the trusted admin role."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def app_url(self, database: str) -> str:
        """The SQLAlchemy URL the app uses: its own role, with its password."""
        return f"postgresql+asyncpg://{APP_ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    async def admin(self, database: str = "postgres") -> asyncpg.Connection:
        """A new admin connection."""
        return await asyncpg.connect(self.admin_dsn(database))

    async def _admin_execute(self, *statements: str) -> None:
        """Run statements as the admin, on a connection of their own."""
        connection = await self.admin()
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    async def create_app_role(self) -> None:
        """Create the app's role, which logs in with ``self.password``."""
        await self._admin_execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.password}'")

    async def create_database(self, name: str) -> None:
        """Create a database owned by the app's role."""
        await self._admin_execute(f"CREATE DATABASE {name} OWNER {APP_ROLE}")

    async def set_app_password(self, password: str) -> None:
        """Change the app's password and end its sessions: its next logins need the new one."""
        await self._admin_execute(
            f"ALTER ROLE {APP_ROLE} PASSWORD '{password}'",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{APP_ROLE}'",
        )
