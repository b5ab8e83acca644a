"""What is measured: the variants, the routes, the database configurations, the rounds.

Every variant of a framework serves the same three routes with the same handlers; they differ
only in how a handler gets its session (:func:`handlers`) and what is installed around the
app (:func:`build`):

- ``baseline``: the framework alone; each handler opens ``async with sessionmaker() as s:``
  and commits itself.
- ``manual``: alchemy-scope's integration, ``Database(engine)``; handlers use ``db.session``
  and commit themselves.
- ``autocommit``: the same with ``Database(engine, commit="autocommit")``; handlers only
  flush, the integration commits before the response starts.
- ``seed``: the seed's bare pattern: a pure-ASGI middleware that sets a ContextVar key and
  calls ``async_scoped_session.remove()`` in ``finally``; no guards. Handlers commit.
"""

import asyncio
import importlib
import itertools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemy_scope import Database
from tooling.report import spread

FRAMEWORKS = ["starlette", "fastapi", "litestar", "quart"]
SERVERS = {
    framework: "hypercorn" if framework == "quart" else "uvicorn" for framework in FRAMEWORKS
}
VARIANTS = ["baseline", "manual", "autocommit", "seed"]
LABELS = {
    "baseline": "baseline: session per handler",
    "manual": "alchemy-scope, manual",
    "autocommit": "alchemy-scope, autocommit",
    "seed": "the seed's bare pattern",
}
# name -> pool size (max_overflow=0). SQLite lets one writer in at a time: with more
# connections, concurrent inserts wait in its busy handler (sleeps of up to 100 ms).
POOLS = {"sqlite": 1, "postgresql": 32, "postgresql-pool8": 8}
TABLE = "alchemy_scope_bench_items"
READ_ID = 1


@dataclass(frozen=True)
class Route:
    """A measured route and the request every driver sends to it."""

    name: str
    method: str
    path: str
    body: bytes
    status: int


ROUTES = {
    "ping": Route("ping", "GET", "/ping", b"", 200),
    "read": Route("read", "GET", f"/items/{READ_ID}", b"", 200),
    "insert": Route("insert", "POST", "/items", b'{"name": "bench"}', 201),
}


@dataclass(frozen=True)
class Cell:
    """What the variants are compared on: a route, a database configuration, a concurrency."""

    route: str
    database: str
    concurrency: int


def cells(databases: list[str]) -> list[Cell]:
    """Every cell: /ping once per concurrency, the database routes on each configuration.

    The small pool matters only when requests wait for connections: at concurrency 32.
    """
    return [
        Cell(route, database, concurrency)
        for concurrency in (1, 32)
        for route in ROUTES
        for database in (databases[:1] if route == "ping" else databases)
        if concurrency > POOLS[database] or POOLS[database] != 8
    ]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def engine(database: str, url: str) -> AsyncEngine:
    """The engine of a configuration: a fixed pool, the same for every variant."""
    return create_async_engine(url, pool_size=POOLS[database], max_overflow=0, pool_timeout=60)


async def create_table(engine: AsyncEngine) -> str:
    """(Re)create the bench table with 1,000 rows (SQLite in WAL mode); the server version."""
    async with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            await connection.execute(text("PRAGMA journal_mode=WAL"))
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            Item.__table__.insert(), [{"name": f"item {n}"} for n in range(1000)]
        )
        sqlite = engine.dialect.name == "sqlite"
        return str(await connection.scalar(text(f"select {'sqlite_' if sqlite else ''}version()")))


async def drop_table(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)


class Handlers:
    """The two database routes' work, on the session ``session()`` gives."""

    def __init__(self, session: Callable[[], AsyncSession], *, commit: bool) -> None:
        self.session, self.commit = session, commit

    async def read(self, item_id: int) -> dict[str, Any]:
        item = await self.session().get(Item, item_id)
        assert item is not None, "the bench table is not seeded"
        return {"id": item.id, "name": item.name}

    async def insert(self, name: str) -> dict[str, Any]:
        session, item = self.session(), Item(name=name)
        session.add(item)
        await (session.commit() if self.commit else session.flush())
        return {"id": item.id}


