"""The checks, as one table (:data:`CHECKS`): each a name, a function, and what follows it.

A check's function sends its load or fault, records every expectation that did not hold in
``result.failures``, and returns a one-line account of what it did. Then (``after``) the leak
check alone, or the leak and data checks, run on the same :class:`Result`. The memory soak and
the secrets check, which run beside the others and after the server stopped, are the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tooling.rawhttp import request_bytes, send_and_reset

from .client import Answer, Failures, percentile, run_workers, send
from .fuzz import Fuzzer
from .serve import TENANTS, tenant_name
from .target import POOL_SIZE, POOL_TIMEOUT, ROOT, Target

CHECK_TIMEOUT = 240  # seconds: a check still running then has hung
LOAD_MIX = {"list": 25, "get": 20, "create": 20, "duplicate": 10, "bulk": 5, "export": 0.4,
            "ws": 8, "health": 5}  # fmt: skip
BULK_SIZE = 10
SLOW_SECONDS = POOL_TIMEOUT + 2


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


async def load(target: Target, result: Result) -> str:  # noqa: PLR0915 - one mix, one place
    """Thousands of mixed requests, ``concurrency`` at once, through a pool of 5 connections.

    Reads, creates, duplicate creates, bulk creates, exports and websocket messages. Every
    answer must be the expected one (no 5xx, none hung), and the table must then hold
    exactly the todos acknowledged.
    """
    settings, ledger, tally, rng = target.settings, target.ledger, target.tally, random.Random(1)
    latencies: list[float] = []
    sockets: asyncio.Queue[ClientConnection] = asyncio.Queue()
    kinds = rng.choices(list(LOAD_MIX), list(LOAD_MIX.values()), k=settings.load_requests)

    async def websocket_message(index: int) -> None:
        """One create over one of the open websockets; a duplicate title gets a detail."""
        duplicate = rng.random() < 0.3 and bool(ledger.titles)
        title = rng.choice(ledger.titles[-50:]) if duplicate else f"ws {index}"
        socket, started = await sockets.get(), time.perf_counter()
        try:
            await socket.send(json.dumps({"title": title}))
            reply = json.loads(await asyncio.wait_for(socket.recv(), 30))
        except Exception as exc:
            tally.count("cut", where="websocket")
            result.failures.add(f"websocket message {title!r}: {exc!r}")
            return
        finally:
            sockets.put_nowait(socket)
        latencies.append(time.perf_counter() - started)
        tally.count("ws", json.dumps(reply).encode(), "websocket")
        if "id" in reply:
            if duplicate:
                result.failures.add(f"websocket accepted the duplicate title {title!r}")
            ledger.ack(reply)
        elif not duplicate:
            result.failures.add(f"websocket refused the new title {title!r}: {reply}")

    async def work(client: httpx.AsyncClient, op: tuple[int, str]) -> None:
        """Send one request of the mix and judge its answer."""
        index, kind = op
        if (kind == "get" and not ledger.ids) or (kind == "duplicate" and not ledger.titles):
            kind = "health"  # nothing to read or repeat yet
        if kind == "ws":
            return await websocket_message(index)
        body: Any = None
        expected, committed = 201, len(ledger.acked)
        if kind in ("create", "duplicate"):
            title = f"load {index}" if kind == "create" else rng.choice(ledger.titles[-50:])
            path, body, expected = "/todos", {"title": title}, 201 if kind == "create" else 409
        elif kind == "bulk":
            path, body = "/todos/bulk", [{"title": f"bulk {index}.{n}"} for n in range(BULK_SIZE)]
        else:
            expected, path = (
                200,
                {
                    "list": f"/todos?limit=20&offset={rng.randrange(max(1, len(ledger.ids)))}",
                    "get": f"/todos/{rng.choice(ledger.ids) if kind == 'get' else 0}",
                    "export": "/todos/export",
                    "health": "/health",
                }[kind],
            )
        method = "GET" if body is None else "POST"
        answer = await send(client, tally, method, path, json=body, stream=kind == "export")
        latencies.append(answer.elapsed)
        if answer.status != expected:
            what = f"{kind} {path} {json.dumps(body)[:60] if body else ''}"
            result.failures.add(
                f"{what}: {answer.outcome} {answer.body[:120]!r}, expected {expected}"
            )
        elif kind in ("create", "bulk"):
            ledger.ack(*(answer.json() if kind == "bulk" else [answer.json()]))
        elif kind == "export" and len(answer.body.splitlines()) < committed:
            lines = len(answer.body.splitlines())
            result.failures.add(f"export: {lines} lines, {committed} todos acknowledged before")

    for _ in range(settings.websockets):
        sockets.put_nowait(await connect(target.ws_url + "/todos/ws"))
    seconds = await run_workers(target.base_url, settings.concurrency, enumerate(kinds), work)
    while not sockets.empty():
        await sockets.get_nowait().close()
    return (
        f"{len(kinds):,} requests and websocket messages, {settings.concurrency} at once, "
        f"pool {POOL_SIZE}+0, in {seconds:.1f} s ({len(kinds) / seconds:,.0f}/s); latency "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 "
        f"{percentile(latencies, 0.99) * 1000:.0f} ms, "
        f"max {max(latencies, default=0) * 1000:.0f} ms"
    )


async def disconnects(target: Target, result: Result) -> str:
    """Clients that drop the connection mid-request, mid-response, mid-stream, mid-websocket.

    A client reads ``GET /todos`` every 50 ms meanwhile: every probe must be answered.
    """
    rng, per_kind, ledger = random.Random(2), target.settings.disconnects_per_kind, target.ledger
    bounded, done, probes = asyncio.Semaphore(100), asyncio.Event(), 0

    async def drop(index: int, kind: str) -> None:
        title = f"drop-{kind.removeprefix('mid-')} {index}"
        body = json.dumps({"title": title} | ({"done": False} if kind == "mid-request" else {}))
        async with bounded:
            try:
                if kind == "mid-request":  # the body is never sent whole: nothing may be written
                    ledger.refused.add(title)
                    raw = request_bytes("POST", "/todos", body.encode()[:-8], length=len(body))
                    await send_and_reset(target.port, raw, delay=rng.random() / 20)
                elif kind == "mid-response":  # sent whole, connection reset before the answer
                    ledger.unknown.add(title)
                    raw = request_bytes("POST", "/todos", body.encode())
                    await send_and_reset(target.port, raw, delay=rng.random() / 50)
                elif kind == "mid-stream":  # the export stream reset after its first bytes
                    raw, read = request_bytes("GET", "/todos/export"), [200, 2_000, 20_000]
                    await send_and_reset(target.port, raw, read=rng.choice(read))
                else:  # a websocket create, the connection reset right after sending it
                    ledger.unknown.add(title := f"drop-ws {index}")
                    socket = await connect(target.ws_url + "/todos/ws")
                    await socket.send(json.dumps({"title": title}))
                    socket.transport.abort()
                target.tally.count("dropped")
            except Exception as exc:  # a dropped client may see its connection refused
                result.failures.add(f"{(index, kind)}: {exc!r}")

    async def probe() -> None:
        nonlocal probes
        async with httpx.AsyncClient(base_url=target.base_url) as client:
            while not done.is_set():
                answer = await send(client, target.tally, "GET", "/todos?limit=5")
                probes += 1
                if answer.status != 200:
                    result.failures.add(f"probe GET /todos: {answer.outcome}")
                await asyncio.sleep(0.05)

    kinds = ["mid-request", "mid-response", "mid-stream", "mid-websocket"]
    ops = [(index, kind) for index in range(per_kind) for kind in kinds]
    rng.shuffle(ops)
    prober = asyncio.create_task(probe())
    try:
        await asyncio.gather(*(drop(*op) for op in ops))
    finally:
        done.set()
        await prober
    return (
        f"{len(ops)} connections reset ({per_kind} each {', '.join(kinds)}); "
        f"{probes} probe requests meanwhile all answered"
    )


async def cancelled(target: Target, result: Result) -> str:
    """Handlers cancelled at random moments, as a server or proxy timeout cancels them.

    The client gets the response or a 504, never a 5xx from the app; a 201 means the row is
    there.
    """
    rng, ledger, outcomes = random.Random(3), target.ledger, Counter[str]()

    async def work(client: httpx.AsyncClient, index: int) -> None:
        headers = {"x-reliability-cancel-after": f"{rng.random() * 0.03:.4f}"}
        kind = ("create", "bulk", "list", "export")[index % 4]
        titles = (
            [f"cancel {index}"] if kind == "create" else [f"cancel {index}.{n}" for n in range(5)]
        )
        body: Any = [{"title": title} for title in titles]
        if kind in ("create", "bulk"):
            ledger.unknown.update(titles)
            path, body = ("/todos", body[0]) if kind == "create" else ("/todos/bulk", body)
            answer = await send(client, target.tally, "POST", path, json=body, headers=headers)
            if answer.status == 201:
                ledger.ack(*(answer.json() if kind == "bulk" else [answer.json()]))
        else:
            path = "/todos?limit=50" if kind == "list" else "/todos/export"
            answer = await send(
                client, target.tally, "GET", path, stream=kind == "export", headers=headers
            )
        outcomes[answer.outcome] += 1
        allowed = {"201", "504"} if kind in ("create", "bulk") else {"200", "504"}
        if kind == "export":
            allowed.add("cut")  # cancelled after its first chunk: the stream stops short
        if answer.outcome not in allowed:
            result.failures.add(f"{kind} #{index}: {answer.outcome} {answer.body[:120]!r}")

    await run_workers(target.base_url, 50, range(target.settings.cancelled), work)
    return f"{target.settings.cancelled} requests cancelled after 0 to 30 ms: " + ", ".join(
        f"{outcome}: {count}" for outcome, count in sorted(outcomes.items())
    )


async def failed_commits(target: Target, result: Result) -> str:
    """Writes that pass every statement but fail at COMMIT (deferred foreign key).

    Never a 2xx for a write that failed: a 5xx and no row; the valid half 201 and there.
    """
    refused = 0

    async def work(client: httpx.AsyncClient, index: int) -> None:
        nonlocal refused
        valid, name = index % 2 == 0, f"child-{index}"
        answer = await send(
            client, target.tally, "POST", f"/__harness/deferred?name={name}&valid={int(valid)}"
        )
        if valid and answer.status == 201:
            target.children[name] = True
        elif not valid and answer.status is not None and answer.status >= 500:
            target.children[name] = False
            refused += 1
        else:
            result.failures.add(f"{'valid' if valid else 'failing'} {name}: {answer.outcome}")

    await run_workers(target.base_url, 50, range(target.settings.failed_commits), work)
    return (
        f"{target.settings.failed_commits} concurrent writes, half failing at COMMIT: "
        f"{refused} answered 5xx and left no row, the others 201"
    )


async def isolation(target: Target, result: Result) -> str:
    """Concurrent requests for different tenants never see each other's objects."""
    rng, requests = random.Random(4), target.settings.isolation_requests
    concurrency = target.settings.isolation_concurrency

    async def work(client: httpx.AsyncClient, _index: int) -> None:
        tenant = tenant_name(rng.randrange(TENANTS))
        answer = await send(client, target.tally, "GET", f"/__harness/tenant?tenant={tenant}")
        if answer.status != 200:
            result.failures.add(f"tenant {tenant}: {answer.outcome}")
        elif (report := answer.json())["seen"] != [tenant] or report["rows"] != report["again"]:
            result.failures.add(f"tenant {tenant}'s session held {report}")

    await run_workers(target.base_url, concurrency, range(requests), work)
    held = "only its own tenant's rows" if result.passed else "other tenants' rows (see below)"
    return (
        f"{requests} requests over {TENANTS} tenants, {concurrency} at once; "
        f"each identity map held {held}"
    )


