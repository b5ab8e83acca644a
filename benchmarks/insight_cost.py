"""What insight costs per statement, on in-memory SQLite (aiosqlite).

Two figures:

- its listeners' own work per statement: the two cursor-execute listeners called, in a
  scope, with the arguments SQLAlchemy gave them for a real ``SELECT 1``;
- whole statements, insight off and on, in interleaved rounds: the median of the paired
  differences (aiosqlite's thread hand-offs make this one noisy on a busy machine).

With insight off no listener is registered (``tests/core/test_insight.py`` asserts it), so
its cost there is zero by construction. Run: ``python benchmarks/insight_cost.py [rounds]``.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from typing import Any

from sqlalchemy import event, text

from alchemy_scope import Database

STATEMENTS = 500
CALLS = 100_000


async def per_statement(db: Database) -> float:
    """Seconds per ``SELECT 1`` in one scope of ``db`` (the connection already open)."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        started = time.perf_counter()
        for _ in range(STATEMENTS):
            await db.session.execute(text("SELECT 1"))
        return (time.perf_counter() - started) / STATEMENTS


async def listener_cost(db: Database) -> float:
    """Seconds of insight's own listeners per statement, on real arguments, in a scope."""
    watch = db._insight
    assert watch is not None
    captured: list[tuple[Any, ...]] = []

    def capture(*args: Any) -> None:
        captured.append(args)

    sync_engine = db.engine.sync_engine
    event.listen(sync_engine, "after_cursor_execute", capture)
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        event.remove(sync_engine, "after_cursor_execute", capture)
        args = captured[0]
        before, after = watch.before_statement, watch.after_statement
        started = time.perf_counter()
        for _ in range(CALLS):
            before(*args)
            after(*args)
        return (time.perf_counter() - started) / CALLS


async def main(rounds: int) -> None:
    off = Database("sqlite+aiosqlite://")
    on = Database("sqlite+aiosqlite://", insight=True)
    try:
        own = min([await listener_cost(on) for _ in range(5)])
        pairs = [(await per_statement(off), await per_statement(on)) for _ in range(rounds)]
    finally:
        await off.dispose()
        await on.dispose()
    print(f"insight's listeners: {own * 1e6:.2f} us/statement (best of 5 x {CALLS} calls)")
    print(f"statement, insight off: {statistics.median(p[0] for p in pairs) * 1e6:.1f} us")
    print(f"statement, insight on:  {statistics.median(p[1] for p in pairs) * 1e6:.1f} us")
    difference = statistics.median(p[1] - p[0] for p in pairs) * 1e6
    print(f"paired difference:      {difference:+.1f} us/statement (median of {rounds})")


if __name__ == "__main__":
    logging.getLogger("alchemy_scope.insight").disabled = True  # repeats: the N+1 warning
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 31))
