"""Real TCP clients and what they saw: every response counted, every acknowledged write noted.

Each concurrent worker has an ``httpx.AsyncClient`` of its own (one keep-alive connection):
one client shared by a hundred workers spends milliseconds of CPU per request searching its
pool, and would measure itself instead of the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

HUNG_AFTER = 30.0  # seconds without an answer: a hung request
KEPT_EXAMPLES = 8  # examples of each kind of failure kept for the report

Op = TypeVar("Op")


@dataclass
class Tally:
    """Everything the clients of one framework sent and got back, over every check.

    Attributes:
        statuses: Responses by HTTP status (``"201"``), plus ``"hung"`` (no answer within
            ``HUNG_AFTER``), ``"cut"`` (the server closed the connection without a complete
            response), ``"ws"`` (a websocket reply) and ``"dropped"`` (a client that
            disconnected on purpose).
        secrets: Where a response carried one of ``forbidden`` (the database passwords).
    """

    forbidden: tuple[bytes, ...]
    statuses: Counter[str] = field(default_factory=Counter)
    secrets: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        """Requests, websocket messages and deliberately dropped connections, all counted."""
        return sum(self.statuses.values())

    def count(self, outcome: str, body: bytes = b"", where: str = "") -> None:
        """Count one outcome; note it if ``body`` carries a password."""
        self.statuses[outcome] += 1
        if body and any(secret in body for secret in self.forbidden):
            self.secrets.append(f"{where} answered {outcome} with a database password in it")

    def status_line(self) -> str:
        """``200: 3,012; 201: 1,530; …``: statuses first, then the other outcomes."""
        codes = sorted((key for key in self.statuses if key.isdigit()), key=int)
        others = sorted(key for key in self.statuses if not key.isdigit())
        return "; ".join(f"{key}: {self.statuses[key]:,}" for key in [*codes, *others])


@dataclass
class Answer:
    """A response (or its absence) as a check sees it."""

    status: int | None  # None: hung or cut
    outcome: str  # the status as text, "hung" or "cut"
    body: bytes = b""
    elapsed: float = 0.0

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


class Failures:
    """The failures of one check: every one counted, the first few kept as examples."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[str] = []

    def add(self, description: str) -> None:
        """Record a failure."""
        self.count += 1
        if len(self.examples) < KEPT_EXAMPLES:
            self.examples.append(description)

    def extend(self, descriptions: Iterable[str]) -> None:
        """Record several failures."""
        for description in descriptions:
            self.add(description)

    def __bool__(self) -> bool:
        return self.count > 0


async def send(
    client: httpx.AsyncClient,
    tally: Tally,
    method: str,
    path: str,
    *,
    stream: bool = False,
    timeout: float = HUNG_AFTER,
    **kwargs: Any,
) -> Answer:
    """Send one request; count and return what came back. ``stream`` reads the body in chunks."""
    started = time.perf_counter()
    where = f"{method} {path}"
    try:
        async with asyncio.timeout(timeout):
            if stream:
                async with client.stream(method, path, **kwargs) as response:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
            else:
                response = await client.request(method, path, **kwargs)
                body = response.content
    except TimeoutError:
        tally.count("hung", where=where)
        return Answer(None, "hung", elapsed=time.perf_counter() - started)
    except httpx.TransportError:
        tally.count("cut", where=where)
        return Answer(None, "cut", elapsed=time.perf_counter() - started)
    tally.count(str(response.status_code), body, where)
    return Answer(
        response.status_code, str(response.status_code), body, time.perf_counter() - started
    )


@asynccontextmanager
async def clients(base_url: str, count: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``count`` HTTP clients with one keep-alive connection each."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(HUNG_AFTER)
    async with AsyncExitStack() as stack:
        made = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)
            )
            for _ in range(count)
        ]
        yield made


async def run_workers(
    base_url: str,
    concurrency: int,
    ops: Iterable[Op],
    work: Callable[[httpx.AsyncClient, Op], Awaitable[None]],
) -> float:
    """Run ``work(client, op)`` for every op, ``concurrency`` at a time; return the duration."""
    pending = iter(ops)

    async def worker(client: httpx.AsyncClient) -> None:
        for op in pending:
            await work(client, op)

    started = time.perf_counter()
    async with clients(base_url, concurrency) as made:
        await asyncio.gather(*(worker(client) for client in made))
    return time.perf_counter() - started


@dataclass
class Ledger:
    """What the todos table must hold: titles acknowledged, refused, or of unknown outcome.

    A write whose client got a 2xx must be there; one refused with a 4xx, or never sent whole,
    must not; one whose client never heard (a disconnect, a cancelled handler, a failure while
    PostgreSQL restarted) may be either.
    """

    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)  # of acknowledged todos, for reads
    titles: list[str] = field(default_factory=list)  # acknowledged, in order, for duplicates

    def ack(self, todo: dict[str, Any]) -> None:
        """Note a todo the API acknowledged."""
        self.acked.add(todo["title"])
        self.unknown.discard(todo["title"])
        self.ids.append(todo["id"])
        self.titles.append(todo["title"])

    def check(self, found: set[str]) -> list[str]:
        """Compare the titles in the table with the ledger; describe every mismatch."""
        problems = []
        missing = self.acked - found
        if missing:
            problems.append(
                f"{len(missing)} acknowledged todo(s) missing, e.g. {sorted(missing)[:3]}"
            )
        written = found & self.refused
        if written:
            problems.append(f"{len(written)} refused todo(s) written, e.g. {sorted(written)[:3]}")
        stray = found - self.acked - self.unknown - self.refused
        if stray:
            problems.append(f"{len(stray)} todo(s) nobody created, e.g. {sorted(stray)[:3]}")
        return problems


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