async def pool_exhausted(target: Target, result: Result) -> str:
    """Slow requests hold every pooled connection: others answer or fail within the timeout.

    ``/health`` answers within 1 s; ``GET /todos`` answers, or fails with a 503 (a clear
    error), within the pool timeout (plus 2 s to answer).
    """
    tally, failures, limit = target.tally, result.failures, POOL_TIMEOUT + 2.0
    health: list[Answer] = []
    waiting: list[Answer] = []

    async def work(client: httpx.AsyncClient, index: int) -> None:
        if index % 3:
            health.append(await send(client, tally, "GET", "/health"))
        else:
            waiting.append(await send(client, tally, "GET", "/todos?limit=1"))

    async with httpx.AsyncClient(base_url=target.base_url, timeout=60) as slow_client:
        path = f"/__harness/slow?seconds={SLOW_SECONDS}"
        slow = [
            asyncio.create_task(send(slow_client, tally, "GET", path)) for _ in range(POOL_SIZE)
        ]
        await asyncio.sleep(0.5)
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
            elif answer.status != 503 and not answer.ok:
                failures.add(
                    f"GET /todos with no connection free: {answer.outcome} {answer.body[:80]!r} "
                    f"after {answer.elapsed:.1f} s; a clear error is a 503 saying the pool is busy"
                )
        for answer in await asyncio.gather(*slow):
            if answer.status != 200:
                failures.add(f"slow request: {answer.outcome}")
    statuses = sorted({answer.outcome for answer in waiting})
    return (
        f"{POOL_SIZE} requests held the {POOL_SIZE} connections {SLOW_SECONDS} s; {len(health)} "
        f"/health answered in ≤ {max((a.elapsed for a in health), default=0):.2f} s; "
        f"{len(waiting)} GET /todos answered {'/'.join(statuses)} in ≤ "
        f"{max((a.elapsed for a in waiting), default=0):.1f} s (pool timeout {POOL_TIMEOUT} s)"
    )


