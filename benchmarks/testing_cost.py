"""What a test costs with alchemy-scope's rolled-back transaction, against recreating tables.

Each simulated test writes one row through a scope and commits. The plugin's way runs it in
the fixtures' transaction (connect, BEGIN, bind, SAVEPOINTs, ROLLBACK); the other way drops and
recreates the tables before each test. Run: python benchmarks/testing_cost.py [URL ...]
(default: SQLite in a temporary directory).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from alchemy_scope import Database
from alchemy_scope.pytest_plugin import rolled_back_transaction

TESTS = 100


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "cost_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)


class Book(Base):
    __tablename__ = "cost_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[int] = mapped_column(ForeignKey(Author.id))


class Review(Base):
    __tablename__ = "cost_reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    book_id: Mapped[int] = mapped_column(ForeignKey(Book.id))
    text: Mapped[str] = mapped_column(String(500))


async def the_test(db: Database, n: int) -> None:
    async with db.scope():
        db.session.add(Author(name=f"author {n}"))
        await db.session.commit()


async def with_rollback(db: Database, n: int) -> None:
    async with db.engine.connect() as connection, rolled_back_transaction(connection):
        with db.bound_to(connection):
            await the_test(db, n)


async def with_recreated_tables(db: Database, n: int) -> None:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    await the_test(db, n)


async def measure(url: str) -> dict[str, float]:
    db = Database(url)
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    timings: dict[str, list[float]] = {"rollback": [], "recreate": []}
    for n in range(TESTS):  # interleaved, so both see the same machine
        for name, way in (("rollback", with_rollback), ("recreate", with_recreated_tables)):
            start = time.perf_counter()
            await way(db, n)
            timings[name].append((time.perf_counter() - start) * 1000)
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
    await db.dispose()
    return {name: statistics.median(values) for name, values in timings.items()}


async def main(urls: list[str]) -> None:
    print(f"median ms per test over {TESTS} tests (3 tables)")
    print("| database | rolled-back transaction | drop + create tables | ratio |")
    print("| --- | --- | --- | --- |")
    for url in urls:
        result = await measure(url)
        ratio = result["recreate"] / result["rollback"]
        name = url.split("+")[0]
        print(f"| {name} | {result['rollback']:.2f} | {result['recreate']:.2f} | {ratio:.0f}x |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        default = f"sqlite+aiosqlite:///{Path(directory) / 'cost.db'}"
        asyncio.run(main(sys.argv[1:] or [default]))
