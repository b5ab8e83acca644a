"""Our own cost alone: `ScopeMiddleware` around an ASGI app that answers at once.

`python -m benchmarks.micro OUT.json ROUNDS CALLS`. No framework, no database, no socket: each
call sends a response start and a body to a ``send`` that drops them. A pass-through
middleware (one more ``await`` layer, nothing else) tells what any middleware costs from what
opening a scope costs, and one with an autocommit database what watching the response
costs. Then, under tracemalloc, the bytes each allocates during one request
and those it leaves allocated per request.
"""

import json
import random
import sys
import time
from typing import Any

import uvloop

from alchemy_scope import Database, ScopeMiddleware
from tooling.memory import traced

START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"pong", "more_body": False}
SCOPE = {"type": "http", "method": "GET", "path": "/ping", "headers": []}


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(_message: Any) -> None:
    pass


async def bare(_scope: Any, _receive: Any, send: Any) -> None:
    await send(START)
    await send(BODY)


class PassThrough:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


APPS = {
    "bare ASGI app": bare,
    "pass-through middleware": PassThrough(bare),
    "ScopeMiddleware": ScopeMiddleware(bare),
    # What a response-watching (autocommit) database costs the middleware that has one.
    "ScopeMiddleware, autocommit database": ScopeMiddleware(
        bare, databases=[Database("sqlite+aiosqlite://", commit="autocommit")]
    ),
}


async def ns_per_call(app: Any, calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        await app(SCOPE, receive, send)
    return (time.perf_counter_ns() - started) / calls


async def measure(rounds: int, calls: int) -> dict[str, Any]:
    """Nanoseconds per call of every app, rounds in shuffled order; then memory."""
    names, shuffler = list(APPS), random.Random(2026)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        await ns_per_call(APPS[name], calls // 10)  # warm up
    for _ in range(rounds):
        shuffler.shuffle(names)
        for name in names:
            samples[name].append(await ns_per_call(APPS[name], calls))
    memory = {}
    for name, app in APPS.items():
        peak, retained = await traced(lambda app=app: app(SCOPE, receive, send), 20_000)
        memory[name] = {"peak_bytes": peak, "retained_bytes_per_request": retained}
    return {"calls_per_round": calls, "ns_per_request": samples, "memory": memory}


if __name__ == "__main__":
    out, rounds, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with open(out, "w") as file:
        json.dump(uvloop.run(measure(rounds, calls)), file)
