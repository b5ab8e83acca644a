"""A small HTTP/1.1 keep-alive client on asyncio streams.

The real-server driver uses it to wait for a server, to warm it (and fill its pool) before a
measurement, and as the load generator where `wrk` is missing.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.routes import BenchRoute


def raw_request(route: BenchRoute, port: int) -> bytes:
    """The bytes of ``route``'s request to a server on 127.0.0.1:``port``."""
    head = f"{route.method} {route.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if route.body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(route.body)}\r\n"
    return head.encode() + b"\r\n" + route.body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked body); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def hammer(
    route: BenchRoute, port: int, connections: int, *, requests: int = 0, seconds: float = 0
) -> tuple[int, int, float]:
    """Send ``route``'s request over ``connections`` keep-alive connections.

    Each connection sends ``requests`` requests, or as many as fit in ``seconds``.

    Returns:
        The number of responses, how many had another status than the route's, and the
        seconds it took.
    """
    raw = raw_request(route, port)
    started = time.perf_counter()
    deadline = started + seconds
    counts = [0, 0]

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            sent = 0
            while (sent < requests) if requests else (time.perf_counter() < deadline):
                writer.write(raw)
                status = await read_response(reader)
                sent += 1
                counts[0] += 1
                counts[1] += status != route.status
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return counts[0], counts[1], time.perf_counter() - started


async def wait_until_serving(route: BenchRoute, port: int, timeout: float = 60) -> None:
    """Wait until a server answers ``route`` on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, errors, _ = await hammer(route, port, 1, requests=1)
        except OSError:
            errors = 1
        if not errors:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server answered on port {port} within {timeout} s")
        await asyncio.sleep(0.1)
