"""The load and fault checks, each ending with the leak and data checks.

Every check returns a :class:`Result`: what it expected that did not hold (``failures``) and a
one-line account of what it did (``detail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect

from .client import Answer, Failures, percentile, run_workers, send
from .routes import TENANTS, tenant_name
from .target import POOL_SIZE, POOL_TIMEOUT, Target

Check = Callable[[Target], Awaitable["Result"]]


@dataclass
class Result:
    """The outcome of one check on one framework."""

    name: str
    failures: Failures = field(default_factory=Failures)
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether every expectation held."""
        return not self.failures


def _clean_error(answer: Answer) -> bool:
    """A failure the client can act on: a complete 500 or 503 response, without a traceback."""
    return answer.status in (500, 503) and b"Traceback" not in answer.body


# --- load --------------------------------------------------------------------------------

LOAD_MIX = [  # (kind, weight)
    ("list", 25),
    ("get", 20),
    ("create", 20),
    ("duplicate", 10),
    ("bulk", 5),
    ("export", 0.4),
    ("ws", 8),
    ("health", 5),
]
BULK_SIZE = 10


class Load:
    """Thousands of mixed requests, ``concurrency`` at once, through a pool of 5 connections.

    Reads, creates, duplicate creates, bulk creates, exports and websocket messages. Every
    answer must be the expected one (no 5xx, none hung), and the table must then hold
    exactly the todos acknowledged.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.tally = target.tally
        self.ledger = target.ledger
        self.result = Result("load")
        self.rng = random.Random(1)
        self.latencies: list[float] = []
        self.sockets: asyncio.Queue[ClientConnection] = asyncio.Queue()

    async def run(self) -> Result:
        """Send the load, then run the leak and data checks."""
        settings = self.target.settings
        names, weights = zip(*LOAD_MIX, strict=True)
        kinds = self.rng.choices(names, weights, k=settings.load_requests)
        for _ in range(settings.websockets):
            self.sockets.put_nowait(await connect(self.target.ws_url + "/todos/ws"))
        seconds = await run_workers(
            self.target.base_url, settings.concurrency, enumerate(kinds), self.work
        )
        while not self.sockets.empty():
            await self.sockets.get_nowait().close()
        self.result.failures.extend(await self.target.checkpoint())
        latencies = self.latencies
        self.result.detail = (
            f"{len(kinds):,} requests and websocket messages, {settings.concurrency} at once, "
            f"pool {POOL_SIZE}+0, in {seconds:.1f} s ({len(kinds) / seconds:,.0f}/s); latency "
            f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 "
            f"{percentile(latencies, 0.99) * 1000:.0f} ms, max "
            f"{max(latencies, default=0) * 1000:.0f} ms"
        )
        return self.result

    def expect(self, answer: Answer, *statuses: int, what: str) -> bool:
        """Note the latency; record a failure unless the status is one of ``statuses``."""
        self.latencies.append(answer.elapsed)
        if answer.status in statuses:
            return True
        self.result.failures.add(
            f"{what}: {answer.outcome} {answer.body[:120]!r}, expected {statuses}"
        )
        return False

    async def work(self, client: httpx.AsyncClient, op: tuple[int, str]) -> None:
        """Send one request of the mix."""
        index, kind = op
        if (kind == "get" and not self.ledger.ids) or (
            kind == "duplicate" and not self.ledger.titles
        ):
            kind = "health"  # nothing to read or repeat yet
        if kind == "ws":
            await self.websocket_message(index, duplicate=self.rng.random() < 0.3)
        else:
            await getattr(self, kind)(client, index)

    async def list(self, client: httpx.AsyncClient, _index: int) -> None:
        """A page of todos."""
        path = f"/todos?limit=20&offset={self.rng.randrange(max(1, len(self.ledger.ids)))}"
        self.expect(await send(client, self.tally, "GET", path), 200, what=path)

    async def get(self, client: httpx.AsyncClient, _index: int) -> None:
        """One acknowledged todo."""
        path = f"/todos/{self.rng.choice(self.ledger.ids)}"
        self.expect(await send(client, self.tally, "GET", path), 200, what=path)

    async def create(self, client: httpx.AsyncClient, index: int) -> None:
        """A new todo: 201."""
        title = f"load {index}"
        answer = await send(client, self.tally, "POST", "/todos", json={"title": title})
        if self.expect(answer, 201, what=f"create {title}"):
            self.ledger.ack(answer.json())

    async def duplicate(self, client: httpx.AsyncClient, _index: int) -> None:
        """A title acknowledged before: 409."""
        title = self.rng.choice(self.ledger.titles[-50:])
        answer = await send(client, self.tally, "POST", "/todos", json={"title": title})
        self.expect(answer, 409, what=f"duplicate {title}")

    async def bulk(self, client: httpx.AsyncClient, index: int) -> None:
        """Ten new todos at once: 201."""
        body = [{"title": f"bulk {index}.{n}"} for n in range(BULK_SIZE)]
        answer = await send(client, self.tally, "POST", "/todos/bulk", json=body)
        if self.expect(answer, 201, what=f"bulk {index}"):
            for todo in answer.json():
                self.ledger.ack(todo)

    async def export(self, client: httpx.AsyncClient, _index: int) -> None:
        """The NDJSON export, read to its end: it holds every todo acknowledged before."""
        committed = len(self.ledger.acked)
        answer = await send(client, self.tally, "GET", "/todos/export", stream=True)
        if self.expect(answer, 200, what="export"):
            lines = answer.body.splitlines()
            if len(lines) < committed:
                self.result.failures.add(
                    f"export: {len(lines)} lines, {committed} todos acknowledged before"
                )

    async def health(self, client: httpx.AsyncClient, _index: int) -> None:
        """The route that never touches the database."""
        self.expect(await send(client, self.tally, "GET", "/health"), 200, what="/health")

    async def websocket_message(self, index: int, *, duplicate: bool) -> None:
        """One create over one of the open websockets; a duplicate title gets a detail."""
        ledger, failures = self.ledger, self.result.failures
        duplicate = duplicate and bool(ledger.titles)
        title = self.rng.choice(ledger.titles[-50:]) if duplicate else f"ws {index}"
        socket = await self.sockets.get()
        started = time.perf_counter()
        try:
            await socket.send(json.dumps({"title": title}))
            reply = json.loads(await asyncio.wait_for(socket.recv(), 30))
        except Exception as exc:
            self.tally.count("cut", where="websocket")
            failures.add(f"websocket message {title!r}: {exc!r}")
            return
        finally:
            self.sockets.put_nowait(socket)
        self.latencies.append(time.perf_counter() - started)
        self.tally.count("ws", json.dumps(reply).encode(), "websocket")
        if "id" in reply:
            if duplicate:
                failures.add(f"websocket accepted the duplicate title {title!r}")
            ledger.ack(reply)
        elif not duplicate:
            failures.add(f"websocket refused the new title {title!r}: {reply}")


async def load(target: Target) -> Result:
    """Thousands of mixed requests through a pool smaller than the concurrency."""
    return await Load(target).run()


# --- client disconnects --------------------------------------------------------------------


async def _raw(target: Target, request: bytes, *, read: int = 0, delay: float = 0.0) -> None:
    """Send ``request`` on a raw TCP connection, maybe read ``read`` bytes, then reset it."""
    url = urlsplit(target.base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        if read:
            await asyncio.wait_for(reader.readexactly(read), 30)
        await asyncio.sleep(delay)
    finally:
        writer.transport.abort()


def _post(path: str, body: bytes, *, length: int | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


async def disconnects(target: Target) -> Result:
    """Clients that drop the connection mid-request, mid-response, mid-stream, mid-websocket."""
    result = Result("disconnects")
    rng = random.Random(2)
    per_kind = target.settings.disconnects_per_kind
    ledger, tally = target.ledger, target.tally
    export = b"GET /todos/export HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"

    async def drop(op: tuple[int, str]) -> None:
        index, kind = op
        if kind == "mid-request":  # the body is never sent whole: nothing may be written
            title = f"drop-request {index}"
            ledger.refused.add(title)
            body = json.dumps({"title": title, "done": False}).encode()
            await _raw(
                target, _post("/todos", body[:-8], length=len(body)), delay=rng.random() / 20
            )
        elif kind == "mid-response":  # sent whole, connection reset before the answer
            title = f"drop-response {index}"
            ledger.unknown.add(title)
            body = json.dumps({"title": title}).encode()
            await _raw(target, _post("/todos", body), delay=rng.random() / 50)
        elif kind == "mid-stream":  # the export stream reset after its first bytes
            await _raw(target, export, read=rng.choice([200, 2_000, 20_000]))
        else:  # a websocket create, the connection reset right after sending it
            title = f"drop-ws {index}"
            ledger.unknown.add(title)
            socket = await connect(target.ws_url + "/todos/ws")
            await socket.send(json.dumps({"title": title}))
            socket.transport.abort()
        tally.count("dropped")

    kinds = ["mid-request", "mid-response", "mid-stream", "mid-websocket"]
    ops = [(index, kind) for index in range(per_kind) for kind in kinds]
    rng.shuffle(ops)
    probes = await _with_probes(target, result, _gather_bounded(ops, drop, 100))
    result.failures.extend(await target.checkpoint())
    result.detail = (
        f"{len(ops)} connections reset ({per_kind} each {', '.join(kinds)}); "
        f"{probes} probe requests meanwhile all answered"
    )
    return result


async def _gather_bounded(
    ops: list[Any], run: Callable[[Any], Awaitable[None]], limit: int
) -> list[str]:
    """Run ``run(op)`` for every op, ``limit`` at once; describe the ones that raised."""
    semaphore = asyncio.Semaphore(limit)
    errors: list[str] = []

    async def bounded(op: Any) -> None:
        async with semaphore:
            try:
                await run(op)
            except Exception as exc:  # a dropped client may see its connection refused
                errors.append(f"{op}: {exc!r}")

    await asyncio.gather(*(bounded(op) for op in ops))
    return errors


async def _with_probes(target: Target, result: Result, work: Awaitable[list[str]]) -> int:
    """Run ``work`` while a client checks, every 50 ms, that reads are still answered."""
    done = asyncio.Event()
    probes = 0

    async def probe() -> None:
        nonlocal probes
        async with httpx.AsyncClient(base_url=target.base_url) as client:
            while not done.is_set():
                answer = await send(client, target.tally, "GET", "/todos?limit=5")
                probes += 1
                if answer.status != 200:
                    result.failures.add(f"probe GET /todos: {answer.outcome}")
                await asyncio.sleep(0.05)

    prober = asyncio.create_task(probe())
    try:
        errors = await work
    finally:
        done.set()
        await prober
    result.failures.extend(errors)
    return probes


# --- cancelled handlers --------------------------------------------------------------------


async def cancelled(target: Target) -> Result:
    """Handlers cancelled at random moments, as a server or proxy timeout cancels them."""
    result = Result("cancelled handlers")
    rng = random.Random(3)
    ledger, tally, failures = target.ledger, target.tally, result.failures
    outcomes: dict[str, int] = {}

    async def work(client: httpx.AsyncClient, index: int) -> None:
        headers = {"x-reliability-cancel-after": f"{rng.random() * 0.03:.4f}"}
        kind = ("create", "bulk", "list", "export")[index % 4]
        if kind == "create":
            title = f"cancel {index}"
            ledger.unknown.add(title)
            answer = await send(
                client, tally, "POST", "/todos", json={"title": title}, headers=headers
            )
            if answer.status == 201:
                ledger.ack(answer.json())
        elif kind == "bulk":
            titles = [f"cancel {index}.{n}" for n in range(5)]
            ledger.unknown.update(titles)
            body = [{"title": title} for title in titles]
            answer = await send(client, tally, "POST", "/todos/bulk", json=body, headers=headers)
            if answer.status == 201:
                for todo in answer.json():
                    ledger.ack(todo)
        elif kind == "list":
            answer = await send(client, tally, "GET", "/todos?limit=50", headers=headers)
        else:
            answer = await send(client, tally, "GET", "/todos/export", stream=True, headers=headers)
        outcomes[answer.outcome] = outcomes.get(answer.outcome, 0) + 1
        allowed = {"201", "504"} if kind in ("create", "bulk") else {"200", "504"}
        if kind == "export":
            allowed.add("cut")  # cancelled after its first chunk: the stream stops short
        if answer.outcome not in allowed:
            failures.add(f"{kind} #{index}: {answer.outcome} {answer.body[:120]!r}")

    await run_workers(target.base_url, 50, range(target.settings.cancelled), work)
    failures.extend(await target.checkpoint())
    result.detail = (
        f"{target.settings.cancelled} requests cancelled after 0 to 30 ms: "
        + ", ".join(f"{outcome}: {count}" for outcome, count in sorted(outcomes.items()))
    )
    return result


# --- a COMMIT that fails ------------------------------------------------------------------


async def failed_commits(target: Target) -> Result:
    """Writes that pass every statement but fail at COMMIT (deferred foreign key)."""
    result = Result("failed COMMIT")
    tally, failures = target.tally, result.failures
    refused = 0

    async def work(client: httpx.AsyncClient, index: int) -> None:
        nonlocal refused
        valid = index % 2 == 0
        name = f"child-{index}"
        path = f"/__harness/deferred?name={name}&valid={int(valid)}"
        answer = await send(client, tally, "POST", path)
        if valid and answer.status == 201:
            target.children[name] = True
        elif not valid and answer.status is not None and answer.status >= 500:
            target.children[name] = False
            refused += 1
        else:
            failures.add(f"{'valid' if valid else 'failing'} {name}: {answer.outcome}")

    await run_workers(target.base_url, 50, range(target.settings.failed_commits), work)
    failures.extend(await target.checkpoint())
    result.detail = (
        f"{target.settings.failed_commits} concurrent writes, half failing at COMMIT: "
        f"{refused} answered 5xx and left no row, the others 201"
    )
    return result


# --- tenant isolation ----------------------------------------------------------------------


async def isolation(target: Target) -> Result:
    """Concurrent requests for different tenants never see each other's objects."""
    result = Result("isolation")
    rng = random.Random(4)

    async def work(client: httpx.AsyncClient, _index: int) -> None:
        tenant = tenant_name(rng.randrange(TENANTS))
        answer = await send(client, target.tally, "GET", f"/__harness/tenant?tenant={tenant}")
        if answer.status != 200:
            result.failures.add(f"tenant {tenant}: {answer.outcome}")
            return
        report = answer.json()
        if report["seen"] != [tenant] or report["rows"] != report["again"]:
            result.failures.add(f"tenant {tenant}'s session held {report}")

    requests, concurrency = (
        target.settings.isolation_requests,
        target.settings.isolation_concurrency,
    )
    await run_workers(target.base_url, concurrency, range(requests), work)
    result.failures.extend(await target.checkpoint(data=False))
    held = "only its own tenant's rows" if result.passed else "other tenants' rows (see below)"
    result.detail = (
        f"{requests} requests over {TENANTS} tenants, {concurrency} at once; "
        f"each identity map held {held}"
    )
    return result


