"""The real-server driver: each variant in a server process of its own, loaded over TCP.

`python -m benchmarks.server FRAMEWORK VARIANT DATABASE URL` serves one variant (uvicorn with
httptools, or hypercorn for Quart; uvloop; no access log) through
:func:`tooling.servers.serve_until_signalled`. :func:`measure` runs the four servers of one
framework and database configuration side by side and loads them cell by cell with `wrk`
(or, without it, :func:`hammer`). On PostgreSQL a server's pool is filled just before its
turn and emptied just after it (``POST /__dispose``), so that idle servers hold no
connections (PostgreSQL allows 100).
"""

import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
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


def raw_request(route: Route, port: int) -> bytes:
    """The bytes of ``route``'s request."""
    head = f"{route.method} {route.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if route.body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(route.body)}\r\n"
    return head.encode() + b"\r\n" + route.body


async def hammer(
    route: Route, port: int, connections: int, *, requests: int = 0, seconds: float = 0
) -> tuple[int, int, float]:
    """``connections`` keep-alive connections each send ``requests`` (or for ``seconds``).

    Our own client, not httpx or aiohttp: on a shared 2-core machine the load generator
    competes with the server for the CPU, and those spend several times the server's CPU time
    per request parsing and pooling. This one writes fixed bytes and reads the status line,
    the headers and a Content-Length or chunked body. Returns the responses, how many had
    another status than the route's, and the seconds.
    """
    raw, counts = raw_request(route, port), [0, 0]
    started = time.perf_counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            sent = 0
            while (sent < requests) if requests else (time.perf_counter() < started + seconds):
                writer.write(raw)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                if match := re.search(r"content-length: *(\d+)", head):
                    await reader.readexactly(int(match[1]))
                elif "chunked" in head:
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readexactly(2)
                sent += 1
                counts[0] += 1
                counts[1] += int(head.split(" ", 2)[1]) != route.status
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return counts[0], counts[1], time.perf_counter() - started


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

    async def send(self, route: Route, port: int, connections: int, each: int) -> float:
        """``each`` requests on each of ``connections``; requests per second."""
        sent, errors, seconds = await hammer(route, port, connections, requests=each)
        if errors:
            raise RuntimeError(f"{errors} of {sent} responses of {route.path} on {port} failed")
        return sent / seconds

    async def sample(self, variant: str, cell: Cell, scripts: Path) -> float:
        """One sample, tried again 10 s later when it fails (PostgreSQL is shared: it may be full).

        Warm first (code paths, and on PostgreSQL the pool filled); empty the pool after.
        """
        route, port = ROUTES[cell.route], self.servers[variant].port
        for attempt in range(6):
            try:
                await self.send(route, port, 32, 1 if route.name == "ping" else 5)
                if self.wrk:
                    return await wrk(route, port, cell.concurrency, self.seconds, scripts)
                sent, errors, seconds = await hammer(
                    route, port, cell.concurrency, seconds=self.seconds
                )
                if errors:
                    raise RuntimeError(f"{errors} of {sent} responses of {route.path} failed")
                return sent / seconds
            except (RuntimeError, OSError) as error:
                if attempt == 5:
                    raise
                print(f"{error!r}\nretrying in 10 s", file=sys.stderr, flush=True)
                await asyncio.sleep(10)
            finally:
                if self.pooled:
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
            generator = "wrk -t1" if group.wrk else "benchmarks.server.hammer"
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
