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
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
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

    @property
    def ok(self) -> bool:
        """A 1xx to 3xx response."""
        return self.status is not None and self.status < 300

    @property
    def clean_error(self) -> bool:
        """A failure the client can act on: a complete 500 or 503 response, no traceback."""
        return self.status in (500, 503) and b"Traceback" not in self.body


@dataclass
class Failures:
    """The failures of one check: every one counted, the first few kept as examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

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
    started, where = time.perf_counter(), f"{method} {path}"
    try:
        async with asyncio.timeout(timeout):
            if stream:
                async with client.stream(method, path, **kwargs) as response:
                    body = b"".join([chunk async for chunk in response.aiter_raw()])
            else:
                response = await client.request(method, path, **kwargs)
                body = response.content
    except (TimeoutError, httpx.TransportError) as exc:
        outcome = "hung" if isinstance(exc, TimeoutError) else "cut"
        tally.count(outcome, where=where)
        return Answer(None, outcome, elapsed=time.perf_counter() - started)
    tally.count(str(response.status_code), body, where)
    return Answer(
        response.status_code, str(response.status_code), body, time.perf_counter() - started
    )


async def run_workers(
    base_url: str,
    concurrency: int,
    ops: Iterable[Op],
    work: Callable[[httpx.AsyncClient, Op], Awaitable[None]],
) -> float:
    """Run ``work(client, op)`` for every op, ``concurrency`` at a time; return the duration.

    Each of the ``concurrency`` clients has one keep-alive connection.
    """
    pending, limits = iter(ops), httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def worker(client: httpx.AsyncClient) -> None:
        for op in pending:
            await work(client, op)

    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        made = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, limits=limits, timeout=HUNG_AFTER)
            )
            for _ in range(concurrency)
        ]
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

    def ack(self, *todos: dict[str, Any]) -> None:
        """Note todos the API acknowledged."""
        for todo in todos:
            self.acked.add(todo["title"])
            self.unknown.discard(todo["title"])
            self.ids.append(todo["id"])
            self.titles.append(todo["title"])

    def check(self, found: set[str]) -> list[str]:
        """Compare the titles in the table with the ledger; describe every mismatch."""
        mismatches = [
            (self.acked - found, "acknowledged todo(s) missing"),
            (found & self.refused, "refused todo(s) written"),
            (found - self.acked - self.unknown - self.refused, "todo(s) nobody created"),
        ]
        return [
            f"{len(titles)} {what}, e.g. {sorted(titles)[:3]}"
            for titles, what in mismatches
            if titles
        ]


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values`` (0 when empty)."""
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
