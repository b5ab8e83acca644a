"""Run the reliability checks: ``python -m reliability [--quick] [FRAMEWORK ...]``.

Starts a private PostgreSQL, then for each example (all of ``examples/*/app.py`` unless some
are named): serves it and runs every check against it, the memory soak in a process of its
own meanwhile; then checks that the database password never showed. Prints the tables and
writes them to ``reliability/results.md`` (``results-quick.md`` with ``--quick``). Exits 1 if
any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tooling.report import revision, versions

from .checks import CHECKS, Check, Result
from .client import Tally
from .fuzz import Fuzzer
from .postgres import PrivatePostgres
from .report import FrameworkReport, checks_table, details, summary_table
from .serve import examples, server_for
from .target import QUICK, ROOT, Settings, Target

CHECK_TIMEOUT = 240  # seconds: a check still running then has hung
HERE = Path(__file__).resolve().parent
LOGS = HERE / "logs"  # the servers' logs of the last run (git-ignored)
VERSIONS = ["starlette", "fastapi", "litestar", "quart"]
VERSIONS += ["uvicorn", "hypercorn", "sqlalchemy", "asyncpg"]

printed: list[str] = []


def say(line: str = "") -> None:
    """Print a line of the run's output (kept, to check it for the password too)."""
    printed.append(line)
    print(line, flush=True)


async def bounded(name: str, run: Check, target: Target) -> Result:
    """Run one check; a check that raises or overruns fails instead of stopping the run."""
    started = time.perf_counter()
    try:
        result = await asyncio.wait_for(run(target), CHECK_TIMEOUT)
    except TimeoutError:
        result = Result(name)
        result.failures.add(f"did not finish within {CHECK_TIMEOUT} s")
    except Exception as exc:
        result = Result(name)
        result.failures.add(f"the check crashed: {exc!r}")
    result.name = name
    show(result, time.perf_counter() - started)
    return result


def show(result: Result, seconds: float | None = None) -> None:
    """Print one check's outcome and its first failures."""
    mark = "pass" if result.passed else f"FAIL ({result.failures.count})"
    took = "" if seconds is None else f"{seconds:5.1f} s"
    say(f"  {result.name:<22} {mark:<10} {took:>7}  {result.detail}")
    for example in result.failures.examples:
        say(f"      {example}")


async def bad_input(target: Target) -> Result:
    """Hypothesis and schemathesis; then the leak check."""
    result = Result("bad input")
    fuzzer = Fuzzer(target.base_url, target.postgres.admin_dsn(target.database), target.tally)
    settings = target.settings
    failures, result.detail = await asyncio.to_thread(
        fuzzer.run, settings.fuzz_examples, settings.schema_examples
    )
    result.failures = failures
    result.failures.extend(await target.checkpoint(data=False))
    return result


