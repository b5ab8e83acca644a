"""Serve one variant on 127.0.0.1 for the real-server driver: uvicorn, or hypercorn for Quart.

`python -m benchmarks.serve VARIANT DATABASE_URL PORT`. Both servers run on uvloop (uvicorn
with httptools), without access logs. SIGUSR1 disposes the engine's pool (and prints
`disposed`), so that servers waiting for their turn hold no PostgreSQL connections; SIGTERM
stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvicorn
import uvloop
from hypercorn.asyncio import serve
from hypercorn.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from benchmarks.models import pool_options
from benchmarks.variants import SERVERS, variant


def dispose_on_sigusr1(engine: AsyncEngine) -> None:
    """Close the engine's pooled connections on SIGUSR1, then say so on stdout."""
    loop = asyncio.get_running_loop()
    disposals: set[asyncio.Task[None]] = set()

    async def dispose_and_report() -> None:
        # Requests the load generator gave up on may still hold connections: dispose() only
        # closes checked-in ones, and a disposed pool keeps those returned later open until
        # it is garbage-collected, so wait for them first (up to 30 s).
        for _ in range(3000):
            if engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        await engine.dispose()
        print("disposed", flush=True)

    def dispose() -> None:
        task = loop.create_task(dispose_and_report())
        disposals.add(task)
        task.add_done_callback(disposals.discard)

    loop.add_signal_handler(signal.SIGUSR1, dispose)


async def serve_with_uvicorn(app: object, engine: AsyncEngine, port: int) -> None:
    """Serve ``app`` with uvicorn until SIGTERM."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="none",  # this process already runs on uvloop
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    dispose_on_sigusr1(engine)
    await uvicorn.Server(config).serve()


async def serve_with_hypercorn(app: object, engine: AsyncEngine, port: int) -> None:
    """Serve ``app`` with hypercorn until SIGTERM."""
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.loglevel = "WARNING"
    config.accesslog = None
    config.graceful_timeout = 1
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    dispose_on_sigusr1(engine)
    await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main() -> None:
    """Serve the variant named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", help="framework/name, as in benchmarks.variants")
    parser.add_argument("database_url")
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    served = variant(args.variant)

    async def run() -> None:
        engine = create_async_engine(args.database_url, **pool_options(args.database_url))
        app = served.build(engine)
        if SERVERS[served.framework] == "hypercorn":
            await serve_with_hypercorn(app, engine, args.port)
        else:
            await serve_with_uvicorn(app, engine, args.port)

    uvloop.run(run())


if __name__ == "__main__":
    main()
