"""Memory of a served app: RSS over 100,000 in-process requests, and tracemalloc on a read.

`python -m benchmarks.memory VARIANT DATABASE_URL OUT.json --requests N`. The requests cycle
through eight `GET /ping`, one primary-key read and one insert, at concurrency 1, through the
in-process driver. RSS is sampled every tenth of the run. Then, under tracemalloc, the read
route alone: the peak of memory allocated during one request, and what stays allocated per
request after many.
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from typing import Any

import psutil
import uvloop
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.asgi import ASGIClient, LifespanRunner
from benchmarks.models import pool_options
from benchmarks.routes import INSERT, PING, READ
from benchmarks.variants import variant

CYCLE = [PING] * 8 + [READ, INSERT]


async def measure(variant_key: str, url: str, requests: int) -> dict[str, Any]:
    """RSS samples and tracemalloc figures of one variant's app."""
    engine = create_async_engine(url, **pool_options(url))
    app = variant(variant_key).build(engine)
    lifespan = LifespanRunner(app)
    await lifespan.start()
    clients = [ASGIClient(app, route, lifespan.state) for route in CYCLE]
    process = psutil.Process()
    every = max(len(CYCLE), requests // 10 // len(CYCLE) * len(CYCLE))
    rss = [(0, process.memory_info().rss)]
    for sent in range(len(CYCLE), requests + 1, len(CYCLE)):
        for client in clients:
            await client.request()
        if sent % every == 0:
            rss.append((sent, process.memory_info().rss))

    reader = ASGIClient(app, READ, lifespan.state)
    tracemalloc.start()
    for _ in range(500):
        await reader.request()
    gc.collect()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    await reader.request()
    peak = tracemalloc.get_traced_memory()[1] - before
    reads = max(1000, requests // 50)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(reads):
        await reader.request()
    gc.collect()
    retained = (tracemalloc.get_traced_memory()[0] - before) / reads
    tracemalloc.stop()
    await lifespan.stop()
    await engine.dispose()
    return {
        "variant": variant_key,
        "requests": requests,
        "rss": rss,
        "read_peak_bytes": peak,
        "read_retained_bytes_per_request": retained,
        "reads_traced": reads,
    }


def main() -> None:
    """Measure one variant and write the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("database_url")
    parser.add_argument("out")
    parser.add_argument("--requests", type=int, required=True)
    args = parser.parse_args()
    result = uvloop.run(measure(args.variant, args.database_url, args.requests))
    with open(args.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
