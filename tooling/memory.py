"""Memory of the running process: resident set size, and what a request allocates."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections import Counter
from collections.abc import Awaitable, Callable

import psutil  # type: ignore[import-untyped,unused-ignore]  # no stubs where mypy runs


def rss_bytes() -> int:
    """This process's resident set size, after a full garbage collection."""
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def traced(request: Callable[[], Awaitable[object]], requests: int) -> tuple[int, float]:
    """The peak bytes allocated in one request, and those left per request after ``requests``.

    Measured under tracemalloc, after a warm-up of 500 requests.
    """
    tracemalloc.start()
    try:
        for _ in range(500):
            await request()
        gc.collect()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        await request()
        peak = tracemalloc.get_traced_memory()[1] - before
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(requests):
            await request()
        gc.collect()
        return peak, (tracemalloc.get_traced_memory()[0] - before) / requests
    finally:
        tracemalloc.stop()


async def soak(
    send: Callable[[int], Awaitable[int]], requests: int, every: int, concurrency: int = 1
) -> tuple[list[tuple[int, int]], Counter[int]]:
    """Call ``send(n)`` for n = 1 … ``requests``, ``concurrency`` at a time.

    ``send`` returns the response's status. Returns the RSS (bytes) before the first request,
    after every ``every``-th and at the end, and the count of every status.
    """
    samples, statuses, sent = [(0, rss_bytes())], Counter[int](), 0

    async def worker() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            index = sent
            statuses[await send(index)] += 1
            if index % every == 0:
                samples.append((index, rss_bytes()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if samples[-1][0] != sent:
        samples.append((sent, rss_bytes()))
    return samples, statuses
