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
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tooling.postgres import PrivatePostgres
from tooling.report import revision, table, versions

from .checks import CHECKS, Result, memory, secrets
from .client import Tally
from .serve import examples, server_for
from .target import QUICK, Settings, Target
from .workers import FRAMEWORK as WORKERS_FRAMEWORK
from .workers import HEADERS as WORKERS_HEADERS
from .workers import REPLICATION_HBA, WorkersRun, many_workers

HERE = Path(__file__).resolve().parent
LOGS = HERE / "logs"  # the servers' logs of the last run (git-ignored)
VERSIONS = ["starlette", "fastapi", "litestar", "quart"]
VERSIONS += ["uvicorn", "hypercorn", "sqlalchemy", "asyncpg"]
SUMMARY = ["Framework", "Server", "Requests sent", "Responses by status", "Hung", "Leaks found"]
SUMMARY += ["Rows expected / found", "Checks passed"]

printed: list[str] = []


@dataclass
class FrameworkReport:
    """Everything one framework's run produced."""

    framework: str
    server: str
    results: list[Result] = field(default_factory=list)
    row: list[object] = field(default_factory=list)  # of the summary table


def say(line: str = "") -> None:
    """Print a line of the run's output (kept, to check it for the password too)."""
    printed.append(line)
    print(line, flush=True)


def show(result: Result, seconds: float | None = None) -> None:
    """Print one check's outcome and its first failures."""
    mark = "pass" if result.passed else f"FAIL ({result.failures.count})"
    took = "" if seconds is None else f"{seconds:5.1f} s"
    say(f"  {result.name:<22} {mark:<10} {took:>7}  {result.detail}")
    for example in result.failures.examples:
        say(f"      {example}")


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
    report, reprs, soak = FrameworkReport(framework, server), [], None
    await target.start()
    try:
        for check in CHECKS:
            if check.name == "bad input" and (not only or "memory" in only):
                # The soak runs in its own process on its own database: let it use the CPU
                # that bad input, one request at a time, leaves idle. (Not earlier: it uses the
                # same PostgreSQL, which other checks restart, and it would slow the load.)
                soak = asyncio.create_task(memory(target))
            if not only or check.name in only:
                started = time.perf_counter()
                report.results.append(await check(target))
                show(report.results[-1], time.perf_counter() - started)
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
    rows, tally = target.rows, target.tally
    todos = f"todos {rows.acked:,} / {rows.found:,}"
    if rows.unknown:
        todos += f" (+{rows.unknown_found} of {rows.unknown} unacknowledged writes landed)"
    children = f"children {rows.children_expected} / {rows.children_found}"
    passed = sum(result.passed for result in report.results)
    report.row = [framework, server, f"{tally.sent:,}", tally.status_line(),
                  tally.statuses["hung"], target.leaks_found, f"{todos}; {children}",
                  f"{passed}/{len(report.results)}"]  # fmt: skip
    return report


WORKERS_SECTION = "## Many workers"


def workers_section(run: WorkersRun) -> list[str]:
    """The multi-worker run's table and account (results.md's "Many workers" section)."""
    lines = [WORKERS_SECTION, "", *table(WORKERS_HEADERS, [run.row]), "", run.detail]
    return lines + [f"- {example}" for example in run.failures.examples]


def tables(reports: list[FrameworkReport]) -> list[str]:
    """One row per framework, then every check by framework (pass or FAIL), then details.

    The details: what each check did, and the first failures of each.
    """
    names = list(dict.fromkeys(result.name for report in reports for result in report.results))
    by_name = [{result.name: result for result in report.results} for report in reports]
    rows = [
        [name, *(
            "n/a" if (r := mine.get(name)) is None else "pass" if r.passed
            else f"**FAIL** ({r.failures.count})"
            for mine in by_name
        )]
        for name in names
    ]  # fmt: skip
    lines = [*table(SUMMARY, [report.row for report in reports], numeric=1), ""]
    lines += [*table(["Check", *(report.framework for report in reports)], rows), ""]
    lines.append("## Details")
    for report in reports:
        lines += ["", f"### {report.framework} ({report.server})", ""]
        for result in report.results:
            lines.append(
                f"- **{result.name}** ({'pass' if result.passed else 'FAIL'}): {result.detail}"
            )
            lines += [f"  - {example}" for example in result.failures.examples]
            if result.failures.count > len(result.failures.examples):
                lines.append(f"  - … {result.failures.count} failures in all")
    return lines