async def memory(target: Target) -> tuple[Result, str]:
    """The in-process soak, in a process of its own; returns the result and its output."""
    result = Result("memory")
    settings = target.settings
    database = f"{target.database}_memory"
    await target.postgres.create_database(database)
    environment = {**target.environment(), "DATABASE_URL": target.postgres.app_url(database)}
    counts = [str(settings.memory_requests), str(settings.memory_warmup)]
    command = [sys.executable, "-m", "reliability.memory", target.framework, *counts]
    try:
        completed = await asyncio.to_thread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            env=environment,
            cwd=ROOT,
            timeout=CHECK_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        result.failures.add(f"the soak did not finish within {CHECK_TIMEOUT} s")
        return result, ""
    output = completed.stdout + completed.stderr
    if completed.returncode:
        result.failures.add(f"the soak exited {completed.returncode}: {completed.stderr[-300:]}")
        return result, output
    soak = json.loads(completed.stdout.splitlines()[-1])
    growth = soak["growth_mb"]
    limit = 5.0
    if soak["registry"] or soak["checkedout"]:
        result.failures.add(
            f"after the soak: {soak['registry']} registry entries, {soak['checkedout']} checked out"
        )
    if growth is None or growth > limit:
        result.failures.add(f"RSS grew {growth} MB after warm-up (limit {limit} MB)")
    if any(int(code) >= 500 for code in soak["statuses"]):
        result.failures.add(f"5xx during the soak: {soak['statuses']}")
    result.detail = (
        f"{soak['requests']:,} in-process requests: RSS {soak['rss_after_warmup']:.1f} MB after "
        f"{settings.memory_warmup:,} warm-up requests, {soak['rss_end']:.1f} MB at the end "
        f"({growth:+.1f} MB); registry {soak['registry']}, checked out {soak['checkedout']}"
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
    errors = log.count("Traceback")
    found = "none found" if result.passed else "found (see below)"
    result.detail = (
        f"{target.tally.sent:,} responses, {len(log.splitlines()):,} log lines ({errors} "
        f"tracebacks) and the reprs searched for the password and the rotated one: {found}"
    )
    return result


async def run_framework(
    postgres: PrivatePostgres, framework: str, settings: Settings, only: list[str]
) -> FrameworkReport:
    """Every check against one example."""
    server = server_for(framework)
    say(f"\n== {framework} ({server}) ==")
    target = Target(
        framework=framework,
        server=server,
        postgres=postgres,
        database=f"reliability_{framework}",
        settings=settings,
        tally=Tally(forbidden=(postgres.password.encode(),)),
        log_path=LOGS / f"{framework}.log",
    )
    report = FrameworkReport(framework, server)
    reprs: list[str] = []
    await target.start()
    try:
        soak = None
        for check in [*CHECKS, bad_input]:
            name = check.__name__.replace("_", " ")
            if check is bad_input and (not only or "memory" in only):
                # The soak runs in its own process on its own database: let it use the CPU
                # that bad input, one request at a time, leaves idle. (Not earlier: it uses the
                # same PostgreSQL, which other checks restart, and it would slow the load.)
                soak = asyncio.create_task(memory(target))
            if not only or name in only:
                report.results.append(await bounded(name, check, target))
        async with httpx.AsyncClient(base_url=target.base_url) as client:
            reprs = (await client.get("/__leaks")).json()["reprs"]
    finally:
        await target.stop()
    output = ""
    if soak is not None:
        soaked, output = await soak
        report.results.append(soaked)
        show(soaked)
    report.results.append(secrets(target, reprs, output))
    show(report.results[-1])
    report.sent = target.tally.sent
    report.statuses = target.tally.status_line()
    report.hung = target.tally.statuses["hung"]
    report.leaks_found = target.leaks_found
    report.rows = target.rows
    return report


async def main(argv: list[str]) -> int:
    """Run everything; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run, for development")
    parser.add_argument(
        "--check", action="append", default=[], help="run only this check (repeatable)"
    )
    parser.add_argument("frameworks", nargs="*", help="examples to check (default: all)")
    args = parser.parse_args(argv)
    available = examples()
    chosen = args.frameworks or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        parser.error(f"no example for {unknown}: choose from {available}")
    settings = QUICK if args.quick else Settings()
    started = time.perf_counter()
    postgres = PrivatePostgres()
    try:
        postgres.create()
        await postgres.create_app_role()
        admin = await postgres.admin()
        pg_version = await admin.fetchval("SHOW server_version")
        await admin.close()
        say(f"PostgreSQL {pg_version} on 127.0.0.1:{postgres.port} (private, {postgres.root})")
        LOGS.mkdir(exist_ok=True)
        reports = [
            await run_framework(postgres, framework, settings, args.check) for framework in chosen
        ]
    finally:
        postgres.remove()
    elapsed = time.perf_counter() - started
    command = "nox -s reliability" + (" -- --quick" if args.quick else "")
    text = [
        f"Produced by `{command}` in {elapsed:.0f} s on {os.cpu_count()} CPUs at "
        f"{revision('core', 'adapters', 'examples')}, "
        f"Python {platform.python_version()}, PostgreSQL {pg_version}; "
        + ", ".join(f"{name} {version}" for name, version in versions(VERSIONS).items())
        + ".",
        "",
        *summary_table(reports),
        "",
        *checks_table(reports),
        "",
        "## Details",
        *details(reports),
    ]
    say()
    for line in text:
        say(line)
    output = HERE / ("results-quick.md" if args.quick else "results.md")
    output.write_text("# Reliability results\n\n" + "\n".join(text) + "\n")
    leaked = any(postgres.password in line for line in printed)
    if leaked:
        say("FAIL: the database password appears in this run's own output")
    results = [result for report in reports for result in report.results]
    passed = sum(result.passed for result in results)
    say(f"reliability: {passed} passed, {len(results) - passed} failed")
    return 1 if leaked or passed < len(results) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