async def postgres_restart(target: Target, result: Result) -> str:
    """PostgreSQL stopped (fast shutdown) and started again under load.

    Thirty clients create and read throughout. Requests must not fail before the stop;
    while PostgreSQL is down they must fail cleanly (a complete 500 or 503, no dropped
    connection, no hang); once it is back the app must recover without a restart (100
    successes in a row within 20 s).
    """
    clients, down_seconds, recovered_after, recovery_limit = 30, 2.0, 100, 20.0
    sent, failed = Counter[str](), Counter[str]()
    state: dict[str, Any] = {"phase": "up", "back_at": 0.0, "first": None, "streak": 0}
    recovered, stop = asyncio.Event(), asyncio.Event()

    async def drive() -> None:
        """Stop PostgreSQL, start it again, and wait for the app to recover."""
        await asyncio.sleep(1.5)
        state["phase"] = "down"
        await asyncio.to_thread(target.postgres.stop)
        await asyncio.sleep(down_seconds)
        await asyncio.to_thread(target.postgres.start)
        state.update(phase="back", back_at=time.perf_counter())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recovered.wait(), recovery_limit)
        stop.set()

    async def work(client: httpx.AsyncClient, index: int) -> None:
        """Create (odd clients) or read (even ones) until told to stop.

        Each answer is judged against the phase its request started in.
        """
        for count in itertools.count():
            if stop.is_set():
                return
            phase = state["phase"]
            if index % 2:
                target.ledger.unknown.add(title := f"restart {index}.{count}")
                body = {"title": title}
                answer = await send(client, target.tally, "POST", "/todos", json=body, timeout=15)
                if answer.status == 201:
                    target.ledger.ack(answer.json())
            else:
                answer = await send(client, target.tally, "GET", "/todos?limit=5", timeout=15)
            sent[phase] += 1
            if not answer.ok:
                failed[phase] += 1
                if not answer.clean_error:
                    result.failures.add(
                        f"sent while {phase}: {answer.outcome} {answer.body[:100]!r}"
                    )
                elif phase == "up" and state["phase"] == "up":
                    result.failures.add(f"failed before PostgreSQL stopped: {answer.outcome}")
            if phase == "back":
                if answer.ok and state["first"] is None:
                    state["first"] = time.perf_counter() - state["back_at"]
                state["streak"] = state["streak"] + 1 if answer.ok else 0
                if state["streak"] >= recovered_after:
                    recovered.set()
            await asyncio.sleep(0.005)

    await asyncio.gather(drive(), run_workers(target.base_url, clients, range(clients), work))
    if not recovered.is_set():
        result.failures.add(f"the app did not recover within {recovery_limit:.0f} s")
    first = "never" if state["first"] is None else f"{state['first']:.2f} s"
    return (
        f"{clients} clients; down {down_seconds:.0f} s. Sent before the stop "
        f"{sent['up']} ({failed['up']} failed, in flight at the stop), while down "
        f"{sent['down']} ({failed['down']} failed cleanly), after {sent['back']} "
        f"({failed['back']} failed); first success {first} after the restart"
    )


