"""Real servers for end-to-end tests: uvicorn (and hypercorn) on 127.0.0.1, in this event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def uvicorn_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) on a free port; yield its base URL."""
    import uvicorn

    sock = _bound_socket()
    config = uvicorn.Config(app, lifespan="on", log_level="warning", ws="wsproto")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def hypercorn_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn (lifespan on) on a free port; yield its base URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = _bound_socket()
    host, port = sock.getsockname()
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes the socket
    config.loglevel = "WARNING"
    config.graceful_timeout = 1
    started = asyncio.Event()
    stop = asyncio.Event()

    async def shutdown_trigger() -> None:
        started.set()
        await stop.wait()

    task = asyncio.create_task(serve(app, config, shutdown_trigger=shutdown_trigger))
    try:
        while not started.is_set():
            if task.done():
                task.result()
                raise RuntimeError("hypercorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        await task