# --- the pool exhausted ----------------------------------------------------------------------

SLOW_SECONDS = POOL_TIMEOUT + 2


async def pool_exhausted(target: Target) -> Result:
    """Slow requests hold every pooled connection: others answer or fail within the timeout."""
    result = Result("pool exhausted")
    tally, failures = target.tally, result.failures
    limit = POOL_TIMEOUT + 2.0  # the pool timeout plus the time to answer
    async with httpx.AsyncClient(base_url=target.base_url, timeout=60) as slow_client:
        slow = [
            asyncio.create_task(
                send(slow_client, tally, "GET", f"/__harness/slow?seconds={SLOW_SECONDS}")
            )
            for _ in range(POOL_SIZE)
        ]
        await asyncio.sleep(0.5)
        health: list[Answer] = []
        waiting: list[Answer] = []

        async def work(client: httpx.AsyncClient, index: int) -> None:
            if index % 3:
                health.append(await send(client, tally, "GET", "/health"))
            else:
                waiting.append(await send(client, tally, "GET", "/todos?limit=1"))

        await run_workers(target.base_url, 30, range(30), work)
        for answer in health:
            if answer.status != 200 or answer.elapsed > 1.0:
                failures.add(
                    f"/health with the pool exhausted: {answer.outcome} in {answer.elapsed:.2f} s"
                )
        for answer in waiting:
            if answer.elapsed > limit:
                failures.add(
                    f"GET /todos waited {answer.elapsed:.1f} s (pool timeout {POOL_TIMEOUT} s)"
                )
            elif answer.status != 503 and not (answer.status or 0) < 300:
                failures.add(
                    f"GET /todos with no connection free: {answer.outcome} {answer.body[:80]!r} "
                    f"after {answer.elapsed:.1f} s; a clear error is a 503 saying the pool is busy"
                )
        for answer in await asyncio.gather(*slow):
            if answer.status != 200:
                failures.add(f"slow request: {answer.outcome}")
    failures.extend(await target.checkpoint(data=False))
    statuses = sorted({answer.outcome for answer in waiting})
    result.detail = (
        f"{POOL_SIZE} requests held the {POOL_SIZE} connections {SLOW_SECONDS} s; {len(health)} "
        f"/health answered in ≤ {max((a.elapsed for a in health), default=0):.2f} s; "
        f"{len(waiting)} GET /todos answered {'/'.join(statuses)} in ≤ "
        f"{max((a.elapsed for a in waiting), default=0):.1f} s (pool timeout {POOL_TIMEOUT} s)"
    )
    return result


