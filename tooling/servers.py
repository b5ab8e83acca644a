"""Real servers on free loopback ports: uvicorn or hypercorn, in this event loop or a child.

- :func:`uvicorn_server` and :func:`hypercorn_server` serve an app in the running event loop
  and yield its base URL (the tests, and the child processes below, use them).
- :func:`serve_until_signalled` is the body of such a child: it prints ``LISTENING <port>``
  once the server accepts connections and serves until SIGTERM or SIGINT.
- :class:`ServerProcess` starts ``python -m MODULE ARGS`` as that child and stops it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


def loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1 (the server listens on it)."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it small responses wait ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _until_started(task: asyncio.Task[Any], started: Callable[[], bool], name: str) -> None:
    while not started():
        if task.done():
            task.result()
            raise RuntimeError(f"{name} stopped before it started")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def uvicorn_server(app: Any, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn (lifespan on) on a free port; yield its base URL.

    ``options`` are ``uvicorn.Config``'s (defaults: warnings only, wsproto websockets).
    """
    import uvicorn  # noqa: PLC0415 - each caller needs only the server it uses

    sock = loopback_socket()
    config = uvicorn.Config(
        app, **{"lifespan": "on", "log_level": "warning", "ws": "wsproto", **options}
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _until_started(task, lambda: server.started, "uvicorn")
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def hypercorn_server(app: Any, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn (lifespan on) on a free port; yield its base URL.

    ``options`` are attributes of ``hypercorn.config.Config`` (``graceful_timeout``...).
    """
    from hypercorn.asyncio import serve  # noqa: PLC0415
    from hypercorn.config import Config  # noqa: PLC0415

    sock = loopback_socket()
    host, port = sock.getsockname()
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes the socket
    config.loglevel = "WARNING"
    config.graceful_timeout = 1
    for name, value in options.items():
        setattr(config, name, value)
    started, stop = asyncio.Event(), asyncio.Event()

    async def shutdown_trigger() -> None:
        started.set()
        await stop.wait()

    task = asyncio.create_task(serve(app, config, shutdown_trigger=shutdown_trigger))
    try:
        await _until_started(task, started.is_set, "hypercorn")
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        await task


SERVERS: dict[str, Callable[..., AbstractAsyncContextManager[str]]] = {
    "uvicorn": uvicorn_server,
    "hypercorn": hypercorn_server,
}


async def serve_until_signalled(app: Any, server: str, **options: Any) -> None:
    """Serve ``app`` with ``server``; print ``LISTENING <port>``; stop on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    async with SERVERS[server](app, **options) as url:
        print(f"LISTENING {url.rsplit(':', 1)[1]}", flush=True)
        await stop.wait()


class ServerProcess:
    """``python -m MODULE ARGS`` from the repository root, serving until :meth:`stop`.

    The child must print ``LISTENING <port>`` (as :func:`serve_until_signalled` does) on
    stdout; its stderr goes to ``log`` (inherited when None).
    """

    def __init__(
        self, module: str, *args: str, env: dict[str, str] | None = None, log: IO[str] | None = None
    ) -> None:
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={**(env or os.environ), "PYTHONPATH": path},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.module, self.port = module, 0

    def wait_until_listening(self) -> str:
        """Wait until the child listens (or exits: then raise); return its base URL."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # EOF if the child dies
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"{self.module} did not start (exit {self.process.returncode})")
        self.port = int(line.split()[1])
        return self.base_url

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the app's shutdown runs), SIGKILL after ``timeout`` s; the exit code."""
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
