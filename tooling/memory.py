"""Memory of the running process: resident set size, and what a request allocates."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Awaitable, Callable

import psutil


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