# --- PostgreSQL restarted under load -------------------------------------------------------


class Restart:
    """PostgreSQL stopped (fast shutdown) and started again under load.

    Thirty clients create and read throughout. Requests must not fail before the stop;
    while PostgreSQL is down they must fail cleanly (a complete 500 or 503, no dropped
    connection, no hang); once it is back the app must recover without a restart.
    """

    CLIENTS = 30
    DOWN_SECONDS = 2.0
    RECOVERED_AFTER = 100  # successes in a row
    RECOVERY_LIMIT = 20.0

    def __init__(self, target: Target) -> None:
        self.target = target
        self.result = Result("postgres restart")
        self.phase = "up"  # then "down", then "back"
        self.sent = {"up": 0, "down": 0, "back": 0}
        self.failed = {"up": 0, "down": 0, "back": 0}
        self.back_at = 0.0
        self.first_success: float | None = None
        self.streak = 0
        self.recovered = asyncio.Event()
        self.stop = asyncio.Event()

    async def run(self) -> Result:
        """Load, stop, start, wait for recovery; then the leak and data checks."""
        workers = run_workers(self.target.base_url, self.CLIENTS, range(self.CLIENTS), self.work)
        await asyncio.gather(self.drive(), workers)
        failures = self.result.failures
        if not self.recovered.is_set():
            failures.add(f"the app did not recover within {self.RECOVERY_LIMIT:.0f} s")
        failures.extend(await self.target.checkpoint())
        first = "never" if self.first_success is None else f"{self.first_success:.2f} s"
        sent, failed = self.sent, self.failed
        self.result.detail = (
            f"{self.CLIENTS} clients; down {self.DOWN_SECONDS:.0f} s. Sent before the stop "
            f"{sent['up']} ({failed['up']} failed, in flight at the stop), while down "
            f"{sent['down']} ({failed['down']} failed cleanly), after {sent['back']} "
            f"({failed['back']} failed); first success {first} after the restart"
        )
        return self.result

    async def drive(self) -> None:
        """Stop PostgreSQL, start it again, and wait for the app to recover."""
        postgres = self.target.postgres
        await asyncio.sleep(1.5)
        self.phase = "down"
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(self.DOWN_SECONDS)
        await asyncio.to_thread(postgres.start)
        self.back_at = time.perf_counter()
        self.phase = "back"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.recovered.wait(), self.RECOVERY_LIMIT)
        self.stop.set()

    async def work(self, client: httpx.AsyncClient, index: int) -> None:
        """Create (odd clients) or read (even ones) until told to stop."""
        ledger, tally = self.target.ledger, self.target.tally
        for count in itertools.count():
            if self.stop.is_set():
                return
            started_in = self.phase
            if index % 2:
                title = f"restart {index}.{count}"
                ledger.unknown.add(title)
                body = {"title": title}
                answer = await send(client, tally, "POST", "/todos", json=body, timeout=15)
                if answer.status == 201:
                    ledger.ack(answer.json())
            else:
                answer = await send(client, tally, "GET", "/todos?limit=5", timeout=15)
            self.judge(started_in, answer)
            await asyncio.sleep(0.005)

    def judge(self, started_in: str, answer: Answer) -> None:
        """Count one answer against the phase its request started in."""
        self.sent[started_in] += 1
        ok = answer.status is not None and answer.status < 300
        if not ok:
            self.failed[started_in] += 1
            if not _clean_error(answer):
                self.result.failures.add(
                    f"sent while {started_in}: {answer.outcome} {answer.body[:100]!r}"
                )
            elif started_in == "up" and self.phase == "up":
                self.result.failures.add(f"failed before PostgreSQL stopped: {answer.outcome}")
        if started_in == "back":
            if ok and self.first_success is None:
                self.first_success = time.perf_counter() - self.back_at
            self.streak = self.streak + 1 if ok else 0
            if self.streak >= self.RECOVERED_AFTER:
                self.recovered.set()


