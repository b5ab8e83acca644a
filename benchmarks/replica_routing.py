"""What routing to read replicas costs per statement, and how fast it recovers from a stop.

On a private primary and streaming standby (``tests/replicas.py``'s harness):

- the routing decision alone: ``get_bind()`` of a session with replicas, for a ``select()``
  once its scope has chosen its replica, against SQLAlchemy's own ``Session.get_bind()``;
- whole statements: ``SELECT 1`` in one scope, on the standby through the routing session
  and on the same standby through a plain ``Database`` (the median of paired
  rounds, each first in every other one);
- recovery, with the default one-second health check: from ``pg_ctl stop`` of the standby
  until a new scope reads from the primary without an error (no request in between), and
  from ``pg_ctl start`` until scopes read from the standby again.

Run from the repository root: ``python -m benchmarks.replica_routing [rounds]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from alchemy_scope import Database, Replicas
from benchmarks.insight_cost import STATEMENTS, per_statement
from tests.replicas import ReplicaCluster

CALLS = 200_000
WHERE = text("SELECT pg_is_in_recovery()")


def _get_bind_seconds(session: Session, calls: int) -> float:
    statement = select(1)
    get_bind = session.get_bind
    started = time.perf_counter()
    for _ in range(calls):
        get_bind(clause=statement)
    return (time.perf_counter() - started) / calls


async def decision(routed: Database, plain: Database) -> tuple[float, float]:
    """Seconds per get_bind() for a select: routed (replica chosen) and SQLAlchemy's own."""
    async with routed.scope(), plain.scope():
        await routed.session.execute(text("SELECT 1"))  # the scope's replica is chosen
        await plain.session.execute(text("SELECT 1"))
        return (
            _get_bind_seconds(routed.session.sync_session, CALLS),
            _get_bind_seconds(plain.session.sync_session, CALLS),
        )


async def on_replica(db: Database) -> bool:
    """Whether a new scope of ``db`` reads from the standby; ``False`` if it erred."""
    try:
        async with db.scope():
            return bool(await db.session.scalar(WHERE))
    except Exception:
        return False


async def recovery(cluster: ReplicaCluster) -> tuple[float, float]:
    """Seconds from a stop to reads on the primary, and from a restart to reads on the standby."""
    db = Database(cluster.primary_url, replicas=Replicas([cluster.standby_url]))
    try:
        assert db.replicas is not None
        await db.replicas.check()
        assert await on_replica(db)
        cluster.stop_standby()
        stopped = time.monotonic()
        (replica,) = db.replicas.replicas
        # Polling what a server does: no event to wait for. No request meanwhile: the
        # background check must find the standby down by itself.
        while replica.usable:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        down = time.monotonic() - stopped
        assert not await on_replica(db)
        cluster.start_standby()
        started = time.monotonic()
        while not await on_replica(db):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return down, time.monotonic() - started
    finally:
        await db.dispose()


async def measure(cluster: ReplicaCluster, rounds: int) -> None:
    """Print the three figures."""
    routed = Database(cluster.primary_url, replicas=Replicas([cluster.standby_url]))
    plain = Database(cluster.standby_url)
    assert routed.replicas is not None
    await routed.replicas.check()
    routed_bind, plain_bind = await decision(routed, plain)
    print(
        f"get_bind() per select: routed {routed_bind * 1e9:.0f} ns, "
        f"SQLAlchemy's Session {plain_bind * 1e9:.0f} ns "
        f"(+{(routed_bind - plain_bind) * 1e9:.0f} ns)"
    )
    differences = []
    for round_ in range(rounds):  # each Database first in every other round: no order effect
        if round_ % 2:
            with_routing = await per_statement(routed)
            without = await per_statement(plain)
        else:
            without = await per_statement(plain)
            with_routing = await per_statement(routed)
        differences.append(with_routing - without)
    print(
        f"SELECT 1 on the standby: {statistics.median(differences) * 1e6:+.1f} us per "
        f"statement with routing (median of {rounds} paired rounds of {STATEMENTS}; "
        f"one statement takes about {without * 1e6:.0f} us)"
    )
    await routed.dispose()
    await plain.dispose()
    down, back = await recovery(cluster)
    print(
        f"standby stopped: skipped after {down:.2f} s (check every 1 s); "
        f"restarted: read from again after {back:.2f} s"
    )


def main(rounds: int) -> None:
    """Start the primary and standby, measure, remove them."""
    cluster = ReplicaCluster()
    cluster.create()
    try:
        asyncio.run(measure(cluster, rounds))
    finally:
        cluster.remove()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
