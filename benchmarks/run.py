"""`nox -s bench`: every phase of the benchmark, then results.json, results.md and bench.png.

Phases, in this order: the middleware micro-benchmark, the in-process ASGI driver (a process
per framework), the real servers, and memory. Timing phases run one at a time; the machine's
load average is recorded before and after each of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks import report, server
from benchmarks.models import TABLE, create_table, drop_table
from benchmarks.variants import FRAMEWORKS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
POSTGRES_ENV = "ALCHEMY_SCOPE_BENCH_POSTGRES"
DEFAULT_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PACKAGES = [
    "alchemy-scope", "sqlalchemy", "starlette", "fastapi", "litestar", "quart", "uvicorn",
    "hypercorn", "uvloop", "httptools", "aiosqlite", "asyncpg", "pydantic",
    "fastapi-async-sqlalchemy", "advanced-alchemy",
]  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """How long each phase measures: the full run, or the one-minute smoke run."""

    micro_rounds: int
    micro_calls: int
    asgi_rounds: int
    asgi_batch_seconds: float
    server_rounds: int
    server_seconds: int
    server_routes: list[tuple[str, str]] | None
    memory_requests: int


FULL = Settings(30, 100_000, 12, 0.05, 3, 1, None, 100_000)
QUICK = Settings(3, 20_000, 2, 0.02, 1, 1, [("ping", "sqlite"), ("insert", "postgresql")], 10_000)


def load_average() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_quiet(limit: float, patience: float) -> None:
    """Wait (up to ``patience`` seconds) until the 1-minute load average is at most ``limit``."""
    deadline = time.monotonic() + patience
    while load_average() > limit and time.monotonic() < deadline:
        print(f"load average {load_average():.2f} > {limit}: waiting", flush=True)
        time.sleep(20)


def python_module(*args: str, attempts: int = 2) -> None:
    """Run ``python -m ARGS`` from the repository root; try again once if it fails.

    The PostgreSQL server is shared: a run can fail for want of a free connection.
    """
    for attempt in range(1, attempts + 1):
        try:
            subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True)
            return
        except subprocess.CalledProcessError:
            if attempt == attempts:
                raise
            print("failed: trying again in 10 s", file=sys.stderr, flush=True)
            time.sleep(10)


async def prepare(databases: dict[str, str]) -> dict[str, str]:
    """Create the bench table on every database; return each database's version."""
    versions = {}
    for name, url in databases.items():
        engine = create_async_engine(url)
        try:
            await create_table(engine)
            query = "select sqlite_version()" if name == "sqlite" else "select version()"
            async with engine.connect() as connection:
                versions[name] = str(await connection.scalar(text(query)))
        finally:
            await engine.dispose()
    return versions


async def clean_up(databases: dict[str, str]) -> None:
    """Drop the bench table everywhere."""
    for url in databases.values():
        engine = create_async_engine(url)
        try:
            await drop_table(engine)
        finally:
            await engine.dispose()


def environment(database_versions: dict[str, str], generator: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "packages": versions,
        "databases": database_versions,
        "load_generator": generator,
    }


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since it booted (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the measuring processes)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


class Phases:
    """Runs the phases and records how long each took and how busy the machine was."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    def run(self, name: str, work: Any) -> Any:
        """Run ``work()`` as the phase ``name``.

        Besides the load averages, it records how many cores were busy on average outside
        the processes of this run: other work on the machine, and the PostgreSQL server.
        """
        print(f"== {name} (load average {load_average():.2f})", flush=True)
        started, load_before = time.monotonic(), os.getloadavg()
        busy_before, own_before = busy_cpu_seconds(), own_cpu_seconds()
        result = work()
        seconds = time.monotonic() - started
        others = (busy_cpu_seconds() - busy_before) - (own_cpu_seconds() - own_before)
        print(f"   {seconds:.0f} s, {others / seconds:.2f} cores busy outside", flush=True)
        self.log.append(
            {
                "phase": name,
                "seconds": round(seconds, 1),
                "cores_busy_outside": round(max(0.0, others) / seconds, 2),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
        return result


def main() -> None:
    """Parse the options, run every phase and write the results."""
    parser = argparse.ArgumentParser(prog="nox -s bench --", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=FRAMEWORKS)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for a 1-minute load average of at most 0.7",
    )
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    out: Path = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.wait_for_quiet:
        wait_for_quiet(0.7, args.wait_for_quiet)
    started = time.time()
    command = "nox -s bench" + (" -- " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")

    with tempfile.TemporaryDirectory(prefix="alchemy-scope-bench-") as scratch:
        databases = {
            "sqlite": f"sqlite+aiosqlite:///{scratch}/bench.db",
            "postgresql": os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES),
        }
        print(f"Bench table {TABLE} on {', '.join(databases)}", flush=True)
        database_versions = asyncio.run(prepare(databases))
        phases = Phases()
        try:
            micro_file = Path(scratch) / "micro.json"
            phases.run(
                "micro",
                lambda: python_module(
                    "benchmarks.micro",
                    str(micro_file),
                    f"--rounds={settings.micro_rounds}",
                    f"--calls={settings.micro_calls}",
                    f"--seed={args.seed}",
                ),
            )
            records: list[dict[str, Any]] = []
            for framework in args.frameworks:
                asgi_file = Path(scratch) / f"asgi-{framework}.json"
                phases.run(
                    f"asgi {framework}",
                    lambda framework=framework, asgi_file=asgi_file: python_module(
                        "benchmarks.inprocess",
                        framework,
                        str(asgi_file),
                        f"--databases={json.dumps(databases)}",
                        "--concurrency=1",
                        "--concurrency=32",
                        f"--rounds={settings.asgi_rounds}",
                        f"--batch-seconds={settings.asgi_batch_seconds}",
                        f"--seed={args.seed}",
                    ),
                )
                records += json.loads(asgi_file.read_text())
            server_records, generator = phases.run(
                "server",
                lambda: server.measure(
                    args.frameworks,
                    databases,
                    rounds=settings.server_rounds,
                    seconds=settings.server_seconds,
                    seed=args.seed,
                    only=settings.server_routes,
                ),
            )
            records += server_records
            memory = phases.run(
                "memory", lambda: measure_memory(databases["sqlite"], settings, Path(scratch))
            )
            micro = json.loads(micro_file.read_text())
        finally:
            asyncio.run(clean_up(databases))

    summary = report.summarize(records)
    checks = report.check_targets(summary)
    results = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started),
        "settings": settings.__dict__,
        "environment": environment(database_versions, generator),
        "phases": phases.log,
        "micro": micro,
        "memory": memory,
        "records": summary,
        "targets": checks,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.results_markdown(results))
    report.plot(summary, out / "bench.png")
    print(f"Results in {out}: results.json, results.md, bench.png", flush=True)


def measure_memory(sqlite_url: str, settings: Settings, scratch: Path) -> list[dict[str, Any]]:
    """RSS and tracemalloc of Starlette, bare and with alchemy-scope, side by side.

    The two processes run at the same time: memory does not mind sharing the CPU.
    """
    files = {
        key: scratch / f"memory-{key.replace('/', '-')}.json"
        for key in ("starlette/bare", "starlette/alchemy_scope")
    }
    requests = f"--requests={settings.memory_requests}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.memory", key, sqlite_url, str(path), requests],
            cwd=ROOT,
        )
        for key, path in files.items()
    ]
    for process in processes:
        if process.wait() != 0:
            raise subprocess.CalledProcessError(process.returncode, process.args)
    return [json.loads(path.read_text()) for path in files.values()]
