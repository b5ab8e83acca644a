"""The real-server driver: each variant in a server process of its own, loaded over TCP.

`python -m benchmarks.server FRAMEWORK VARIANT DATABASE URL` serves one variant (uvicorn with
httptools, or hypercorn for Quart; uvloop; no access log) through
:func:`tooling.servers.serve_until_signalled`. :func:`measure` runs the four servers of one
framework and database configuration side by side and loads them cell by cell with `wrk`
(or, without it or for samples under a second, :func:`tooling.rawhttp.hammer`). On PostgreSQL
a server's pool is filled just before its turn and emptied just after it (``POST
/__dispose``), so that idle servers hold no connections (PostgreSQL allows 100).
"""

import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.variants import (
    POOLS,
    ROUTES,
    SERVERS,
    VARIANTS,
    Cell,
    Route,
    build,
    engine,
    interleaved,
    records,
)
from tooling.rawhttp import hammer, request_bytes
from tooling.servers import ServerProcess, serve_until_signalled

OPTIONS = {"uvicorn": {"http": "httptools", "ws": "none", "access_log": False}, "hypercorn": {}}


class Disposing:
    """The app, and ``POST /__dispose``: wait until no connection is checked out, dispose."""

    def __init__(self, app: Any, engine: AsyncEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/__dispose":
            return await self.app(scope, receive, send)
        # Requests the load generator gave up on may still hold connections; a disposed pool
        # would keep those open until it is garbage-collected.
        for _ in range(3000):
            if self.engine.pool.checkedout() == 0:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        await self.engine.dispose()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return None


async def wrk(route: Route, port: int, connections: int, seconds: float, scripts: Path) -> float:
    """Requests per second of `wrk -t1 -cN` on ``route`` for ``seconds`` (whole seconds)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    if route.body:
        script = scripts / "post.lua"
        body = route.body.decode()
        headers = 'wrk.headers["Content-Type"] = "application/json"'
        script.write_text(f"wrk.method = \"{route.method}\"\nwrk.body = '{body}'\n{headers}\n")
        command += ["-s", str(script)]
    process = await asyncio.create_subprocess_exec(
        *command, f"http://127.0.0.1:{port}{route.path}", stdout=subprocess.PIPE
    )
    output = (await process.communicate())[0].decode()
    found = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if process.returncode or "Non-2xx" in output or "Socket errors" in output or found is None:
        raise RuntimeError(f"{route.method} {route.path} on port {port} failed:\n{output}")
    return float(found[1])


DISPOSE = Route("dispose", "POST", "/__dispose", b"", 200)


class Group:
    """The servers of every variant of one framework on one database configuration."""

    def __init__(self, framework: str, database: str, url: str, settings: dict[str, Any]) -> None:
        self.pooled, self.seconds = database.startswith("postgresql"), settings["server_seconds"]
        self.pool, self.lean = POOLS[database], settings.get("lean_warmup", False)
        self.wrk = bool(shutil.which("wrk")) and self.seconds >= 1  # wrk takes whole seconds
        self.servers = {
            variant: ServerProcess("benchmarks.server", framework, variant, database, url)
            for variant in VARIANTS
        }
        try:
            for server in self.servers.values():
                server.wait_until_listening()
        except RuntimeError:
            self.stop()
            raise

    async def send(
        self, route: Route, port: int, connections: int, each: int = 0, seconds: float = 0
    ) -> float:
        """``each`` requests (or ``seconds``) on each of ``connections``; requests per second.

        The raw client of :mod:`tooling.rawhttp`: httpx would spend more CPU per request than
        the server it loads, on the same two cores.
        """
        raw = request_bytes(route.method, route.path, route.body)
        sent, errors, took = await hammer(
            raw, port, connections, route.status, requests=each, seconds=seconds
        )
        if errors:
            raise RuntimeError(f"{errors} of {sent} responses of {route.path} on {port} failed")
        return sent / took

    async def sample(self, variant: str, cell: Cell, scripts: Path) -> float:
        """One sample, tried again 10 s later when it fails (PostgreSQL is shared: it may be full).

        Warm first (code paths, and on PostgreSQL the pool filled); empty the pool after. A
        lean warm-up (the standard profile) sends two requests on each of the cell's
        connections, and empties the pool only when the four servers would otherwise hold more
        than 32 connections (PostgreSQL at concurrency 32 on the pool of 32).
        """
        route, port = ROUTES[cell.route], self.servers[variant].port
        connections = cell.concurrency if self.lean else 32
        dispose = self.pooled and (
            not self.lean or min(cell.concurrency, self.pool) * len(VARIANTS) > 32
        )
        for attempt in range(6):
            try:
                warm = 2 if self.lean else 1 if route.name == "ping" else 5
                await self.send(route, port, connections, warm)
                if self.wrk:
                    return await wrk(route, port, cell.concurrency, self.seconds, scripts)
                return await self.send(route, port, cell.concurrency, seconds=self.seconds)
            except (RuntimeError, OSError) as error:
                if attempt == 5:
                    raise
                print(f"{error!r}\nretrying in 10 s", file=sys.stderr, flush=True)
                await asyncio.sleep(10)
            finally:
                if dispose:
                    await self.send(DISPOSE, port, 1, 1)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def measure(frameworks: list[str], settings: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Every framework on every configuration; the records and the load generator's name."""
    found, generator = [], "wrk -t1"
    for framework, (database, url) in itertools.product(frameworks, settings["databases"].items()):
        cells = [Cell(**c) for c in settings["server_cells"] if c["database"] == database]
        if not cells:
            continue
        group = Group(framework, database, url, settings)
        try:
            with tempfile.TemporaryDirectory() as scripts:
                for cell in cells:

                    async def sample(variant: str, cell: Cell = cell) -> float:
                        return await group.sample(variant, cell, Path(scripts))  # noqa: B023

                    samples = asyncio.run(interleaved(sample, settings["server_rounds"]))
                    found += records("server", framework, cell, samples, seconds=group.seconds)
            generator = "wrk -t1" if group.wrk else "tooling.rawhttp.hammer"
        finally:
            group.stop()
    return found, generator


if __name__ == "__main__":
    framework, variant, database, url = sys.argv[1:]

    async def serve() -> None:
        bound = engine(database, url)
        app = Disposing(build(framework, variant, bound), bound)
        server = SERVERS[framework]
        await serve_until_signalled(app, server, **OPTIONS[server])

    assert database in POOLS
    uvloop.run(serve())
