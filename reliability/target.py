"""One example being served: its server process, its database, and the checkpoints run on it."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from tooling.postgres import PrivatePostgres
from tooling.servers import ServerProcess

from .client import Ledger, Tally
from .serve import MISSING_PARENT_ID

ROOT = Path(__file__).resolve().parent.parent
POOL_SIZE = 5
POOL_TIMEOUT = 5  # seconds (whole): well above the waits of the load, on a loaded machine too


@dataclass(frozen=True)
class Settings:
    """How much of everything a run does."""

    load_requests: int = 5_000
    concurrency: int = 100
    websockets: int = 10
    disconnects_per_kind: int = 100
    cancelled: int = 200
    failed_commits: int = 200
    isolation_requests: int = 600
    isolation_concurrency: int = 50
    fuzz_examples: int = 30
    schema_examples: int = 25
    memory_requests: int = 50_000
    memory_warmup: int = 10_000


QUICK = Settings(
    load_requests=1_000,
    disconnects_per_kind=25,
    cancelled=50,
    failed_commits=50,
    isolation_requests=150,
    fuzz_examples=8,
    schema_examples=5,
    memory_requests=6_000,
    memory_warmup=2_000,
)


@dataclass
class Rows:
    """Rows expected against rows found at the last data check."""

    acked: int = 0
    found: int = 0
    unknown: int = 0  # writes of unknown outcome (the client never heard)
    unknown_found: int = 0  # of which landed
    children_expected: int = 0
    children_found: int = 0


@dataclass
class Target:
    """An example served by a real server on 127.0.0.1, against its own database."""

    framework: str
    server: str
    postgres: PrivatePostgres
    database: str
    settings: Settings
    tally: Tally
    log_path: Path
    ledger: Ledger = field(default_factory=Ledger)
    children: dict[str, bool] = field(default_factory=dict)  # name -> acknowledged
    rows: Rows = field(default_factory=Rows)
    leaks_found: int = 0
    base_url: str = ""
    process: ServerProcess | None = None
    _log: IO[str] | None = None

    @property
    def ws_url(self) -> str:
        """The base URL for websockets."""
        return self.base_url.replace("http://", "ws://")

    @property
    def port(self) -> int:
        """The server's port."""
        return int(self.base_url.rsplit(":", 1)[1])

    def environment(self) -> dict[str, str]:
        """The example's environment: its database and a pool smaller than the concurrency."""
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
            "DATABASE_URL": self.postgres.app_url(self.database),
            "DATABASE_POOL_SIZE": str(POOL_SIZE),
            "DATABASE_MAX_OVERFLOW": "0",
            "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
        }

    async def start(self) -> None:
        """Start ``python -m reliability.serve <framework>`` and wait until it listens."""
        await self.postgres.create_database(self.database)
        self._log = self.log_path.open("w")
        env = self.environment()
        self.process = ServerProcess("reliability.serve", self.framework, env=env, log=self._log)
        self.base_url = await asyncio.to_thread(self.process.wait_until_listening)

    async def stop(self) -> None:
        """Stop the server (SIGTERM: it runs the app's shutdown)."""
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self._log is not None:
            self._log.close()

    async def admin_fetch(self, query: str) -> list[Any]:
        """Run a query as the admin in the example's database."""
        return await self.postgres.admin(query, database=self.database)

    async def leaks(self, wait: float = 5.0) -> list[str]:
        """Registry entries, checked-out connections and idle-in-transaction backends left.

        Server-side cleanup may trail the last response by a moment: look again for up to
        ``wait`` seconds before reporting.
        """
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
                report = (await client.get("/__leaks")).json()
            ((idle,),) = await self.admin_fetch(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state LIKE 'idle in transaction%'"
            )
            found = [
                what
                for count, what in [
                    (report["registry"], f"registry holds {report['registry']} session(s)"),
                    (
                        report["checkedout"],
                        f"{report['checkedout']} pooled connection(s) checked out",
                    ),
                    (idle, f"{idle} backend(s) idle in transaction"),
                ]
                if count
            ]
            if not found or asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.1)

    async def data_problems(self) -> list[str]:
        """Compare the tables with what the clients were told."""
        titles = {row[0] for row in await self.admin_fetch("SELECT title FROM todos")}
        problems = self.ledger.check(titles)
        query = "SELECT name, parent_id FROM reliability_children"
        children = {row[0]: row[1] for row in await self.admin_fetch(query)}
        for name, acked in self.children.items():
            if acked and name not in children:
                problems.append(f"acknowledged child {name} missing")
            if not acked and name in children:
                problems.append(f"child {name} written although its COMMIT failed")
        orphans = [name for name, parent in children.items() if parent == MISSING_PARENT_ID]
        if orphans:
            problems.append(f"{len(orphans)} child row(s) violate the foreign key")
        self.rows = Rows(
            acked=len(self.ledger.acked),
            found=len(titles),
            unknown=len(self.ledger.unknown),
            unknown_found=len(self.ledger.unknown & titles),
            children_expected=sum(self.children.values()),
            children_found=len(children),
        )
        return problems

    async def checkpoint(self, *, data: bool = True) -> list[str]:
        """The leak check, then (unless ``data`` is false) the data check."""
        leaks = await self.leaks()
        self.leaks_found += len(leaks)
        return [*leaks, *(await self.data_problems() if data else [])]