class OwnSessions(Handlers):
    """The baseline: each handler opens its own session and closes it."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessionmaker, commit=True)

    async def read(self, item_id: int) -> dict[str, Any]:
        async with self.session() as session:
            item = await session.get(Item, item_id)
            assert item is not None, "the bench table is not seeded"
            return {"id": item.id, "name": item.name}

    async def insert(self, name: str) -> dict[str, Any]:
        async with self.session() as session:
            item = Item(name=name)
            session.add(item)
            await session.commit()
            return {"id": item.id}


class SeedMiddleware:
    """The seed's bare pattern: a ContextVar key per request, ``remove()`` in ``finally``."""

    key: ContextVar[int] = ContextVar("bench_request_key")
    numbers = itertools.count()

    def __init__(self, app: Any, scoped: async_scoped_session[AsyncSession]) -> None:
        self.app, self.scoped = app, scoped

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        token = self.key.set(next(self.numbers))
        try:
            await self.app(scope, receive, send)
        finally:
            await self.scoped.remove()
            self.key.reset(token)


def build(framework: str, variant: str, engine: AsyncEngine) -> Any:
    """The ASGI app of one variant of one framework on ``engine``.

    ``benchmarks.apps.<framework>(handlers, db, wrap)`` builds it: ``db`` is the
    alchemy-scope ``Database`` to install (or None), ``wrap`` wraps the ASGI callable.
    """
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)  # alchemy-scope's default
    db, wrap = None, lambda app: app
    if variant == "baseline":
        handlers: Handlers = OwnSessions(sessionmaker)
    elif variant == "seed":
        scoped = async_scoped_session(sessionmaker, scopefunc=SeedMiddleware.key.get)
        handlers, wrap = Handlers(scoped, commit=True), lambda app: SeedMiddleware(app, scoped)
    else:
        database = db = Database(engine, commit=variant)
        handlers = Handlers(lambda: database.session, commit=variant == "manual")
    apps = importlib.import_module("benchmarks.apps")  # it imports this module
    return getattr(apps, framework)(handlers, db, wrap)  # type: ignore[no-any-return]


async def interleaved(
    sample: Callable[[str], Awaitable[float]], rounds: list[int], tolerance: float = 0.03
) -> dict[str, list[float]]:
    """Requests per second of every variant, one sample each per round.

    Round ``r`` samples the variants in :data:`VARIANTS` order rotated by ``r`` (ABCD, BCDA,
    ...). After ``rounds[0]`` rounds it goes on, up to ``rounds[1]``, while the interquartile
    range of some variant's ratio to the baseline is wider than ``tolerance`` either side.
    """
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for index in range(rounds[1]):
        if index >= rounds[0] and all(
            within(samples[variant], samples["baseline"], tolerance) for variant in VARIANTS[1:]
        ):
            break
        for variant in VARIANTS[index % 4 :] + VARIANTS[: index % 4]:
            samples[variant].append(await sample(variant))
            await asyncio.sleep(0)
    return samples


def within(mine: list[float], theirs: list[float], tolerance: float) -> bool:
    """Whether the middle half of the ratios, round by round, is ``tolerance`` of the median."""
    ratio = spread(a / b for a, b in zip(mine, theirs, strict=True))
    return (ratio["q3"] - ratio["q1"]) / 2 <= tolerance * ratio["median"]


def records(
    driver: str, framework: str, cell: Cell, samples: dict[str, list[float]], **extra: Any
) -> list[dict[str, Any]]:
    """One record per variant: where it was measured and the requests per second of each round."""
    print(f"   {driver} {framework} {cell}: {len(samples['baseline'])} rounds", flush=True)
    where = {"driver": driver, "framework": framework, **cell.__dict__, **extra}
    return [{**where, "variant": variant, "rps": samples[variant]} for variant in VARIANTS]