async def credentials_rotated(target: Target, result: Result) -> str:
    """The app's password changes under it: clean failures, no password shown, recovery."""
    tally, failures, postgres = target.tally, result.failures, target.postgres
    rotated = "pw-rotated-" + postgres.password[3:]
    tally.forbidden = (*tally.forbidden, rotated.encode())
    await postgres.set_app_password(rotated)
    failed, recovered = 0, False
    async with httpx.AsyncClient(base_url=target.base_url, timeout=30) as client:
        for _ in range(10):
            answer = await send(client, tally, "GET", "/todos?limit=1")
            if answer.status == 200:
                failures.add("a request succeeded although the app's password was wrong")
            elif not answer.clean_error:
                failures.add(f"with the wrong password: {answer.outcome} {answer.body[:100]!r}")
            else:
                failed += 1
        await postgres.set_app_password(postgres.password)
        for _ in range(100):
            if recovered := (await send(client, tally, "GET", "/todos?limit=1")).status == 200:
                break
            await asyncio.sleep(0.1)
    if not recovered:
        failures.add("the app did not recover once the password was restored")
    return (
        f"password changed and sessions ended: {failed}/10 requests failed cleanly; "
        f"{'recovered' if recovered else 'no recovery'} once it was restored"
    )


async def bad_input(target: Target, result: Result) -> str:
    """Hypothesis and schemathesis: never a 5xx, and a 4xx never writes."""
    fuzzer = Fuzzer(target.base_url, target.postgres.admin_dsn(target.database), target.tally)
    settings = target.settings
    run = fuzzer.run, settings.fuzz_examples, settings.schema_examples
    result.failures, detail = await asyncio.to_thread(*run)
    return detail


