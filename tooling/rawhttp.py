"""HTTP/1.1 over raw sockets: fixed request bytes, keep-alive load, connections cut on purpose.

Our own rather than httpx or aiohttp: on a shared 2-core machine the load generator competes
with the server for the CPU, and those spend several times the server's CPU time per request
parsing and pooling (they would measure themselves); and a client library will not send half
a body or reset a connection mid-response, which the reliability checks need.
"""

from __future__ import annotations

import asyncio
import re
import time


def request_bytes(method: str, path: str, body: bytes = b"", *, length: int | None = None) -> bytes:
    """The bytes of one request; ``length`` overrides the Content-Length (a body cut short)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body or length is not None:
        size = len(body) if length is None else length
        head += f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
    return head.encode() + b"\r\n" + body


async def hammer(
    raw: bytes, port: int, connections: int, status: int, *, requests: int = 0, seconds: float = 0
) -> tuple[int, int, float]:
    """``connections`` keep-alive connections send ``raw``, ``requests`` each or for ``seconds``.

    Each reads the status line, the headers and a Content-Length or chunked body.

    Returns the responses, how many had another status than ``status``, and the seconds.
    """
    counts = [0, 0]
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
                counts[1] += int(head.split(" ", 2)[1]) != status
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return counts[0], counts[1], time.perf_counter() - started


async def send_and_reset(port: int, raw: bytes, *, read: int = 0, delay: float = 0.0) -> None:
    """Send ``raw`` on a new connection, maybe read ``read`` bytes, wait ``delay``, reset it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if read:
            await asyncio.wait_for(reader.readexactly(read), 30)
        await asyncio.sleep(delay)
    finally:
        writer.transport.abort()
