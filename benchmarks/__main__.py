"""`nox -s bench`: every phase of the benchmark, then results.json, results.md and bench.png.

Phases, one at a time: our own cost alone (micro), the in-process driver (a process per
framework), the real servers, database insight's cost per statement, memory. Each records how
many cores were busy outside the run.
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

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
    "insight_rounds": 31,  # paired rounds of the insight phase (insight_cost.py)
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
    "insight_rounds": 3,
}
# Issue 13's goal, and nothing else: /ping, then the read and the insert on SQLite and
# PostgreSQL at concurrency 1 and 32, and the insert on the pool of 8 at concurrency 32; every
# cell in-process and behind the server. 15 rounds, no extra ones; short samples, taken by the
# raw client behind the server (wrk samples last whole seconds), a lean warm-up: about 17
# minutes on a quiet 2-core machine (see README.md: How long).
STANDARD_CELLS = [("ping", "sqlite", 1), ("insert", "postgresql-pool8", 32)] + [
    (route, database, concurrency)
    for concurrency in (1, 32)
    for route in ("read", "insert")
    for database in ("sqlite", "postgresql")
]
STANDARD: dict[str, Any] = {
    **FULL,
    "micro": [15, 100_000],
    "sample_seconds": 0.08,
    "min_requests": 80,
    "rounds": [15, 15],
    "cells": STANDARD_CELLS,
    "server_seconds": 0.15,
    "server_rounds": [15, 15],
    "lean_warmup": True,
    "server_cells": STANDARD_CELLS,
    "memory_requests": 50_000,
}
SCALED = ("sample_seconds", "min_requests", "server_seconds", "memory_requests")


def child(scratch: str, module: str, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -m MODULE OUT ARGS`` (OUT: ``<scratch>/<module> <args>.json``)."""
    out = Path(scratch) / f"{' '.join([module, *args])[:80].replace('/', '_')}.json"
    return subprocess.Popen([sys.executable, "-m", module, str(out), *args], cwd=ROOT)


def results_of(*processes: subprocess.Popen[bytes]) -> list[Any]:
    """Wait for the children; the JSON each wrote."""
    for process in processes:
        if process.wait() != 0:
            raise subprocess.CalledProcessError(process.returncode, process.args)
    return [json.loads(Path(str(process.args[3])).read_text()) for process in processes]


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


def profile(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The settings of the profile chosen, and the results' directory under results/.

    ``--rounds`` and ``--scale`` make a trial of a profile, written to results/trial/.
    """
    settings = dict(QUICK if args.quick else STANDARD if args.standard else FULL)
    if not (args.rounds or args.scale):
        return settings, "quick" if args.quick else "standard" if args.standard else ""
    rounds = [args.rounds] * 2 if args.rounds else None
    settings.update(rounds=rounds or settings["rounds"])
    settings.update(server_rounds=rounds or settings["server_rounds"])
    scale = args.scale or 1
    settings.update({key: type(settings[key])(settings[key] * scale) for key in SCALED})
    settings["micro"] = [settings["micro"][0], int(settings["micro"][1] * scale)]
    return settings, "trial"


def main() -> None:
    parser = argparse.ArgumentParser(prog="nox -s bench --", description=__doc__)
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    exclusive.add_argument("--standard", action="store_true", help="issue 13's cells, ~17 min")
    parser.add_argument("--rounds", type=int, help="exactly this many rounds (a trial run)")
    parser.add_argument("--scale", type=float, help="samples this much longer (a trial run)")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=FRAMEWORKS)
    args = parser.parse_args()
    settings, name = profile(args)
    out: Path = args.out or ROOT / "benchmarks" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    started, log = time.time(), []
    serving = [f for f in args.frameworks if f in settings.get("server_frameworks", FRAMEWORKS)]
    postgres = os.environ.get(
        "ALCHEMY_SCOPE_BENCH_POSTGRES", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    )
    with tempfile.TemporaryDirectory(prefix="alchemy-scope-bench-") as scratch:
        sqlite = f"sqlite+aiosqlite:///{scratch}/bench.db"
        settings["databases"] = {name: sqlite if name == "sqlite" else postgres for name in POOLS}
        for key in ("cells", "server_cells"):
            chosen = [Cell(*c) for c in settings[key]] if key in settings else cells(list(POOLS))
            settings[key] = [cell.__dict__ for cell in chosen]
        databases = {"sqlite": sqlite, "postgresql": postgres}
        database_versions = asyncio.run(tables(databases, create_table))
        try:
            micro = phase(log, "micro", lambda: results_of(
                child(scratch, "benchmarks.micro", *map(str, settings["micro"]))
            )[0])  # fmt: skip
            records = []
            for framework in args.frameworks:
                records += phase(log, f"asgi {framework}", lambda f=framework: results_of(
                    child(scratch, "benchmarks.inprocess", f, json.dumps(settings))
                )[0])  # fmt: skip
            served, generator = phase(log, "server", lambda: server.measure(serving, settings))
            records += served
            insight = phase(log, "insight", lambda: results_of(
                child(scratch, "benchmarks.insight_cost", str(settings["insight_rounds"]))
            )[0])  # fmt: skip
            memory = phase(log, "memory", lambda: results_of(*(  # side by side
                child(scratch, "benchmarks.memory", "starlette", variant, sqlite,
                      str(settings["memory_requests"]))
                for variant in ("baseline", "manual")
            )))  # fmt: skip
        finally:
            asyncio.run(tables(databases, drop_table))
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
        "insight": insight,
        "memory": memory,
        "records": summary,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plot(summary, out / "bench.png")
    print(f"Results in {out}: results.json, results.md, bench.png", flush=True)


async def tables(databases: dict[str, str], do: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    """``do(engine)`` on every database (creating or dropping the table); what each returned."""
    found = {}
    for name, url in databases.items():
        bound = engine(name, url)
        found[name] = await do(bound)
        await bound.dispose()
    return found


main()
