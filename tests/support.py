"""Helpers shared by every test: database legs, leak checks and small queries."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import types
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from alchemy_scope import Database

from .models import Item, Pet

DATABASES_ENV = "ALCHEMY_SCOPE_TEST_DATABASES"
# The slowest tests (the whole fault matrix, every middleware combination racing the commit,
# 50 abandoned exports) run in full where this is set: the noxfile sets it on the newest
# Python. Elsewhere they run a sample, so the matrix of Pythons stays within CI's budget.
THOROUGH = bool(os.environ.get("ALCHEMY_SCOPE_THOROUGH"))


def configured_legs() -> list[str]:
    """The database URLs the environment lists, as given."""
    return os.environ.get(DATABASES_ENV, "").split()


# Each test run works in databases of its own, created from the configured servers' URLs, so
# that runs in parallel (nox -j, several developers) never touch each other's tables.
_RUN_DATABASE = f"alchemy_scope_test_{os.getpid()}"


def database_legs() -> list[str]:
    """The database URLs to run on: SQLite always, then this run's own databases."""
    return ["sqlite", *(_run_url(url) for url in configured_legs())]


# The PgBouncer leg: with ALCHEMY_SCOPE_TEST_PGBOUNCER=host:port (a PgBouncer in transaction
# mode in front of the listed PostgreSQL server; `nox -s pgbouncer` starts one), the PostgreSQL
# legs go through it. Their databases are still created and dropped on the server itself, and
# the tests' own probes (leak checks, lock checks) still connect to it directly.
PGBOUNCER_ENV = "ALCHEMY_SCOPE_TEST_PGBOUNCER"


def _pgbouncer() -> tuple[str, int] | None:
    address = os.environ.get(PGBOUNCER_ENV, "")
    if not address:
        return None
    host, _, port = address.rpartition(":")
    return host, int(port)


def _run_url(url: str) -> str:
    parsed = make_url(url).set(database=_RUN_DATABASE)
    bouncer = _pgbouncer()
    if bouncer and parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(host=bouncer[0], port=bouncer[1])
    return parsed.render_as_string(hide_password=False)


def through_pgbouncer(url: str | URL) -> bool:
    """Whether ``url`` (a leg's, or an engine's) goes through the PgBouncer leg."""
    bouncer = _pgbouncer()
    if url == "sqlite" or bouncer is None:
        return False
    parsed = make_url(url)
    return (parsed.host, parsed.port) == bouncer


def leg_options(url: str | URL) -> dict[str, Any]:
    """What ``Database(url, ...)`` needs on this leg: ``pgbouncer=True`` through PgBouncer."""
    return {"pgbouncer": True} if through_pgbouncer(url) else {}


def direct_url(url: str | URL) -> str:
    """``url``, on the PostgreSQL server itself when it goes through PgBouncer."""
    parsed = make_url(url)
    if through_pgbouncer(parsed):
        server = next(make_url(leg) for leg in configured_legs() if leg.startswith("postgresql"))
        parsed = parsed.set(host=server.host, port=server.port)
    return parsed.render_as_string(hide_password=False)


async def _create_or_drop(create: bool) -> None:
    for url in configured_legs():
        engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                # PgBouncer keeps its server connections to the database open: close them.
                force = " WITH (FORCE)" if _pgbouncer() and url.startswith("postgresql") else ""
                await conn.execute(text(f"DROP DATABASE IF EXISTS {_RUN_DATABASE}{force}"))
                if create:
                    await conn.execute(text(f"CREATE DATABASE {_RUN_DATABASE}"))
        finally:
            await engine.dispose()


def create_run_databases() -> None:
    """Create this run's databases on every configured server."""
    asyncio.run(_create_or_drop(create=True))


def drop_run_databases() -> None:
    """Drop this run's databases."""
    asyncio.run(_create_or_drop(create=False))


def leg_id(url: str) -> str:
    """A short test id for a leg: ``sqlite``, ``postgresql``, ``mysql`` or ``pgbouncer``."""
    if through_pgbouncer(url):
        return "pgbouncer"
    return url if url == "sqlite" else make_url(url).get_backend_name()


def backend(db: Database | AsyncEngine) -> str:
    """The backend name of a database: ``sqlite``, ``postgresql`` or ``mysql``."""
    engine = db if isinstance(db, AsyncEngine) else db.engine
    return engine.dialect.name


def registry(db: Database) -> dict[object, object]:
    """The session registry of ``db``: scope -> session."""
    entries: dict[object, object] = db.scoped_session.registry.registry
    return entries


