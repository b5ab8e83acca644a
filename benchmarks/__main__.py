"""`nox -s bench`: every phase of the benchmark, then results.json, results.md and bench.png.

Phases, one at a time: our own cost alone (micro), the in-process driver (a process per
framework), the real servers, memory. Each records how many cores were busy outside the run.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import report, server
from benchmarks.variants import FRAMEWORKS, POOLS, Cell, cells, create_table, drop_table, engine
from tooling.report import revision, versions

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["alchemy-scope", "sqlalchemy", "starlette", "fastapi", "litestar", "quart", "uvicorn",
            "hypercorn", "uvloop", "httptools", "aiosqlite", "asyncpg", "pydantic"]  # fmt: skip
FULL: dict[str, Any] = {
    "micro": [30, 100_000],
    "sample_seconds": 0.25,  # in-process: each sample lasts about this long...
    "min_requests": 200,  # ...and has at least this many requests
    "rounds": [15, 30],  # at least 15 rounds; up to 30 while an IQR is wider than ±3 %
    "server_seconds": 1,
    "server_rounds": [15, 20],
    "memory_requests": 100_000,
}
QUICK: dict[str, Any] = {  # every framework and variant, a few cells, short samples
    **FULL,
    "micro": [3, 20_000],
    "sample_seconds": 0.01,
    "min_requests": 32,
    "rounds": [3, 3],
    "cells": [
        ("ping", "sqlite", 1),
        ("read", "postgresql", 1),
        ("insert", "sqlite", 32),
        ("read", "postgresql-pool8", 32),
    ],
    "server_seconds": 0.3,
    "server_rounds": [1, 1],
    "server_cells": [("insert", "postgresql-pool8", 32)],
    "server_frameworks": ["starlette", "quart"],  # uvicorn and hypercorn
    "memory_requests": 5_000,
}


def python_module(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True)


def cpu_seconds() -> tuple[float, float]:
    """The machine's busy CPU seconds since boot, and those of this run's processes."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return busy, own


def phase(log: list[dict[str, Any]], name: str, work: Callable[[], Any]) -> Any:
    """Run ``work()``; note how long it took and how busy the machine was outside the run."""
    print(f"== {name} (load average {os.getloadavg()[0]:.2f})", flush=True)
    started, (busy, own) = time.monotonic(), cpu_seconds()
    result = work()
    seconds, (busy_after, own_after) = time.monotonic() - started, cpu_seconds()
    outside = max(0.0, (busy_after - busy) - (own_after - own)) / seconds
    print(f"   {seconds:.0f} s, {outside:.2f} cores busy outside the run", flush=True)
    log.append(
        {"phase": name, "seconds": round(seconds, 1), "cores_busy_outside": round(outside, 2)}
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="nox -s bench --", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=FRAMEWORKS)
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    out: Path = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    started, log = time.time(), []
    serving = [f for f in args.frameworks if f in settings.get("server_frameworks", FRAMEWORKS)]
    with tempfile.TemporaryDirectory(prefix="alchemy-scope-bench-") as scratch:
        postgres = os.environ.get(
            "ALCHEMY_SCOPE_BENCH_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
        )
        sqlite = f"sqlite+aiosqlite:///{scratch}/bench.db"
        settings["databases"] = {name: sqlite if name == "sqlite" else postgres for name in POOLS}
        for key in ("cells", "server_cells"):
            chosen = (
                [Cell(*cell) for cell in settings[key]] if key in settings else cells(list(POOLS))
            )
            settings[key] = [cell.__dict__ for cell in chosen]
        databases = {"sqlite": settings["databases"]["sqlite"], "postgresql": postgres}

        async def prepare() -> dict[str, str]:
            found = {}
            for name, url in databases.items():
                bound = engine(name, url)
                found[name] = await create_table(bound)
                await bound.dispose()
            return found

        database_versions = asyncio.run(prepare())
        try:
            micro_file = Path(scratch) / "micro.json"
            phase(
                log,
                "micro",
                lambda: python_module(
                    "benchmarks.micro", str(micro_file), *map(str, settings["micro"])
                ),
            )
            records = []
            for framework in args.frameworks:
                path = Path(scratch) / f"asgi-{framework}.json"
                phase(
                    log,
                    f"asgi {framework}",
                    lambda f=framework, p=path: python_module(
                        "benchmarks.inprocess", f, str(p), json.dumps(settings)
                    ),
                )
                records += json.loads(path.read_text())
            served, generator = phase(
                log,
                "server",
                lambda: server.measure(serving, settings),
            )
            records += served
            memory = phase(log, "memory", lambda: measure_memory(settings, Path(scratch)))
            micro = json.loads(micro_file.read_text())
        finally:

            async def clean_up() -> None:
                for name, url in databases.items():
                    bound = engine(name, url)
                    await drop_table(bound)
                    await bound.dispose()

            asyncio.run(clean_up())
    summary = report.summarize(records)
    results = {
        "command": "nox -s bench" + (" -- " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(time.time() - started),
        "revision": revision("core", "adapters", "benchmarks"),
        "settings": settings,
        "environment": {
            "python": platform.python_version(),
            "cpu": re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())[0],
            "cores": os.cpu_count(),
            "packages": versions(PACKAGES),
            "databases": database_versions,
            "load_generator": generator,
        },
        "phases": log,
        "micro": micro,
        "memory": memory,
        "records": summary,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plot(summary, out / "bench.png")
    print(f"Results in {out}: results.json, results.md, bench.png", flush=True)


def measure_memory(settings: dict[str, Any], scratch: Path) -> list[dict[str, Any]]:
    """Starlette's baseline and alchemy-scope (manual), in two processes side by side."""
    files = {variant: scratch / f"memory-{variant}.json" for variant in ("baseline", "manual")}
    url, requests = settings["databases"]["sqlite"], str(settings["memory_requests"])
    command = [sys.executable, "-m", "benchmarks.memory", "starlette"]
    processes = [
        subprocess.Popen([*command, v, url, str(p), requests], cwd=ROOT) for v, p in files.items()
    ]
    for process in processes:
        if process.wait() != 0:
            raise subprocess.CalledProcessError(process.returncode, process.args)
    return [json.loads(path.read_text()) for path in files.values()]


main()
