"""Many workers: one example under ``uvicorn --workers``, through PgBouncer, with a standby.

The suite's private PostgreSQL is the primary; a streaming standby is cloned from it
(``pg_basebackup -R``) on another free port, and a private PgBouncer in transaction mode
(:mod:`tooling.pgbouncer`, docs/pgbouncer.md's settings, scram-sha-256) stands in front of the
primary. The example runs as ``uvicorn reliability.workers_app:app --workers 4`` (child
processes) with ``DATABASE_URL`` on PgBouncer, ``DATABASE_PGBOUNCER=1`` and
``DATABASE_REPLICA_URLS`` on the standby (direct), pools of 5 per worker. Then:

1. **load**: ``CONCURRENCY`` clients at once for ``STEADY_SECONDS``: a quarter of them write
   (creates, which get the bookmark cookie) and read, the others only read (lists, reads by
   id, the harness's ``where``). No 5xx, no request hung, reads served by the standby.
2. **replica stopped**: the standby is stopped (fast shutdown) under the same load for
   ``DOWN_SECONDS``: reads move to the primary; requests may fail only within one health-check
   interval (``CHECK_INTERVAL``) of each other.
3. **replica back**: it is started again; a probe on fresh connections (``GET
   /__harness/where``, ``SELECT pg_is_in_recovery()`` through ``db.session``) waits until every
   worker reads from it again, then the load goes on for ``AFTER_SECONDS``. No failure.
4. **leaks**: ``GET /__leaks`` on fresh connections until each of the 4 workers (by pid)
   answered: no session in its registry, no connection checked out of its primary's or its
   replica's pool; no backend idle in transaction on either server. **rows**: the table holds
   exactly the acknowledged todos.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tooling.pgbouncer import PrivatePgBouncer, pgbouncer_binary
from tooling.postgres import APP_ROLE, PrivatePostgres
from tooling.servers import loopback_socket

from .client import HUNG_AFTER, Failures, Ledger, Tally, percentile, send

# The run's size: ≥ 200 clients at once (issue 15), held for a bounded time. With the start of
# 4 workers, the clone and the teardown it adds about 50 s to `nox -s reliability` on 2 cores
# (the budget is 90 s); --quick shortens the phases, not the concurrency.
WORKERS = 4  # uvicorn --workers: child processes
CONCURRENCY = 200  # clients at once, each on one keep-alive connection
WRITERS = CONCURRENCY // 4  # of which write (and get the bookmark cookie); the rest only read
STEADY_SECONDS = 15.0  # load before the standby is stopped
DOWN_SECONDS = 6.0  # load while it is stopped
AFTER_SECONDS = 4.0  # load once every worker reads from it again
QUICK_SECONDS = (6.0, 4.0, 2.0)  # the same three with --quick
RECOVERY_TIMEOUT = 20.0  # seconds for every worker to read from the restarted standby
CHECK_INTERVAL = 1.0  # Replicas' default health check (the example keeps it)
FRAMEWORK = "fastapi"
DATABASE = "reliability_workers"
POOL_SIZE, POOL_TIMEOUT = 5, 5  # per worker and server, as the other checks
REPLICATION_HBA = "local replication postgres trust\n"  # the standby's clone, over the socket
ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / "reliability" / "logs"


@dataclass
class Sample:
    """One answer of the load or the probe."""

    kind: str
    started: float
    ended: float
    outcome: str
    replica: bool | None = None
    pid: int | None = None

    @property
    def failed(self) -> bool:
        """A 5xx, no answer, or a cut response."""
        return not self.outcome.isdigit() or int(self.outcome) >= 500


@dataclass
class WorkersRun:
    """What the run found."""

    failures: Failures = field(default_factory=Failures)
    tally: Tally = field(default_factory=lambda: Tally(forbidden=()))
    samples: list[Sample] = field(default_factory=list)
    probes: list[Sample] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    leaks: dict[int, list[str]] = field(default_factory=dict)  # pid -> leaks found
    rows_found: int = 0
    stopped: float = 0.0  # when the standby's stop began
    restarted: float = 0.0  # when it accepted connections again
    window: float = 0.0  # first to last failure while it was down
    last_failure_after_stop: float | None = None
    recovery: float | None = None  # restart to every worker reading from it
    moved: float | None = None  # stop to every worker reading from the primary
    seconds: float = 0.0
    detail: str = ""
    row: list[object] = field(default_factory=list)


class Stack:
    """The standby, PgBouncer and the uvicorn parent, stopped in reverse order."""

    def __init__(self, primary: PrivatePostgres, binary: str, log: Path) -> None:
        self.primary, self.binary, self.log_path = primary, binary, log
        self.standby = PrivatePostgres(prefix="alchemy-scope-reliability-standby-")
        while self.standby.port == primary.port:
            self.standby.remove()
            self.standby = PrivatePostgres(prefix="alchemy-scope-reliability-standby-")
        self.standby.password = primary.password  # the app's role is the primary's, replicated
        self.bouncer: PrivatePgBouncer | None = None
        self.server: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """The workers' shared address."""
        return f"http://127.0.0.1:{self.port}"

    def start_servers(self) -> None:
        """Clone and start the standby, then start PgBouncer in front of the primary."""
        self.primary.run(
            "pg_basebackup", "-D", str(self.standby.data), "-h", str(self.primary.root),
            "-p", str(self.primary.port), "-U", "postgres", "-R", "-X", "stream", "-c", "fast",
            "--no-sync",
        )  # fmt: skip
        self.standby.start()
        self.bouncer = PrivatePgBouncer(
            self.binary, self.primary.app_url(DATABASE), users={APP_ROLE: self.primary.password}
        )
        self.bouncer.start()

    def environment(self) -> dict[str, str]:
        """The workers' environment: PgBouncer, its asyncpg options, the standby as replica."""
        assert self.bouncer is not None
        url = self.primary.app_url(DATABASE).replace(
            f":{self.primary.port}/", f":{self.bouncer.port}/"
        )
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
            "RELIABILITY_FRAMEWORK": FRAMEWORK,
            "DATABASE_URL": url,
            "DATABASE_PGBOUNCER": "1",
            "DATABASE_REPLICA_URLS": self.standby.app_url(DATABASE),
            "DATABASE_POOL_SIZE": str(POOL_SIZE),
            "DATABASE_MAX_OVERFLOW": "0",
            "DATABASE_POOL_TIMEOUT": str(POOL_TIMEOUT),
        }

    def start_workers(self) -> None:
        """Create the tables on the primary, then start ``uvicorn --workers``."""
        direct = {**self.environment(), "DATABASE_URL": self.primary.app_url(DATABASE)}
        del direct["DATABASE_REPLICA_URLS"], direct["DATABASE_PGBOUNCER"]
        subprocess.run(
            [sys.executable, "-m", "reliability.serve", "--create", FRAMEWORK],
            cwd=ROOT, env=direct, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        with loopback_socket() as probe:
            self.port = probe.getsockname()[1]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "reliability.workers_app:app",
             "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", str(self.port),
             "--backlog", "2048", "--no-access-log", "--log-level", "info"],
            cwd=ROOT, env=self.environment(), stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("w"), text=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the workers (SIGTERM: the apps' shutdown runs), PgBouncer, the standby."""
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.bouncer is not None:
            self.bouncer.remove()
        self.standby.remove()


async def _where(client: httpx.AsyncClient, run: WorkersRun, kind: str) -> Sample:
    """``GET /__harness/where``: which server read it, which worker answered."""
    started = time.monotonic()
    answer = await send(client, run.tally, "GET", "/__harness/where", timeout=HUNG_AFTER)
    sample = Sample(kind, started, time.monotonic(), answer.outcome)
    if answer.status == 200:
        body = answer.json()
        sample.replica, sample.pid = body["replica"], body["pid"]
    return sample


async def _until(url: str, predicate: Any, timeout: float, what: str) -> None:
    """Call ``predicate(answer)`` on fresh connections until it is true; raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=_FRESH) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if await predicate(client):
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


_FRESH = httpx.Limits(max_keepalive_connections=0)  # a new connection (and worker) each time


async def _all_workers_read_from(url: str, run: WorkersRun, replica: bool, timeout: float) -> float:
    """Probe until each worker answered ``where`` from a replica (or the primary); how long."""
    started, seen = time.monotonic(), set[int]()

    async def probe(client: httpx.AsyncClient) -> bool:
        sample = await _where(client, run, "probe")
        run.probes.append(sample)
        if sample.pid is not None:
            if sample.replica == replica:
                seen.add(sample.pid)
            else:
                seen.discard(sample.pid)
        return len(seen) >= WORKERS

    server = "the replica" if replica else "the primary"
    try:
        await _until(url, probe, timeout, f"not every worker read from {server}")
    except TimeoutError as error:
        answers = Counter((s.pid, s.replica, s.outcome) for s in run.probes[-40:])
        raise TimeoutError(f"{error}; the last probes (pid, replica, status): {answers}") from None
    return time.monotonic() - started


async def _load(url: str, run: WorkersRun, stop: asyncio.Event) -> None:
    """``CONCURRENCY`` clients until ``stop``: writers create and read; readers read."""
    rng, counter = random.Random(15), iter(range(10**9))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

    async def client_loop(client: httpx.AsyncClient, writer: bool) -> None:
        mine: list[int] = []  # a writer reads its own writes (its bookmark cookie says where)
        while not stop.is_set():
            roll, started = rng.random(), time.monotonic()
            if writer and (roll < 0.5 or not mine):
                title = f"workers {next(counter)}"
                run.ledger.unknown.add(title)
                answer = await send(client, run.tally, "POST", "/todos", json={"title": title})
                if answer.status == 201:
                    run.ledger.ack(answer.json())
                    mine.append(answer.json()["id"])
                elif answer.status is not None and answer.status < 500:
                    run.ledger.unknown.discard(title)
                    run.ledger.refused.add(title)
                kind, expected = "create", 201
            elif writer:
                kind, expected = "get", 200
                answer = await send(client, run.tally, "GET", f"/todos/{rng.choice(mine)}")
            elif roll < 0.75:
                sample = await _where(client, run, "where")
                run.samples.append(sample)
                if sample.outcome != "200" and not sample.failed:
                    run.failures.add(f"where: {sample.outcome}, expected 200")
                continue
            else:
                kind, expected = "list", 200
                offset = rng.randrange(max(1, len(run.ledger.ids)))
                answer = await send(client, run.tally, "GET", f"/todos?limit=20&offset={offset}")
            run.samples.append(Sample(kind, started, time.monotonic(), answer.outcome))
            if answer.status is not None and answer.status < 500 and answer.status != expected:
                body = answer.body[:100]
                run.failures.add(f"{kind}: {answer.outcome} {body!r}, expected {expected}")

    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, limits=limits, timeout=HUNG_AFTER)
            )
            for _ in range(CONCURRENCY)
        ]
        await asyncio.gather(
            *(client_loop(client, index < WRITERS) for index, client in enumerate(clients))
        )


async def _leaks(stack: Stack, run: WorkersRun, timeout: float = 20.0) -> None:
    """Collect ``/__leaks`` from every worker (by pid); servers' idle-in-transaction backends."""
    reports: dict[int, list[str]] = {}

    async def probe(client: httpx.AsyncClient) -> bool:
        report = (await client.get("/__leaks")).json()
        found = [
            f"{report[key]} {what}"
            for key, what in [
                ("registry", "session(s) in the registry"),
                ("checkedout", "connection(s) checked out of the primary's pool"),
                ("replica_checkedout", "connection(s) checked out of the replica's pool"),
            ]
            if report[key]
        ]
        if not found or report["pid"] not in reports:
            reports[report["pid"]] = found
        return len(reports) >= WORKERS and not any(reports.values())

    with contextlib.suppress(TimeoutError):
        await _until(stack.base_url, probe, timeout, "leaks")
    run.leaks = reports
    if len(reports) < WORKERS:
        run.failures.add(f"only {len(reports)} of {WORKERS} workers answered /__leaks")
    for pid, found in reports.items():
        run.failures.extend(f"worker {pid}: {leak}" for leak in found)
    for name, server in [("primary", stack.primary), ("standby", stack.standby)]:
        ((idle,),) = await server.admin(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state LIKE 'idle in transaction%'",
            database=DATABASE,
        )
        if idle:
            run.failures.add(f"{idle} backend(s) idle in transaction on the {name}")


def _every_worker(run: WorkersRun, since: float, replica: bool) -> float | None:
    """Seconds from ``since`` until each worker's first load read on a replica (or the primary).

    ``None`` while a worker has not answered one yet.
    """
    first: dict[int, float] = {}
    for sample in run.samples:
        pid = sample.pid
        if pid is None or sample.kind != "where" or sample.started <= since:
            continue
        if sample.replica == replica and pid not in first:
            first[pid] = sample.ended
    return max(first.values()) - since if len(first) >= WORKERS else None


def _judge(run: WorkersRun) -> None:
    """No failure outside the standby's stop; within it, one health-check interval at most."""
    outside = [s for s in run.samples if s.failed and not run.stopped <= s.ended <= run.restarted]
    for sample in outside[:8]:
        when = "before the stop" if sample.ended < run.stopped else "after the restart"
        run.failures.add(f"{sample.kind} {when}: {sample.outcome}")
    if len(outside) > 8:
        run.failures.count += len(outside) - 8
    inside = [s for s in run.samples if s.failed and run.stopped <= s.ended <= run.restarted]
    if inside:
        # How long after the stop a request sent could still fail: the window; the answers
        # of those requests came up to one response time later (the queue of 200 clients).
        run.window = max(0.0, max(s.started for s in inside) - run.stopped)
        run.last_failure_after_stop = max(s.ended for s in inside) - run.stopped
        if run.window > CHECK_INTERVAL:
            run.failures.add(
                f"requests sent {run.window:.2f} s after the standby's stop still failed "
                f"(more than one health-check interval, {CHECK_INTERVAL} s)"
            )
    steady = [s for s in run.samples if s.kind == "where" and s.ended < run.stopped]
    if not any(s.replica for s in steady):
        run.failures.add("no read of the load ran on the standby before it was stopped")
    down = [s for s in run.samples if s.kind == "where" and s.outcome == "200"
            and run.stopped + CHECK_INTERVAL < s.started and s.ended < run.restarted]  # fmt: skip
    if any(s.replica for s in down):
        run.failures.add("a read ran on the standby while it was stopped")
    if not down:
        run.failures.add("no read answered while the standby was stopped")


async def many_workers(  # noqa: PLR0915 - the run's phases, in order
    primary: PrivatePostgres, logs: Path, quick: bool = False
) -> WorkersRun:
    """The whole run against ``primary`` (which must allow ``REPLICATION_HBA``)."""
    run, began = WorkersRun(tally=Tally(forbidden=(primary.password.encode(),))), time.monotonic()
    steady, down, after = QUICK_SECONDS if quick else (STEADY_SECONDS, DOWN_SECONDS, AFTER_SECONDS)
    binary = pgbouncer_binary()
    if binary is None:
        run.failures.add("pgbouncer is not installed: apt-get install -y pgbouncer")
        run.detail = "not run"
        return run
    await primary.create_database(DATABASE)
    stack = Stack(primary, binary, logs / "workers.log")
    try:
        await asyncio.to_thread(stack.start_servers)
        await asyncio.to_thread(stack.start_workers)

        async def healthy(client: httpx.AsyncClient) -> bool:
            return (await client.get("/health")).status_code == 200

        await _until(stack.base_url, healthy, 60, "uvicorn --workers did not answer /health")
        await _all_workers_read_from(stack.base_url, run, replica=True, timeout=30)
        run.probes.clear()
        stop, loaded = asyncio.Event(), time.monotonic()
        load = asyncio.create_task(_load(stack.base_url, run, stop))
        try:
            await asyncio.sleep(steady)
            run.stopped = time.monotonic()
            await asyncio.to_thread(stack.standby.stop)
            await asyncio.sleep(down)
            run.moved = _every_worker(run, run.stopped, replica=False)
            await asyncio.to_thread(stack.standby.start)
            run.restarted = time.monotonic()
            deadline = run.restarted + RECOVERY_TIMEOUT
            while run.recovery is None:
                run.recovery = _every_worker(run, run.restarted, replica=True)
                if run.recovery is None and time.monotonic() > deadline:
                    run.failures.add(
                        f"not every worker read from the restarted standby in {RECOVERY_TIMEOUT} s"
                    )
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(after)
        finally:
            stop.set()
            await load
        loaded = time.monotonic() - loaded
        _judge(run)
        await _leaks(stack, run)
        titles = {
            row[0] for row in await primary.admin("SELECT title FROM todos", database=DATABASE)
        }
        run.failures.extend(run.ledger.check(titles))
        run.rows_found = len(titles)
    finally:
        await asyncio.to_thread(stack.stop)
    log = stack.log_path.read_text(errors="replace")
    if primary.password in log:
        run.failures.add("the database password appears in the workers' log")
    run.failures.extend(run.tally.secrets)
    run.seconds = time.monotonic() - began
    _describe(run, loaded)
    return run


def _describe(run: WorkersRun, loaded: float) -> None:
    """The one-line account and the table's row."""
    answered = [s for s in run.samples if not s.failed]
    reads = [s for s in run.samples if s.kind == "where" and s.outcome == "200"]
    phases: dict[str, Callable[[Sample], bool]] = {
        "before the stop": lambda s: s.ended < run.stopped,
        "while stopped": lambda s: run.stopped <= s.ended <= run.restarted,
        "after the restart": lambda s: s.ended > run.restarted,
    }
    on_replica = "; ".join(
        f"{name} {sum(bool(s.replica) for s in reads if of(s)):,} of {sum(map(of, reads)):,}"
        for name, of in phases.items()
    )
    pids = sorted(run.leaks)
    leaks = ", ".join(f"{len(run.leaks[pid])}" for pid in pids) or "none answered"
    kinds = Counter(s.kind for s in run.samples)
    mix = ", ".join(f"{kind} {count:,}" for kind, count in sorted(kinds.items()))
    latencies = [s.ended - s.started for s in answered]
    p50, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
    recovery = "never" if run.recovery is None else f"{run.recovery:.1f} s"
    moved = "not seen" if run.moved is None else f"{run.moved:.1f} s"
    failed = sum(s.failed for s in run.samples)
    outside = sum(s.failed and not run.stopped <= s.ended <= run.restarted for s in run.samples)
    run.detail = (
        f"{len(run.samples):,} requests ({mix}) from {CONCURRENCY} clients at once in"
        f" {loaded:.0f} s ({len(run.samples) / loaded:,.0f}/s), p50 {p50:.0f} ms, p99 {p99:.0f} ms;"
        f" {WORKERS} uvicorn workers (pids {', '.join(map(str, pids))}), leaks per worker {leaks};"
        f" `where` reads on the standby: {on_replica};"
        f" standby stopped: {failed} request(s) failed, the last sent {run.window:.2f} s after"
        f" the stop (answered {run.last_failure_after_stop or 0:.2f} s after it), every worker"
        f" on the primary after {moved}; restarted: every worker on the standby again after"
        f" {recovery};"
        f" todos {len(run.ledger.acked):,} acknowledged / {run.rows_found:,} found;"
        f" {run.seconds:.0f} s in all"
    )
    run.row = [
        f"{FRAMEWORK}, uvicorn --workers {WORKERS}, PgBouncer, 1 standby",
        f"{len(run.samples):,}",
        run.tally.status_line(),
        f"{failed} ({outside} outside the standby's stop)",
        leaks,
        f"{len(run.ledger.acked):,} / {run.rows_found:,}",
        f"{run.window:.2f} s",
        recovery,
        "pass" if not run.failures else f"**FAIL** ({run.failures.count})",
    ]


HEADERS = ["Run", "Requests", "Responses by status", "Failed (5xx, cut, hung)",
           "Leaks per worker", "Todos acknowledged / found",
           "Failure window after the standby's stop", "Every worker reads from it again after",
           "Result"]  # fmt: skip


async def _main(quick: bool) -> int:
    """``python -m reliability.workers [--quick]``: the run alone, on a primary of its own."""
    primary = PrivatePostgres(hba=REPLICATION_HBA, prefix="alchemy-scope-reliability-")
    try:
        primary.create()
        await primary.create_app_role()
        logs = LOGS
        logs.mkdir(exist_ok=True)
        run = await many_workers(primary, logs, quick)
    finally:
        primary.remove()
    print(run.detail)
    for example in run.failures.examples:
        print("   ", example)
    print("pass" if not run.failures else f"FAIL ({run.failures.count})")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main("--quick" in sys.argv[1:])))
