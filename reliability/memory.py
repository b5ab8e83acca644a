"""Many requests through one app, in-process: the registry stays empty and RSS flat.

``python -m reliability.memory <framework> <requests> <warm-up>`` imports the example like
:mod:`reliability.serve` does, runs its lifespan, then calls the ASGI app directly (no TCP,
to be fast), 20 at a time: 40% touch the database (reads, creates, duplicates, 404s), 60%
do not (422s, health checks). RSS is sampled every 2,500 requests; the growth reported is
from the end of the warm-up to the end. The result is one JSON line on stdout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
from collections import Counter
from typing import Any

import psutil

from .serve import load_example, registry_size

CONCURRENCY = 20
SAMPLE_EVERY = 2_500


class Lifespan:
    """Run an ASGI app's lifespan by hand: startup on enter, shutdown on exit."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.state: dict[str, Any] = {}

    async def __aenter__(self) -> dict[str, Any]:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await self.outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"startup failed: {message}")
        return self.state

    async def __aexit__(self, *_exc: object) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        await self.task


async def call(app: Any, state: dict[str, Any], method: str, path: str, body: bytes = b"") -> int:
    """One HTTP request straight into the ASGI app; return the status."""
    target, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": target,
        "raw_path": target.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [
            (b"host", b"memory"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": dict(state),
        "extensions": {},
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status = 0
    complete = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await complete.wait()  # like a server: the next message is the end of the exchange
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    await app(scope, receive, send)
    return status


def rss_mb() -> float:
    """This process's resident set size, in MB."""
    return float(psutil.Process().memory_info().rss) / 2**20


async def main(framework: str, requests: int, warmup: int) -> dict[str, Any]:
    """Run the soak; return the measurements."""
    module = load_example(framework)
    app, db = module.app, module.db
    rng = random.Random(5)
    statuses: Counter[int] = Counter()
    samples: list[tuple[int, float]] = []
    ids: list[int] = []
    sent = 0

    async with Lifespan(app) as state:
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
                    gc.collect()
                    samples.append((index, rss_mb()))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        gc.collect()
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
