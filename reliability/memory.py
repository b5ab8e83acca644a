"""Many requests through one app, in-process: the registry stays empty and RSS flat.

``python -m reliability.memory <framework> <requests> <warm-up>`` imports the example like
:mod:`reliability.serve` does, runs its lifespan, then calls the ASGI app directly (no TCP,
to be fast), 20 at a time: 40% touch the database (reads, creates, duplicates, 404s), 60%
do not (422s, health checks). RSS is sampled every 2,500 requests; the growth reported is
from the end of the warm-up to the end. The result is one JSON line on stdout.
"""

import asyncio
import json
import random
import sys
from typing import Any

from tooling.asgi import Request, lifespan
from tooling.memory import soak

from .serve import load_example, registry_size

CONCURRENCY = 20
SAMPLE_EVERY = 2_500
SEEDED = 20


def todo(title: str) -> bytes:
    """The body of a create."""
    return json.dumps({"title": title}).encode()


def requests(index: int, rng: random.Random) -> Request:
    """The ``index``-th request: 40% use the database, 60% do not."""
    roll = rng.random()
    if roll < 0.25:
        return Request("GET", f"/todos/{rng.randint(1, SEEDED)}")
    for below, request in [
        (0.30, Request("GET", "/todos?limit=10")),
        (0.33, Request("POST", "/todos", todo(f"memory {index}"))),
        (0.35, Request("POST", "/todos", todo("seed 1"))),  # 409
        (0.40, Request("GET", "/todos/999999999")),  # 404
        (0.60, Request("POST", "/todos", b'{"title": ""}')),  # 422
    ]:
        if roll < below:
            return request
    return Request("GET", "/health")


async def main(framework: str, total: int, warmup: int) -> dict[str, Any]:
    """Run the soak; return the measurements."""
    module = load_example(framework)
    app, db, rng = module.app, module.db, random.Random(5)
    async with lifespan(app) as state:
        for index in range(SEEDED):
            await Request("POST", "/todos", todo(f"seed {index}"))(app, state)

        async def send(index: int) -> int:
            return (await requests(index, rng)(app, state))[0]

        found, statuses = await soak(send, total, SAMPLE_EVERY, CONCURRENCY)
        registry, checkedout = registry_size(db), db.engine.pool.checkedout()
    samples = [(index, rss / 2**20) for index, rss in found[1:]]
    after_warmup = [rss for index, rss in samples if index >= warmup]
    return {
        "requests": samples[-1][0],
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
    framework, total, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(main(framework, total, warmup))), flush=True)
