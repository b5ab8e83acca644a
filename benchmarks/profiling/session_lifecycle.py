"""What each way of opening and closing a session costs around one primary-key read.

`python -m benchmarks.profiling.session_lifecycle sqlite|postgresql [ROUNDS] [READS]`: no
framework; CPU time per read (this process and its threads), in interleaved rounds, against
`async with sessionmaker() as session`. It creates the bench table and drops it at the end:
do not run it during a bench run.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from alchemy_scope import Database, scope
from alchemy_scope._core import _run_to_completion
from benchmarks.models import SESSION_OPTIONS, Item, create_table, drop_table, pool_options

URLS = {
    "sqlite": "sqlite+aiosqlite:////tmp/alchemy-scope-profiling.db",
    "postgresql": os.environ.get(
        "ALCHEMY_SCOPE_BENCH_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
}


async def measure(url: str, rounds: int, reads: int) -> None:
    """Print the CPU microseconds per read of each way, and the difference to the first."""
    engine = create_async_engine(url, **pool_options(url))
    await create_table(engine)
    sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)
    db = Database(engine)

    async def async_with() -> None:
        async with sessionmaker() as session:  # SQLAlchemy closes it in a shielded task
            await session.get(Item, 1)

    async def close_directly() -> None:
        session = sessionmaker()
        await session.get(Item, 1)
        await session.close()

    async def close_in_shielded_task() -> None:
        session = sessionmaker()
        await session.get(Item, 1)
        await _run_to_completion(session.close)

    async def alchemy_scope() -> None:
        async with scope():
            await db.session.get(Item, 1)

    async def scoped_session_unguarded() -> None:
        session = db.sessionmaker()
        await AsyncSession.get(session, Item, 1)
        await AsyncSession.close(session)

    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "async with sessionmaker()": async_with,
        "close() awaited directly": close_directly,
        "close() in alchemy-scope's shielded task": close_in_shielded_task,
        "async with scope(): db.session": alchemy_scope,
        "ScopedSession, unguarded, close() directly": scoped_session_unguarded,
    }
    names = list(ways)
    shuffler = random.Random(0)
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        for _ in range(200):
            await ways[name]()
    for _ in range(rounds):
        shuffler.shuffle(names)
        for name in names:
            way = ways[name]
            gc.collect()
            started = time.process_time()
            for _ in range(reads):
                await way()
            cpu[name].append((time.process_time() - started) / reads * 1e6)
    first = cpu["async with sessionmaker()"]
    for name, values in cpu.items():
        difference = statistics.median(a - b for a, b in zip(values, first, strict=True))
        print(f"{name:44} {statistics.median(values):7.1f} µs  {difference:+6.1f} µs")
    await drop_table(engine)
    await engine.dispose()


def main() -> None:
    """Measure on the database named on the command line."""
    database, *counts = sys.argv[1:]
    rounds, reads = (int(count) for count in [*counts, "30", "200"][:2])
    uvloop.run(measure(URLS[database], rounds, reads))


if __name__ == "__main__":
    main()
