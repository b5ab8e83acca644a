"""The bench table and the three things a route does with a session, shared by every variant.

Every variant of a framework calls the same functions with the session it got its own way, so
the only difference between variants is how that session is opened, found and closed.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import String, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE = "alchemy_scope_bench_items"
SEEDED_ROWS = 1000
READ_ID = 1  # the primary key every read route looks up
# A fixed pool, the same for every variant: the default one (5 + 10 overflow) opens and
# closes connections under bursts. SQLite gets one connection: it lets one writer in at a
# time, and 32 connections writing at once wait in its busy handler, which sleeps up to 100 ms
# (inserts at concurrency 32 fell to about 30 requests per second).
POOL_SIZES = {"sqlite": 1, "postgresql": 32}
SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False}  # alchemy-scope's default


class Base(DeclarativeBase):
    """The declarative base of the bench model."""


class Item(Base):
    """A row of the bench table."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


async def read_item(session: AsyncSession, item_id: int) -> dict[str, Any]:
    """Look one item up by primary key; the route's JSON body."""
    item = await session.get(Item, item_id)
    if item is None:
        raise LookupError(f"no item {item_id}: the bench table was not seeded")
    return {"id": item.id, "name": item.name}


async def insert_item(session: AsyncSession, name: str) -> dict[str, Any]:
    """Insert one item and commit; the route's JSON body."""
    item = Item(name=name)
    session.add(item)
    await session.commit()
    return {"id": item.id}


def pool_options(url: str) -> dict[str, Any]:
    """The engine options of every variant's engine on the database at ``url``."""
    backend = make_url(url).get_backend_name()
    return {"pool_size": POOL_SIZES.get(backend, 32), "max_overflow": 0, "pool_timeout": 60}


async def create_table(engine: AsyncEngine) -> None:
    """(Re)create the bench table with its seed rows; SQLite files switch to WAL."""
    async with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            await connection.execute(text("PRAGMA journal_mode=WAL"))
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            Item.__table__.insert(), [{"name": f"item {n}"} for n in range(SEEDED_ROWS)]
        )


async def drop_table(engine: AsyncEngine) -> None:
    """Drop the bench table."""
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
