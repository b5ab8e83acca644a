"""Many requests through one app, in-process: the registry stays empty and RSS flat.

``python -m reliability.memory <framework> <requests> <warm-up>`` imports the example like
:mod:`reliability.serve` does, runs its lifespan, then calls the ASGI app directly (no TCP,
to be fast), 20 at a time: 40% touch the database (reads, creates, duplicates, 404s), 60%
do not (422s, health checks). RSS is sampled every 2,500 requests; the growth reported is
from the end of the warm-up to the end. The result is one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter
from typing import Any

from tooling.asgi import Request, lifespan
from tooling.memory import rss_bytes

from .serve import load_example, registry_size

CONCURRENCY = 20
SAMPLE_EVERY = 2_500


async def call(app: Any, state: dict[str, Any], method: str, path: str, body: bytes = b"") -> int:
    """One HTTP request straight into the ASGI app; return the status."""
    return (await Request(method, path, body)(app, state))[0]


def rss_mb() -> float:
    """This process's resident set size, in MB."""
    return rss_bytes() / 2**20


async def main(framework: str, requests: int, warmup: int) -> dict[str, Any]:
    """Run the soak; return the measurements."""
    module = load_example(framework)
    app, db = module.app, module.db
    rng = random.Random(5)
    statuses: Counter[int] = Counter()
    samples: list[tuple[int, float]] = []
    ids: list[int] = []
    sent = 0

    async with lifespan(app) as state:
        for index in range(20):
            await call(
                app, state, "POST", "/todos", json.dumps({"title": f"seed {index}"}).encode()
            )
        ids.extend(range(1, 21))

        async def one(index: int) -> None:
            roll = rng.random()  # 40% use the database, 60% do not
            if roll < 0.25:
                status = await call(app, state, "GET", f"/todos/{rng.choice(ids)}")
            elif roll < 0.30:
                status = await call(app, state, "GET", "/todos?limit=10")
            elif roll < 0.33:
                body = json.dumps({"title": f"memory {index}"}).encode()
                status = await call(app, state, "POST", "/todos", body)
            elif roll < 0.35:
                body = json.dumps({"title": "seed 1"}).encode()
                status = await call(app, state, "POST", "/todos", body)  # 409
            elif roll < 0.40:
                status = await call(app, state, "GET", "/todos/999999999")  # 404
            elif roll < 0.60:
                status = await call(app, state, "POST", "/todos", b'{"title": ""}')  # 422
            else:
                status = await call(app, state, "GET", "/health")
            statuses[status] += 1

        async def worker() -> None:
            nonlocal sent
            while sent < requests:
                sent += 1
                index = sent
                await one(index)
                if index % SAMPLE_EVERY == 0:
                    samples.append((index, rss_mb()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        samples.append((sent, rss_mb()))
        registry = registry_size(db)
        checkedout = db.engine.pool.checkedout()
    after_warmup = [rss for index, rss in samples if index >= warmup]
    return {
        "requests": sent,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "registry": registry,
        "checkedout": checkedout,
        "rss_after_warmup": after_warmup[0] if after_warmup else None,
        "rss_end": samples[-1][1],
        "growth_mb": (samples[-1][1] - after_warmup[0]) if after_warmup else None,
        "samples": samples,
        "repr": repr(db),
    }


if __name__ == "__main__":
    framework, requests, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(main(framework, requests, warmup))), flush=True)