@dataclass(frozen=True)
class Check:
    """A check of the table: its name, its function, and the checks run after it.

    ``after``: ``"data"`` runs the leak check and the data check, ``"leaks"`` the leak check.
    """

    name: str
    run: Callable[[Target, Result], Awaitable[str]]
    after: str = "data"

    async def __call__(self, target: Target) -> Result:
        """Run the check, then the leak (and data) checks; a crash or overrun is a failure."""
        result = Result(self.name)

        async def whole() -> None:
            result.detail = await self.run(target, result)
            result.failures.extend(await target.checkpoint(data=self.after == "data"))

        try:
            await asyncio.wait_for(whole(), CHECK_TIMEOUT)
        except TimeoutError:
            result.failures.add(f"did not finish within {CHECK_TIMEOUT} s")
        except Exception as exc:
            result.failures.add(f"the check crashed: {exc!r}")
        return result


CHECKS = [
    Check("load", load),
    Check("disconnects", disconnects),
    Check("cancelled", cancelled),
    Check("failed commits", failed_commits),
    Check("pool exhausted", pool_exhausted, "leaks"),
    Check("postgres restart", postgres_restart),
    Check("credentials rotated", credentials_rotated, "leaks"),
    Check("isolation", isolation, "leaks"),
    Check("bad input", bad_input, "leaks"),
]


