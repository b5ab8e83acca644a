"""What alchemy-scope adds to a database route, per request, for trying changes of the core.

`PYTHONPATH=/tmp/patched:. python -m benchmarks.profiling.core_patch_ab FRAMEWORK DATABASE
ROUTE [ROUNDS] [REQUESTS] [CONCURRENCY]`: the framework's bare variant and its alchemy-scope
variant through the in-process driver, alternating (concurrency 1 unless given); prints the
median over the rounds of the CPU and wall microseconds per request of the bare app, and
what alchemy-scope adds to each. It creates the bench table and drops it at the end: do
not run it during a bench run. Run it once with the checkout's core and once with the
patched copy first on PYTHONPATH; the difference between the two "added" figures is what
the patch saves.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

import uvloop
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.asgi import ASGIClient, LifespanRunner
from benchmarks.models import create_table, drop_table, pool_options
from benchmarks.profiling.session_lifecycle import URLS
from benchmarks.routes import ROUTES
from benchmarks.variants import variant


async def measure(
    framework: str, url: str, route_name: str, *, rounds: int, requests: int, concurrency: int
) -> None:
    """Print the bare app's cost per request and what alchemy-scope adds to it."""
    engine = create_async_engine(url, **pool_options(url))
    await create_table(engine)
    route = next(route for route in ROUTES if route.name == route_name)
    keys = [f"{framework}/bare", f"{framework}/alchemy_scope"]
    clients, lifespans = {}, []
    for key in keys:
        app = variant(key).build(engine)
        lifespan = LifespanRunner(app)
        await lifespan.start()
        lifespans.append(lifespan)
        clients[key] = ASGIClient(app, route, lifespan.state)
        await clients[key].run(300, 1)
    cpu: dict[str, list[float]] = {key: [] for key in keys}
    wall: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(rounds):
        for key in keys if index % 2 else keys[::-1]:
            gc.collect()
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            await clients[key].run(requests, concurrency)
            cpu[key].append((time.process_time() - cpu_started) / requests * 1e6)
            wall[key].append((time.perf_counter() - wall_started) / requests * 1e6)
    for name, samples in (("CPU", cpu), ("wall", wall)):
        bare, ours = samples[keys[0]], samples[keys[1]]
        added = statistics.median(a - b for a, b in zip(ours, bare, strict=True))
        print(
            f"{name:4}: bare {statistics.median(bare):7.1f} µs, alchemy-scope adds {added:+6.2f} µs"
        )
    await drop_table(engine)
    for lifespan in lifespans:
        await lifespan.stop()


def main() -> None:
    """Measure the framework, database and route named on the command line."""
    framework, database, route, *counts = sys.argv[1:]
    defaults = ["40", "100", "1"]
    rounds, requests, concurrency = (int(n) for n in [*counts, *defaults[len(counts) :]])
    uvloop.run(
        measure(
            framework,
            URLS[database],
            route,
            rounds=rounds,
            requests=requests,
            concurrency=concurrency,
        )
    )


if __name__ == "__main__":
    main()