def _queue_pool(db: Database) -> QueuePool:
    pool = db.engine.pool
    assert isinstance(pool, QueuePool), f"{pool!r} keeps no connections"
    return pool


def idle_connections(db: Database) -> int:
    """How many connections the pool of ``db`` holds checked in (idle)."""
    return _queue_pool(db).checkedin()


def checked_out_connections(db: Database) -> int:
    """How many connections of the pool of ``db`` are checked out (in use)."""
    return _queue_pool(db).checkedout()


async def leaks(db: Database) -> list[str]:
    """Describe every leak of ``db``: registry entries, checked-out connections, idle txns."""
    found = []
    if registry(db):
        found.append(f"registry holds {len(registry(db))} session(s)")
    checkedout = getattr(db.engine.pool, "checkedout", lambda: 0)  # NullPool keeps none
    if checkedout():
        found.append(f"{checkedout()} connection(s) checked out")
    if not found and backend(db) == "postgresql":
        # A connection of its own: one of the pool's may have been killed by a fault test.
        other = create_async_engine(direct_url(db.engine.url), poolclass=NullPool)
        async with other.connect() as conn:
            idle = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                )
            )
        await other.dispose()
        if idle:
            found.append(f"{idle} PostgreSQL backend(s) idle in transaction")
    return found


async def assert_no_leaks(*dbs: Database, wait: float = 5.0) -> None:
    """Assert that no database leaks, giving server-side cleanup up to ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        found = [f"{db!r}: {leak}" for db in dbs for leak in await leaks(db)]
        if not found:
            return
        if loop.time() > deadline:
            raise AssertionError("; ".join(found))
        await asyncio.sleep(0.02)


async def assert_writable(db: Database) -> None:
    """Another connection locks and writes the items at once, then the pool's own: nothing is held.

    SQLite connections give up on a lock after 0.3 s here; PostgreSQL locks the table NOWAIT,
    MariaDB waits at most a second for the table lock.
    """
    name = Item.__tablename__
    mark = uuid.uuid4().hex[:12]
    quick = {"timeout": 0.3} if backend(db) == "sqlite" else {}
    other = create_async_engine(direct_url(db.engine.url), poolclass=NullPool, connect_args=quick)
    try:
        async with other.begin() as conn:
            if backend(db) == "postgresql":
                await conn.execute(text(f"LOCK TABLE {name} NOWAIT"))
            if backend(db) == "mysql":
                await conn.execute(text("SET SESSION lock_wait_timeout = 1"))
                await conn.execute(text(f"LOCK TABLES {name} WRITE"))
            await conn.execute(insert(Item).values(name=f"writable {mark}"))
            if backend(db) == "mysql":
                await conn.execute(text("UNLOCK TABLES"))
    finally:
        await other.dispose()
    async with db.engine.begin() as conn:
        await conn.execute(insert(Item).values(name=f"writable through the pool {mark}"))


async def item_names(db: Database) -> list[str]:
    """The names of all items, read on a fresh connection (what is committed)."""
    async with db.engine.connect() as conn:
        return list((await conn.scalars(select(Item.name).order_by(Item.id))).all())


async def count_items(db: Database) -> int:
    """How many items are committed."""
    async with db.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(Item)) or 0)


async def eventually(check: Callable[[], Awaitable[bool]], wait: float = 5.0) -> None:
    """Wait until ``check`` is true, failing after ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def add_write_that_fails_at_commit(session: AsyncSession) -> None:
    """Add an item plus a write that passes every statement but fails at COMMIT.

    PostgreSQL and SQLite get a pet whose owner does not exist, which a deferred foreign key
    rejects only at COMMIT. MariaDB checks constraints per statement, so there a
    ``before_commit`` hook makes the same COMMIT fail.
    """
    session.add(Item(name="never committed"))
    session.add(Pet(owner_id=999_999))
    if session.get_bind().dialect.name == "mysql":

        def refuse(_session: object) -> None:
            raise IntegrityError("COMMIT", {}, Exception("constraint violated at COMMIT"))

        event.listen(session.sync_session, "before_commit", refuse, once=True)


def readme_code(path: str, index: int = 0) -> str:
    """The ``index``-th Python code block of a README of this repository."""
    text_ = (Path(__file__).parent.parent / path).read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", text_, flags=re.DOTALL)
    return blocks[index]


def run_readme_app(path: str, index: int = 0) -> dict[str, Any]:
    """Run a README's example app as a user would after copying it; return its globals."""
    module = types.ModuleType("readme_app")
    sys.modules["readme_app"] = module  # declarative models resolve Mapped[...] through it
    exec(compile(readme_code(path, index), path, "exec"), module.__dict__)
    return module.__dict__
