"""The real-server driver: each variant served on 127.0.0.1 and loaded by `wrk`.

Each variant runs in its own uvicorn (hypercorn for Quart) process; without `wrk`, the async
client of `benchmarks.httpclient` generates the load. For each framework and database, the
servers of every variant run side by side; each round loads every route once per variant,
the variants in a new random order. On PostgreSQL a server's pool is filled just before its
turn and emptied just after it (SIGUSR1), so that the idle servers hold no connections
(PostgreSQL allows 100).
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

from benchmarks.httpclient import hammer, wait_until_serving
from benchmarks.routes import PING, ROUTES, BenchRoute
from benchmarks.variants import Variant, variants_of

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 32


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A variant's server process and its port."""

    port: int
    process: subprocess.Popen[bytes]

    def empty_pool(self) -> None:
        """Have the server close its pooled connections; wait until it has."""
        self.process.send_signal(signal.SIGUSR1)  # the server disposes its engine
        assert self.process.stdout is not None
        answer = self.process.stdout.readline()
        if answer != b"disposed\n":
            raise RuntimeError(f"the server on port {self.port} did not empty its pool: {answer!r}")


@contextmanager
def servers(variants: list[Variant], database_url: str) -> Iterator[dict[str, Server]]:
    """Run a server per variant; yield them by variant key; stop them all at the end."""
    running: dict[str, Server] = {}
    try:
        for variant in variants:
            port = free_port()
            command = [sys.executable, "-m", "benchmarks.serve", variant.key, database_url]
            running[variant.key] = Server(
                port, subprocess.Popen([*command, str(port)], cwd=ROOT, stdout=subprocess.PIPE)
            )
        for server in running.values():
            asyncio.run(wait_until_serving(PING, server.port))
        yield running
    finally:
        processes = [server.process for server in running.values()]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


class Wrk:
    """`wrk -t1 -c32` against one server: the requests per second of one run."""

    def __init__(self, seconds: int, scripts: Path) -> None:
        self.seconds = seconds
        self.post_script = scripts / "post.lua"
        self.post_script.write_text(
            'wrk.method = "POST"\n'
            'wrk.body = \'{"name": "bench"}\'\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )

    def load(self, route: BenchRoute, port: int) -> float:
        """Load ``route`` for the configured seconds; return requests per second.

        Raises:
            RuntimeError: wrk failed, or some responses had another status than the route's.
        """
        command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{self.seconds}s"]
        if route.method == "POST":
            command += ["-s", str(self.post_script)]
        command.append(f"http://127.0.0.1:{port}{route.path}")
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        if "Non-2xx" in output or "Socket errors" in output:
            raise RuntimeError(f"{route.method} {route.path} on port {port} failed:\n{output}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", output)
        if match is None:
            raise RuntimeError(f"could not read wrk's output:\n{output}")
        return float(match.group(1))


class PythonLoad:
    """The fallback load generator: `benchmarks.httpclient.hammer` with 32 connections."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def load(self, route: BenchRoute, port: int) -> float:
        """Load ``route`` for the configured seconds; return requests per second."""
        sent, errors, elapsed = asyncio.run(hammer(route, port, CONNECTIONS, seconds=self.seconds))
        if errors:
            raise RuntimeError(f"{errors} of {sent} responses of {route.path} failed")
        return sent / elapsed


def warm(route: BenchRoute, port: int, requests_per_connection: int) -> None:
    """Send a few requests over 32 connections: code paths warm, the pool full."""
    _, errors, _ = asyncio.run(hammer(route, port, CONNECTIONS, requests=requests_per_connection))
    if errors:
        raise RuntimeError(f"{route.method} {route.path} on port {port} failed while warming")


def measure_group(
    variants: list[Variant],
    database_url: str,
    routes: list[BenchRoute],
    *,
    loader: Wrk | PythonLoad,
    rounds: int,
    shuffler: random.Random,
) -> dict[tuple[str, str], list[float]]:
    """Serve every variant of one framework on one database; load each route round by round.

    Returns:
        Requests per second, one sample per round, by (route name, variant key).
    """
    pooled = make_url(database_url).get_backend_name() == "postgresql"
    samples: dict[tuple[str, str], list[float]] = {}
    with servers(variants, database_url) as running:
        for server in running.values():
            for route in routes:
                retrying(lambda server=server, route=route: warm(route, server.port, 5))
            if pooled:
                server.empty_pool()
        for _ in range(rounds):
            for route in routes:
                order = variants[:]
                shuffler.shuffle(order)
                for variant in order:
                    rps = load_with_retries(running[variant.key], route, loader, pooled=pooled)
                    samples.setdefault((route.name, variant.key), []).append(rps)
    return samples


T = TypeVar("T")
ATTEMPTS = 6


def retrying(work: Callable[[], T]) -> T:
    """Run ``work()``; when it fails, wait 10 s and run it again, up to 6 times in all.

    The PostgreSQL server is shared with whatever else runs on the machine: when it has no
    connection left for a moment, requests fail (a 500, or a connection reset).
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return work()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            if attempt == ATTEMPTS:
                raise
            print(f"{error!r}\nretrying in 10 s", file=sys.stderr, flush=True)
            time.sleep(10)
    raise AssertionError("unreachable")


def load_with_retries(
    server: Server, route: BenchRoute, loader: Wrk | PythonLoad, *, pooled: bool
) -> float:
    """Load one server on one route, retrying; on PostgreSQL fill its pool first, empty it after."""

    def load() -> float:
        try:
            if pooled and route.uses_database:
                warm(route, server.port, 2)  # fills the pool
            return loader.load(route, server.port)
        finally:
            if pooled:
                server.empty_pool()

    return retrying(load)


def measure(
    frameworks: list[str],
    databases: dict[str, str],
    *,
    rounds: int,
    seconds: int,
    seed: int,
    only: list[tuple[str, str]] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Measure every variant of ``frameworks`` behind a real server.

    Args:
        frameworks: The frameworks to measure.
        databases: Database name -> URL; ``/ping`` is measured on the first one only.
        rounds: How many times each variant is loaded on each route.
        seconds: How long each load lasts.
        seed: Seeds the order of the variants in each round.
        only: Only these (route name, database name) pairs, when given.

    Returns:
        One record per variant, route and database, and the load generator's name.
    """
    with tempfile.TemporaryDirectory() as scripts:
        if shutil.which("wrk"):
            loader: Wrk | PythonLoad = Wrk(seconds, Path(scripts))
            generator = "wrk -t1 -c32"
        else:
            loader = PythonLoad(seconds)
            generator = "benchmarks.httpclient (wrk not found), 32 connections"
        shuffler = random.Random(seed)
        first_database = next(iter(databases))
        records = []
        for framework in frameworks:
            variants = variants_of(framework)
            for database, url in databases.items():
                routes = [
                    route
                    for route in ROUTES
                    if (route.uses_database or database == first_database)
                    and (only is None or (route.name, database) in only)
                ]
                if not routes:
                    continue
                samples = measure_group(
                    variants, url, routes, loader=loader, rounds=rounds, shuffler=shuffler
                )
                records += [
                    {
                        "driver": "server",
                        "concurrency": CONNECTIONS,
                        "framework": framework,
                        "variant": variant.key,
                        "route": route.name,
                        "database": database,
                        "seconds_per_round": seconds,
                        "rps": samples[(route.name, variant.key)],
                    }
                    for route in routes
                    for variant in variants
                ]
        return records, generator