async def postgres_restart(target: Target) -> Result:
    """PostgreSQL restarted under load; the app recovers by itself."""
    return await Restart(target).run()


# --- credentials rotated, and the secrets check ------------------------------------------------


async def credentials_rotated(target: Target) -> Result:
    """The app's password changes under it: clean failures, no password shown, recovery."""
    result = Result("password rotated")
    tally, failures = target.tally, result.failures
    rotated = "pw-rotated-" + target.postgres.password[3:]
    tally.forbidden = (*tally.forbidden, rotated.encode())
    await target.postgres.set_app_password(rotated)
    failed = 0
    async with httpx.AsyncClient(base_url=target.base_url, timeout=30) as client:
        for _ in range(10):
            answer = await send(client, tally, "GET", "/todos?limit=1")
            if answer.status == 200:
                failures.add("a request succeeded although the app's password was wrong")
            elif not _clean_error(answer):
                failures.add(f"with the wrong password: {answer.outcome} {answer.body[:100]!r}")
            else:
                failed += 1
        await target.postgres.set_app_password(target.postgres.password)
        recovered = False
        for _ in range(100):
            if (await send(client, tally, "GET", "/todos?limit=1")).status == 200:
                recovered = True
                break
            await asyncio.sleep(0.1)
    if not recovered:
        failures.add("the app did not recover once the password was restored")
    failures.extend(await target.checkpoint(data=False))
    result.detail = (
        f"password changed and sessions ended: {failed}/10 requests failed cleanly; "
        f"{'recovered' if recovered else 'no recovery'} once it was restored"
    )
    return result


CHECKS: list[Check] = [
    load,
    disconnects,
    cancelled,
    failed_commits,
    pool_exhausted,
    postgres_restart,
    credentials_rotated,
    isolation,
]
