"""The in-process driver: every variant of one framework, called directly, cell by cell.

`python -m benchmarks.inprocess OUT.json FRAMEWORK SETTINGS_JSON` (run by `nox -s bench`, a
process per framework, on uvloop). Each database configuration has one engine, shared by the
variants; every app's lifespan runs first. A cell's requests per sample are set from the
baseline's warm-up (``sample_seconds`` long, at least ``min_requests``) and are the same for
every variant; then :func:`benchmarks.variants.interleaved` takes the rounds.
"""

import asyncio
import gc
import json
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import uvloop

from benchmarks.variants import ROUTES, VARIANTS, Cell, build, engine, interleaved, records
from tooling.asgi import Request, lifespan


async def send_many(app: Any, state: Any, cell: Cell, requests: int) -> float:
    """Send ``requests`` requests, ``cell.concurrency`` at a time; return requests per second."""
    route = ROUTES[cell.route]
    request, each = (
        Request(route.method, route.path, route.body),
        max(1, requests // cell.concurrency),
    )

    async def worker() -> None:
        for _ in range(each):
            status, body = await request(app, state)
            if status != route.status:
                raise RuntimeError(f"{route.method} {route.path}: {status} {body[:300]!r}")

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cell.concurrency)))
    return each * cell.concurrency / (time.perf_counter() - started)


async def measure(framework: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per variant and cell: the requests per second of every round."""
    cells = [Cell(**cell) for cell in settings["cells"]]
    used = {cell.database for cell in cells}
    engines = {
        name: engine(name, url) for name, url in settings["databases"].items() if name in used
    }
    found = []
    async with AsyncExitStack() as stack:
        apps = {}
        for (name, bound), variant in ((e, v) for e in engines.items() for v in VARIANTS):
            app = build(framework, variant, bound)
            apps[variant, name] = app, await stack.enter_async_context(lifespan(app))
        for cell in cells:
            for variant in VARIANTS:  # warm up (and fail loudly on a broken variant)
                rps = await send_many(*apps[variant, cell.database], cell, settings["min_requests"])
                if variant == "baseline":
                    requests = max(
                        settings["min_requests"], round(settings["sample_seconds"] * rps)
                    )

            async def sample(variant: str, cell: Cell = cell, requests: int = requests) -> float:
                return await send_many(*apps[variant, cell.database], cell, requests)

            samples = await interleaved(sample, settings["rounds"])
            found += records("asgi", framework, cell, samples, requests_per_sample=requests)
    for bound in engines.values():
        await bound.dispose()
    return found


if __name__ == "__main__":
    out, framework, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with open(out, "w") as file:
        json.dump(uvloop.run(measure(framework, settings)), file)
