"""Memory of a served app: RSS over many in-process requests, and tracemalloc on a read.

`python -m benchmarks.memory OUT.json FRAMEWORK VARIANT SQLITE_URL REQUESTS`. The requests
cycle through eight `GET /ping`, one read and one insert, at concurrency 1; RSS is sampled at
every tenth of the run. Then the read alone: the peak bytes allocated during one request, and
the bytes left allocated per request over many more.
"""

import json
import sys
from typing import Any

import uvloop

from benchmarks.variants import ROUTES, build, engine
from tooling.asgi import Request, lifespan
from tooling.memory import soak, traced

CYCLE = ["ping"] * 8 + ["read", "insert"]


async def measure(framework: str, variant: str, url: str, requests: int) -> dict[str, Any]:
    bound = engine("sqlite", url)
    app = build(framework, variant, bound)
    calls = [Request(ROUTES[name].method, ROUTES[name].path, ROUTES[name].body) for name in CYCLE]
    async with lifespan(app) as state:

        async def send(index: int) -> int:
            return (await calls[index % len(calls)](app, state))[0]

        rss, _ = await soak(send, requests, max(1, requests // 10))
        reads = max(1000, requests // 50)
        peak, retained = await traced(lambda: calls[8](app, state), reads)
    await bound.dispose()
    return {
        "variant": f"{framework}/{variant}",
        "requests": requests,
        "rss": rss,
        "read_peak_bytes": peak,
        "read_retained_bytes_per_request": retained,
    }


if __name__ == "__main__":
    out, framework, variant, url, requests = sys.argv[1:]
    with open(out, "w") as file:
        json.dump(uvloop.run(measure(framework, variant, url, int(requests))), file)
