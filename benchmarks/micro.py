"""Our own cost, alone: `ScopeMiddleware` around an ASGI app that answers at once.

`python -m benchmarks.micro OUT.json --rounds N --calls N`. No framework, no database, no
socket: each call of the app sends a response start and a body to a ``send`` that does
nothing. The difference to the bare app is what the middleware adds to every request. A
pass-through middleware (one more ``await`` layer, nothing else) shows the share of that
any middleware costs. Then tracemalloc counts the memory the middleware holds during a
request and what stays behind after many.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc
from collections.abc import MutableMapping
from typing import Any

import uvloop

from alchemy_scope import ScopeMiddleware
from alchemy_scope._core import policies

Message = MutableMapping[str, Any]
START: Message = {"type": "http.response.start", "status": 200, "headers": []}
BODY: Message = {"type": "http.response.body", "body": b"pong", "more_body": False}
REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}
SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/ping", "headers": []}


async def receive() -> Message:
    """The request: an empty body."""
    return REQUEST


async def send(_message: Message) -> None:
    """Drop the response."""


async def bare(_scope: Any, _receive: Any, send: Any) -> None:
    """An ASGI app that answers at once."""
    await send(START)
    await send(BODY)


class PassThrough:
    """The smallest pure-ASGI middleware: it awaits the app and does nothing else."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


# name -> (app, whether an autocommit Database exists in the process)
APPS: dict[str, tuple[Any, bool]] = {
    "bare ASGI app": (bare, False),
    "pass-through middleware": (PassThrough(bare), False),
    "ScopeMiddleware": (ScopeMiddleware(bare), False),
    "ScopeMiddleware(serialize=True)": (ScopeMiddleware(bare, serialize=True), False),
    "ScopeMiddleware, autocommit database": (ScopeMiddleware(bare), True),
}


async def call_many(app: Any, calls: int) -> float:
    """Call ``app`` ``calls`` times; return the nanoseconds per call."""
    started = time.perf_counter_ns()
    for _ in range(calls):
        await app(SCOPE, receive, send)
    return (time.perf_counter_ns() - started) / calls


async def interleaved(
    apps: dict[str, tuple[Any, bool]], rounds: int, calls: int, seed: int = 0
) -> dict[str, list[float]]:
    """Nanoseconds per request of every app, one sample per round, in shuffled order.

    Args:
        apps: name -> (app, whether an autocommit ``Database`` exists while it runs).
        rounds: How many samples of each app.
        calls: Calls per sample.
        seed: Seeds the order of the apps in each round.
    """
    shuffler = random.Random(seed)
    names = list(apps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm up
        policies.autocommit = apps[name][1]
        await call_many(apps[name][0], calls // 10)
    for _ in range(rounds):
        shuffler.shuffle(names)
        for name in names:
            app, autocommit = apps[name]
            policies.autocommit = autocommit  # what Database(..., commit="autocommit") sets
            gc.collect()
            samples[name].append(await call_many(app, calls))
    policies.autocommit = False
    return samples


async def held_during_request(app: Any) -> tuple[int, int]:
    """Blocks and bytes allocated on the way into ``app``'s innermost app, alive while it runs.

    Compared with the bare app, this is what a layer keeps for the duration of a request.
    """
    seen: list[tracemalloc.Snapshot] = []

    async def innermost(scope: Any, receive: Any, send: Any) -> None:
        seen.append(tracemalloc.take_snapshot())
        await bare(scope, receive, send)

    if app is bare:
        wrapped: Any = innermost
    elif isinstance(app, ScopeMiddleware):
        wrapped = ScopeMiddleware(innermost, serialize=app.serialize)
    else:
        wrapped = PassThrough(innermost)
    seen.append(tracemalloc.take_snapshot())  # the list has room for the next one
    seen.clear()
    before = tracemalloc.take_snapshot()
    await wrapped(SCOPE, receive, send)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    differences = seen[0].filter_traces(ignore).compare_to(before.filter_traces(ignore), "lineno")
    return (
        sum(max(0, d.count_diff) for d in differences),
        sum(max(0, d.size_diff) for d in differences),
    )


async def retained_after(app: Any, calls: int) -> float:
    """Bytes still allocated after ``calls`` more requests, per request (after a warm-up)."""
    await call_many(app, 1000)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    await call_many(app, calls)
    gc.collect()
    return (tracemalloc.get_traced_memory()[0] - before) / calls


async def memory(calls: int) -> dict[str, dict[str, float]]:
    """Held and retained memory of every app, under tracemalloc."""
    tracemalloc.start()
    results = {}
    for name, (app, autocommit) in APPS.items():
        policies.autocommit = autocommit
        blocks, size = await held_during_request(app)
        results[name] = {
            "blocks_held_during_request": blocks,
            "bytes_held_during_request": size,
            "bytes_retained_per_request": await retained_after(app, calls),
        }
    policies.autocommit = False
    tracemalloc.stop()
    return results


def main() -> None:
    """Run the micro-benchmark and write its results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    async def run() -> dict[str, Any]:
        return {
            "ns_per_request": await interleaved(APPS, args.rounds, args.calls, args.seed),
            "memory": await memory(min(args.calls, 20_000)),
            "calls_per_round": args.calls,
        }

    with open(args.out, "w") as out:
        json.dump(uvloop.run(run()), out)


if __name__ == "__main__":
    main()
