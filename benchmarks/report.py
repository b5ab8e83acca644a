"""From the raw samples to the summary, the target checks, results.md and bench.png."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.routes import ROUTE_TITLES
from benchmarks.variants import FRAMEWORKS, VARIANTS, variant

DRIVERS = [
    ("asgi", 1, "in-process ASGI, concurrency 1"),
    ("asgi", 32, "in-process ASGI, concurrency 32"),
    ("server", 32, "real server (uvicorn; hypercorn for Quart) under wrk, 32 connections"),
]
CELLS = [
    ("ping", "sqlite"),
    ("read", "sqlite"),
    ("read", "postgresql"),
    ("insert", "sqlite"),
    ("insert", "postgresql"),
]
PING_MAX_ADDED_US = 1.0
PING_MIN_RATIO = 0.97
DATABASE_MIN_RATIO = 0.99


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min, max and the quartiles (``q1``, ``q3``: the middle half of the rounds)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add to each record its spread, and its ratio and added microseconds against its baseline.

    Ratios and added times are computed round by round (a variant against the baseline's
    sample of the same round), then summarized.
    """
    baselines = {
        (r["driver"], r["concurrency"], r["framework"], r["route"], r["database"]): r["rps"]
        for r in records
        if variant(r["variant"]).role == "baseline"
    }
    summary = []
    for record in records:
        base = baselines[
            (
                record["driver"],
                record["concurrency"],
                record["framework"],
                record["route"],
                record["database"],
            )
        ]
        pairs = list(zip(record["rps"], base, strict=True))
        summary.append(
            {
                **record,
                "role": variant(record["variant"]).role,
                "label": variant(record["variant"]).label,
                "rps_spread": spread(record["rps"]),
                "ratio": spread(mine / theirs for mine, theirs in pairs),
                "added_us": spread(1e6 / mine - 1e6 / theirs for mine, theirs in pairs),
            }
        )
    return summary


def find(summary: list[dict[str, Any]], **wanted: Any) -> list[dict[str, Any]]:
    """The summarized records with the given field values."""
    return [r for r in summary if all(r[key] == value for key, value in wanted.items())]