async def main(argv: list[str]) -> int:  # noqa: PLR0915 - the run, in order
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
    # `--check workers` (alone: the multi-worker run only; with other checks: beside them);
    # without --check, everything, the multi-worker run last if its example is chosen.
    checks = [name for name in args.check if name != "workers"]
    with_workers = WORKERS_FRAMEWORK in chosen and (not args.check or "workers" in args.check)
    frameworks = chosen if not args.check or checks else []
    started = time.perf_counter()
    postgres = PrivatePostgres(hba=REPLICATION_HBA, prefix="alchemy-scope-reliability-")
    workers: WorkersRun | None = None
    try:
        postgres.create()
        await postgres.create_app_role()
        ((pg_version,),) = await postgres.admin("SHOW server_version")
        say(f"PostgreSQL {pg_version} on 127.0.0.1:{postgres.port} (private, {postgres.root})")
        LOGS.mkdir(exist_ok=True)
        reports = [
            await run_framework(postgres, framework, settings, checks) for framework in frameworks
        ]
        if with_workers:
            say(f"\n== {WORKERS_FRAMEWORK}: uvicorn --workers, PgBouncer, a standby ==")
            began = time.perf_counter()
            workers = await many_workers(postgres, LOGS, quick=args.quick)
            mark = "pass" if not workers.failures else f"FAIL ({workers.failures.count})"
            say(f"  {'many workers':<22} {mark:<10} {time.perf_counter() - began:5.1f} s")
            for example in workers.failures.examples:
                say(f"      {example}")
    finally:
        postgres.remove()
    elapsed = time.perf_counter() - started
    command = "nox -s reliability" + (" -- --quick" if args.quick else "")
    if not frameworks:
        command += (" -- " if not args.quick else " ") + "--check workers"
    header = (
        f"Produced by `{command}` in {elapsed:.0f} s on {os.cpu_count()} CPUs at "
        f"{revision('core', 'adapters', 'examples')}, "
        f"Python {platform.python_version()}, PostgreSQL {pg_version}; "
        + ", ".join(f"{name} {version}" for name, version in versions(VERSIONS).items())
        + "."
    )
    extra = [] if workers is None else ["", *workers_section(workers)]
    text = [header, "", *tables(reports), *extra] if frameworks else [header, *extra]
    say()
    for line in text:
        say(line)
    output = HERE / ("results-quick.md" if args.quick else "results.md")
    if frameworks:
        output.write_text("# Reliability results\n\n" + "\n".join(text) + "\n")
    elif workers is not None:  # the multi-worker run alone: its section of the file only
        replace_section(output, [f"_{header}_", "", *workers_section(workers)[2:]])
    leaked = any(postgres.password in line for line in printed)
    if leaked:
        say("FAIL: the database password appears in this run's own output")
    outcomes = [result.passed for report in reports for result in report.results]
    if workers is not None:
        outcomes.append(not workers.failures)
    passed = sum(outcomes)
    say(f"reliability: {passed} passed, {len(outcomes) - passed} failed")
    return 1 if leaked or passed < len(outcomes) else 0


def replace_section(path: Path, body: list[str]) -> None:
    """Put ``body`` under results.md's "Many workers" heading, its last section."""
    text = path.read_text() if path.exists() else "# Reliability results\n"
    before = text.partition(WORKERS_SECTION + "\n")[0].rstrip("\n")
    path.write_text(before + "\n\n" + "\n".join([WORKERS_SECTION, "", *body]) + "\n")


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