async def memory(target: Target) -> tuple[Result, str]:
    """The in-process soak, in a process of its own; returns the result and its output.

    Registry empty and no connection checked out at the end; RSS growth after the warm-up
    under 5 MB; no 5xx.
    """
    result, settings, limit = Result("memory"), target.settings, 5.0
    database = f"{target.database}_memory"
    await target.postgres.create_database(database)
    environment = {**target.environment(), "DATABASE_URL": target.postgres.app_url(database)}
    counts = [str(settings.memory_requests), str(settings.memory_warmup)]
    command = [sys.executable, "-m", "reliability.serve", "--soak", target.framework, *counts]
    try:
        completed = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, env=environment, cwd=ROOT,
            timeout=CHECK_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        result.failures.add(f"the soak did not finish within {CHECK_TIMEOUT} s")
        return result, ""
    output = completed.stdout + completed.stderr
    if completed.returncode:
        result.failures.add(f"the soak exited {completed.returncode}: {completed.stderr[-300:]}")
        return result, output
    soak = json.loads(completed.stdout.splitlines()[-1])
    growth = soak["growth_mb"]
    if soak["registry"] or soak["checkedout"]:
        result.failures.add(
            f"after the soak: {soak['registry']} registry entries, {soak['checkedout']} checked out"
        )
    if growth is None or growth > limit:
        result.failures.add(f"RSS grew {growth} MB after warm-up (limit {limit} MB)")
    # A 503 is a pool wait past its timeout (the soak drives more requests at once than the
    # pool has connections): the load and the failure checks judge those; a memory soak fails
    # on any other 5xx.
    if any(int(code) >= 500 and code != "503" for code in soak["statuses"]):
        result.failures.add(f"5xx during the soak: {soak['statuses']}")
    result.detail = (
        f"{soak['requests']:,} in-process requests: RSS {soak['rss_after_warmup']:.1f} MB after "
        f"{settings.memory_warmup:,} warm-up requests, {soak['rss_end']:.1f} MB at the end "
        f"({growth:+.1f} MB); registry {soak['registry']}, checked out {soak['checkedout']}; "
        f"{soak['statuses'].get('503', 0)} pool waits past the timeout (503)"
    )
    return result, output


def secrets(target: Target, reprs: list[str], memory_output: str) -> Result:
    """The passwords never appear in responses, logs, or the reprs of the database objects."""
    result = Result("secrets")
    forbidden = [secret.decode() for secret in target.tally.forbidden]
    log = target.log_path.read_text(errors="replace")
    result.failures.extend(target.tally.secrets)
    for where, text in (
        ("the server's log", log),
        ("the memory soak's output", memory_output),
        ("the reprs of db, engine, URL and pool", "\n".join(reprs)),
    ):
        if any(secret in text for secret in forbidden):
            result.failures.add(f"a database password appears in {where}")
    if not reprs or "***" not in reprs[0]:
        result.failures.add(f"repr(db) does not show the URL with its password masked: {reprs[:1]}")
    found = "none found" if result.passed else "found (see below)"
    result.detail = (
        f"{target.tally.sent:,} responses, {len(log.splitlines()):,} log lines "
        f"({log.count('Traceback')} tracebacks) and the reprs searched for the password and the "
        f"rotated one: {found}"
    )
    return result
