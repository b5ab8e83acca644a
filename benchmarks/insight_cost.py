"""What insight costs per statement, on in-memory SQLite (aiosqlite).

Two figures:

- its listeners' own work per statement: the two cursor-execute listeners called, in a
  scope, with the arguments SQLAlchemy gave them for a real ``SELECT 1``;
- whole statements, insight off and on, in interleaved rounds: the median of the paired
  differences in CPU time (this process's threads, aiosqlite's included; still noisy on a
  busy machine), beside two controls: an engine with two listeners that do nothing (what
  SQLAlchemy's event path costs any instrumentation), and off against off (the noise).

With insight off no listener is registered (``tests/core/test_insight.py`` asserts it), so
its cost there is zero by construction. Run: ``python benchmarks/insight_cost.py [rounds]``;
``nox -s bench`` runs it as its ``insight`` phase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from alchemy_scope import Database

STATEMENTS = 500
CALLS = 100_000


async def per_statement(db: Database) -> float:
    """CPU seconds per ``SELECT 1`` in one scope of ``db`` (the connection already open)."""
    async with db.scope():
        await db.session.execute(text("SELECT 1"))
        started = time.process_time()  # CPU time: other processes' load counts less
        for _ in range(STATEMENTS):
            await db.session.execute(text("SELECT 1"))
        return (time.process_time() - started) / STATEMENTS


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


def _nothing(*_: Any) -> None:
    """A cursor-execute listener that does nothing."""


async def paired(first: Database, second: Database, rounds: int) -> list[tuple[float, float]]:
    """(first, second) per-statement times, each going first in every other round."""
    pairs = []
    for round_ in range(rounds):
        if round_ % 2:
            later = await per_statement(second)
            pairs.append((await per_statement(first), later))
        else:
            pairs.append((await per_statement(first), await per_statement(second)))
    return pairs


async def measure(rounds: int) -> dict[str, float]:
    """The figures, in microseconds per statement (CPU time)."""
    off = Database("sqlite+aiosqlite://")
    on = Database("sqlite+aiosqlite://", insight=True)
    also_off = Database("sqlite+aiosqlite://")  # the noise floor: off against off
    empty = Database("sqlite+aiosqlite://")  # what SQLAlchemy's event path costs by itself
    for name in ("before_cursor_execute", "after_cursor_execute"):
        event.listen(empty.engine.sync_engine, name, _nothing)
    try:
        own = min([await listener_cost(on) for _ in range(5)])
        pairs = await paired(off, on, rounds)
        control = await paired(off, also_off, rounds)
        listening = await paired(off, empty, rounds)
    finally:
        for db in (off, on, also_off, empty):
            await db.dispose()

    def difference(measured: list[tuple[float, float]]) -> float:
        return statistics.median(b - a for a, b in measured) * 1e6

    return {
        "rounds": rounds,
        "listeners_own_us": own * 1e6,
        "statement_off_us": statistics.median(p[0] for p in pairs) * 1e6,
        "statement_on_us": statistics.median(p[1] for p in pairs) * 1e6,
        "on_minus_off_us": difference(pairs),
        "empty_listeners_minus_off_us": difference(listening),
        "off_minus_off_us": difference(control),
    }


def main(rounds: int) -> None:
    """Print the figures."""
    figures = asyncio.run(measure(rounds))
    print(f"insight's listeners: {figures['listeners_own_us']:.2f} us/statement")
    print(f"statement, insight off: {figures['statement_off_us']:.1f} us CPU")
    print(f"statement, insight on:  {figures['statement_on_us']:.1f} us CPU")
    for name, key in (
        ("on - off", "on_minus_off_us"),
        ("two empty listeners - off", "empty_listeners_minus_off_us"),
        ("off - off (noise)", "off_minus_off_us"),
    ):
        print(f"{name}: {figures[key]:+.1f} us/statement (median of {rounds} paired rounds)")


if __name__ == "__main__":
    logging.getLogger("alchemy_scope.insight").disabled = True  # repeats: the N+1 warning
    if len(sys.argv) > 2 and sys.argv[1].endswith(".json"):  # a phase of `nox -s bench`
        Path(sys.argv[1]).write_text(json.dumps(asyncio.run(measure(int(sys.argv[2])))))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 31)
