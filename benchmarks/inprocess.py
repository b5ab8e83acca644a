"""The in-process driver: every variant of one framework, called directly, round by round.

Run by `benchmarks.run` in a process of its own per framework:
`python -m benchmarks.inprocess FRAMEWORK OUT.json --databases '{"sqlite": URL, ...}' ...`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from benchmarks.asgi import ASGIClient, LifespanRunner
from benchmarks.models import pool_options
from benchmarks.routes import ROUTES, BenchRoute
from benchmarks.variants import Variant, variants_of


@dataclass
class Cell:
    """One route on one database at one concurrency: what the variants are compared on."""

    route: BenchRoute
    database: str
    concurrency: int
    requests: int = 0  # per batch, the same for every variant; set by calibrate()


async def time_batch(client: ASGIClient, requests: int, concurrency: int) -> tuple[int, float]:
    """Send one batch; return how many requests were sent and how long they took."""
    gc.collect()
    started = time.perf_counter()
    sent = await client.run(requests, concurrency)
    return sent, time.perf_counter() - started


async def warm_up(client: ASGIClient, concurrency: int, seconds: float) -> float:
    """Send growing batches for about ``seconds``; return the last batch's seconds per request."""
    await client.request()  # checks the status: a broken variant fails here, loudly
    requests, spent, per_request = concurrency * 4, 0.0, 0.0
    while spent < seconds:
        sent, elapsed = await time_batch(client, requests, concurrency)
        spent += elapsed
        per_request = elapsed / sent
        requests *= 2
    return per_request


async def measure(
    framework: str,
    *,
    databases: dict[str, str],
    concurrencies: list[int],
    rounds: int,
    batch_seconds: float,
    seed: int,
) -> list[dict[str, Any]]:
    """Measure every variant of ``framework`` on every cell; return one record per variant and cell.

    The apps of every variant are started together (their lifespans run), and share one
    engine per database with a fixed pool. Each round measures every cell once, the variants
    in a new random order; a cell's batch size is set once, from its baseline's warm-up.
    """
    variants = variants_of(framework)
    engines: dict[str, AsyncEngine] = {
        name: create_async_engine(url, **pool_options(url)) for name, url in databases.items()
    }
    apps: dict[tuple[str, str], Any] = {
        (variant.key, name): variant.build(engine)
        for variant in variants
        for name, engine in engines.items()
    }
    lifespans = {key: LifespanRunner(app) for key, app in apps.items()}
    for lifespan in lifespans.values():
        await lifespan.start()

    first_database = next(iter(databases))
    cells = [
        Cell(route, database, concurrency)
        for concurrency in concurrencies
        for route in ROUTES
        for database in (databases if route.uses_database else [first_database])
    ]

    def client(variant: Variant, cell: Cell) -> ASGIClient:
        key = (variant.key, cell.database)
        return ASGIClient(apps[key], cell.route, lifespans[key].state)

    for cell in cells:
        per_request = {
            variant.key: await warm_up(client(variant, cell), cell.concurrency, batch_seconds)
            for variant in variants
        }
        baseline_seconds = per_request[variants[0].key]
        cell.requests = max(cell.concurrency * 2, round(batch_seconds / baseline_seconds))

    shuffler = random.Random(seed)
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for index, cell in enumerate(cells):
            order = variants[:]
            shuffler.shuffle(order)
            for variant in order:
                sent, elapsed = await time_batch(
                    client(variant, cell), cell.requests, cell.concurrency
                )
                samples.setdefault((index, variant.key), []).append(sent / elapsed)

    for lifespan in lifespans.values():
        await lifespan.stop()
    for engine in engines.values():
        await engine.dispose()
    return [
        {
            "driver": "asgi",
            "concurrency": cell.concurrency,
            "framework": framework,
            "variant": variant.key,
            "route": cell.route.name,
            "database": cell.database,
            "requests_per_round": cell.requests,
            "rps": samples[(index, variant.key)],
        }
        for index, cell in enumerate(cells)
        for variant in variants
    ]


def main() -> None:
    """Measure one framework's variants and write the records as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("framework")
    parser.add_argument("out")
    parser.add_argument("--databases", required=True, help="JSON: name -> SQLAlchemy URL")
    parser.add_argument("--concurrency", type=int, action="append", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--batch-seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = uvloop.run(
        measure(
            args.framework,
            databases=json.loads(args.databases),
            concurrencies=args.concurrency,
            rounds=args.rounds,
            batch_seconds=args.batch_seconds,
            seed=args.seed,
        )
    )
    with open(args.out, "w") as out:
        json.dump(records, out)


if __name__ == "__main__":
    main()