def check_targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check every alchemy-scope record against the issue's targets.

    On `/ping`: at most 1 us added and a ratio of at least 0.97 against the bare framework.
    On the database routes: a ratio of at least 0.99 against the hand-written session. On
    every route: more requests per second (median) than every alternative.
    """
    checks = []
    for ours in find(summary, role="alchemy-scope"):
        where = {k: ours[k] for k in ("driver", "concurrency", "framework", "route", "database")}
        ratio, added = ours["ratio"]["median"], ours["added_us"]["median"]
        if ours["route"] == "ping":
            wanted = [
                (
                    f"added ≤ {PING_MAX_ADDED_US:g} µs",
                    f"{added:+.2f} µs",
                    added <= PING_MAX_ADDED_US,
                ),
                (f"ratio ≥ {PING_MIN_RATIO}", f"{ratio:.3f}", ratio >= PING_MIN_RATIO),
            ]
        else:
            wanted = [
                (f"ratio ≥ {DATABASE_MIN_RATIO}", f"{ratio:.3f}", ratio >= DATABASE_MIN_RATIO)
            ]
        for alternative in find(summary, role="alternative", **where):
            mine, theirs = ours["rps_spread"]["median"], alternative["rps_spread"]["median"]
            wanted.append(
                (
                    f"ahead of {alternative['label']}",
                    f"{mine / theirs:.3f} x",
                    mine > theirs,
                )
            )
        checks += [
            {
                **where,
                "variant": ours["variant"],
                "label": ours["label"],
                "target": target,
                "measured": measured,
                "met": met,
            }
            for target, measured, met in wanted
        ]
    return checks


def _cell_title(route: str, database: str) -> str:
    if route == "ping":
        return ROUTE_TITLES[route]
    return f"{ROUTE_TITLES[route]}, {'SQLite' if database == 'sqlite' else 'PostgreSQL'}"


def _fmt(spread_: dict[str, float], digits: int, sign: str = "") -> str:
    median, low, high = (f"{spread_[k]:{sign}.{digits}f}" for k in ("median", "min", "max"))
    return f"{median} ({low} … {high})"


def markdown_tables(summary: list[dict[str, Any]]) -> str:
    """One table per driver and route: req/s, ratio and added µs of every variant."""
    out = []
    for driver, concurrency, driver_title in DRIVERS:
        out.append(f"### {driver_title}\n")
        for route, database in CELLS:
            rows = find(
                summary, driver=driver, concurrency=concurrency, route=route, database=database
            )
            if not rows:
                continue
            out.append(f"**{_cell_title(route, database)}**\n")
            out.append("| framework | variant | req/s | ratio to baseline | added µs/request |")
            out.append("| --- | --- | ---: | ---: | ---: |")
            for framework in FRAMEWORKS:
                for row in find(rows, framework=framework):
                    baseline = row["role"] == "baseline"
                    out.append(
                        f"| {framework} | {'**baseline**: ' if baseline else ''}{row['label']} "
                        f"| {row['rps_spread']['median']:,.0f} "
                        f"| {'1' if baseline else _fmt(row['ratio'], 3)} "
                        f"| {'0' if baseline else _fmt(row['added_us'], 1, '+')} |"
                    )
            out.append("")
    return "\n".join(out)


def markdown_targets(checks: list[dict[str, Any]]) -> str:
    """The missed targets, one row each, and a count of the met ones."""
    missed = [c for c in checks if not c["met"]]
    out = [f"{len(checks) - len(missed)} of {len(checks)} checks met. Missed:\n"]
    out.append("| driver | framework | variant | route | target | measured (median) |")
    out.append("| --- | --- | --- | --- | --- | ---: |")
    titles = {
        (d, c): t.split(" (")[0].split(",")[0] + (f", c={c}" if d == "asgi" else "")
        for d, c, t in DRIVERS
    }
    for check in missed:
        out.append(
            f"| {titles[(check['driver'], check['concurrency'])]} | {check['framework']} "
            f"| {check['label']} | {_cell_title(check['route'], check['database'])} "
            f"| {check['target']} | {check['measured']} |"
        )
    return "\n".join(out)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Ratios to the baseline (median, with min-max whiskers) of every variant, as a PNG."""
    import matplotlib  # noqa: PLC0415 - slow to import, and only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    floor, ceiling = 0.6, 1.15
    figure, axes = plt.subplots(
        len(FRAMEWORKS), len(DRIVERS), figsize=(18, 16), sharey=True, squeeze=False
    )
    colors = plt.get_cmap("tab10")
    for row, framework in enumerate(FRAMEWORKS):
        others = [v for v in VARIANTS if v.framework == framework and v.role != "baseline"]
        for column, (driver, concurrency, driver_title) in enumerate(DRIVERS):
            ax = axes[row][column]
            width = 0.8 / max(1, len(others))
            for index, other in enumerate(others):
                xs, medians, lows, highs = [], [], [], []
                for position, (route, database) in enumerate(CELLS):
                    found = find(
                        summary,
                        driver=driver,
                        concurrency=concurrency,
                        variant=other.key,
                        route=route,
                        database=database,
                    )
                    if found:
                        ratio = found[0]["ratio"]
                        xs.append(position - 0.4 + width * (index + 0.5))
                        medians.append(ratio["median"])
                        lows.append(ratio["q1"])
                        highs.append(ratio["q3"])
                clipped = [min(max(m, floor), ceiling) for m in medians]
                ax.errorbar(
                    xs,
                    clipped,
                    yerr=[
                        [max(0.0, c - max(lo, floor)) for c, lo in zip(clipped, lows, strict=True)],
                        [
                            max(0.0, min(hi, ceiling) - c)
                            for c, hi in zip(clipped, highs, strict=True)
                        ],
                    ],
                    fmt="v" if other.role == "alternative" else "o",
                    color=colors(index),
                    label=other.label,
                    capsize=2,
                )
                for x, median in zip(xs, medians, strict=True):
                    if median < floor or median > ceiling:
                        ax.annotate(
                            f"{median:.2f}",
                            (x, min(max(median, floor), ceiling)),
                            textcoords="offset points",
                            xytext=(0, 6 if median < floor else -12),
                            ha="center",
                            fontsize=7,
                            color=colors(index),
                        )
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.axhline(DATABASE_MIN_RATIO, color="grey", linewidth=0.6, linestyle=":")
            ax.axhline(PING_MIN_RATIO, color="grey", linewidth=0.6, linestyle="--")
            ax.set_ylim(floor - 0.02, ceiling)
            ax.set_xticks(range(len(CELLS)))
            ax.set_xticklabels([f"{r}\n{'' if r == 'ping' else d}" for r, d in CELLS], fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(driver_title.split(" (")[0].split(" under")[0], fontsize=10)
            if column == 0:
                ax.set_ylabel(f"{framework}\nreq/s ÷ baseline")
            if column == len(DRIVERS) - 1:
                ax.legend(fontsize=7, loc="lower right")
    figure.suptitle(
        "Requests per second relative to the same framework with a session opened in each "
        "handler (median of the rounds, whiskers the middle half of them; dashed 0.97, "
        "dotted 0.99)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=80)
    plt.close(figure)


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: how the run went, the micro-benchmark, the tables, the targets, memory."""
    env = results["environment"]
    lines = [
        "# alchemy-scope benchmark results",
        "",
        f"`{results['command']}`, started {results['started']}, {results['seconds']} s. "
        f"Python {env['python']} on {env['cpu']} ({env['cores']} cores), {env['platform']}. "
        f"Load generator: {env['load_generator']}. Databases: "
        + "; ".join(f"{k} {v}" for k, v in env["databases"].items())
        + ".",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".",
        "",
        "## How quiet the machine was",
        "",
        "Cores busy outside the run: the machine's busy CPU time during the phase minus that "
        "of this run's own processes, per second (2 cores in all). It includes the PostgreSQL "
        "server working for the run.",
        "",
        "| phase | seconds | cores busy outside the run | load average before (1, 5, 15 min) "
        "| after |",
        "| --- | ---: | ---: | --- | --- |",
        *(
            f"| {p['phase']} | {p['seconds']} | {p['cores_busy_outside']:.2f} "
            f"| {p['load_average_before']} | {p['load_average_after']} |"
            for p in results["phases"]
        ),
        "",
        "## Our own cost: ScopeMiddleware around an ASGI app that answers at once",
        "",
        f"{results['micro']['calls_per_round']:,} calls per round, "
        f"{len(next(iter(results['micro']['ns_per_request'].values())))} rounds.",
        "",
        "| app | ns per request | added to the bare app | blocks held during a request "
        "| bytes held | bytes retained per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    micro = results["micro"]["ns_per_request"]
    bare = micro["bare ASGI app"]
    bare_memory = results["micro"]["memory"]["bare ASGI app"]
    for name, samples in micro.items():
        added = spread(mine - theirs for mine, theirs in zip(samples, bare, strict=True))
        held = results["micro"]["memory"][name]
        blocks = held["blocks_held_during_request"] - bare_memory["blocks_held_during_request"]
        size = held["bytes_held_during_request"] - bare_memory["bytes_held_during_request"]
        lines.append(
            f"| {name} | {_fmt(spread(samples), 0)} | {_fmt(added, 0, '+')} "
            f"| {blocks:+d} | {size:+d} | {held['bytes_retained_per_request']:.3f} |"
        )
    lines += [
        "",
        "## Requests per second, ratio and added time against the bare framework",
        "",
        "Median over the rounds, (min … max) in brackets. Ratio and added µs are computed "
        "round by round against the baseline's sample of the same round. At concurrency 32 and "
        "behind a server, added µs is 1/throughput minus the baseline's: CPU time per request.",
        "",
        markdown_tables(results["records"]),
        "## Targets",
        "",
        markdown_targets(results["targets"]),
        "",
        "## Memory (Starlette, SQLite, in-process, concurrency 1)",
        "",
        "Requests cycle through 8 `GET /ping`, 1 read, 1 insert. RSS in MiB at each tenth of "
        "the run; then, under tracemalloc, the read route alone.",
        "",
        "| variant | RSS after each tenth (MiB) | growth after the first tenth "
        "| read: peak bytes in a request | read: bytes retained per request |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for run in results["memory"]:
        rss = [value / 2**20 for _, value in run["rss"]]
        lines.append(
            f"| {run['variant']} | {' '.join(f'{v:.1f}' for v in rss[1:])} "
            f"| {(run['rss'][-1][1] - run['rss'][1][1]) / 1024:+.0f} KiB "
            f"| {run['read_peak_bytes']:,} | {run['read_retained_bytes_per_request']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)
