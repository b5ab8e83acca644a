"""From the samples to results.md and bench.png: ratios round by round, their median and IQR."""

from pathlib import Path
from typing import Any

from benchmarks.variants import FRAMEWORKS, LABELS, VARIANTS
from tooling.report import spread, table

DRIVERS = [("asgi", 1), ("asgi", 32), ("server", 1), ("server", 32)]
DRIVER_TITLES = {"asgi": "in-process ASGI", "server": "real server (uvicorn; hypercorn for Quart)"}
TOLERANCE = 0.03  # the interquartile range wanted: within ±3 % of the median
CELL_KEYS = ("driver", "framework", "route", "database", "concurrency")


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with its requests per second, and its ratios to the baseline and the seed.

    Ratios are taken round by round (against the other variant's sample of the same round,
    taken right before or after), then summarized: median, quartiles, min and max.
    """
    by_cell = {(*(r[k] for k in CELL_KEYS), r["variant"]): r["rps"] for r in records}
    summary = []
    for record in records:
        cell = tuple(record[k] for k in CELL_KEYS)
        ratios = {
            f"vs_{other}": spread(
                a / b for a, b in zip(record["rps"], by_cell[(*cell, other)], strict=True)
            )
            for other in ("baseline", "seed")
        }
        summary.append({**record, "rps_spread": spread(record["rps"]), **ratios})
    return summary


def _ratio(ratio: dict[str, float]) -> str:
    wide = (ratio["q3"] - ratio["q1"]) / 2 > TOLERANCE * ratio["median"]
    return f"{ratio['median']:.3f} [{ratio['q1']:.3f}, {ratio['q3']:.3f}]{' †' if wide else ''}"


def _cells(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (route, database) pairs of ``records``: /ping, reads, inserts."""
    found = {(r["route"], r["database"]) for r in records}
    return sorted(found, key=lambda cell: (["ping", "read", "insert"].index(cell[0]), cell[1]))


def _title(route: str, database: str) -> str:
    return "/ping (no database)" if route == "ping" else f"{route}, {database}"


HEADER = ["framework", "route, database", "rounds", "baseline req/s", "manual", "autocommit"]
HEADER += ["seed's pattern", "manual ÷ seed", "autocommit ÷ seed"]
MICRO_HEADER = ["app", "ns per request", "added to the bare app", "peak bytes in a request"]
MICRO_HEADER += ["bytes retained per request"]
MEMORY_HEADER = ["variant", "RSS after each tenth (MiB)", "growth after the first tenth"]
MEMORY_HEADER += ["read: peak bytes", "read: bytes retained per request"]


def tables(summary: list[dict[str, Any]]) -> list[str]:
    """A table per driver and concurrency: a row per framework and cell."""
    found = {(*(r[k] for k in CELL_KEYS), r["variant"]): r for r in summary}
    lines = []
    for driver, concurrency in DRIVERS:
        rows = []
        for framework in FRAMEWORKS:
            where = (driver, framework, concurrency)
            mine = [r for r in summary if (r["driver"], r["framework"], r["concurrency"]) == where]
            for route, database in _cells(mine):
                by = {
                    v: found[driver, framework, route, database, concurrency, v] for v in VARIANTS
                }
                baseline = by["baseline"]
                rows.append(
                    [framework, _title(route, database), len(baseline["rps"])]
                    + [f"{baseline['rps_spread']['median']:,.0f}"]
                    + [_ratio(by[v]["vs_baseline"]) for v in VARIANTS[1:]]
                    + [_ratio(by[v]["vs_seed"]) for v in ("manual", "autocommit")]
                )
        if rows:
            title = f"### {DRIVER_TITLES[driver]}, concurrency {concurrency}"
            lines += [title, "", *table(HEADER, rows, 7), ""]
    return lines


def _micro_rows(micro: dict[str, Any]) -> list[list[str]]:
    bare, rows = micro["ns_per_request"]["bare ASGI app"], []
    for name, samples in micro["ns_per_request"].items():
        added = spread(a - b for a, b in zip(samples, bare, strict=True))["median"]
        peak, kept = micro["memory"][name].values()
        rows.append([name, f"{spread(samples)['median']:.0f}", f"{added:+.0f}", f"{peak:,}",
                     f"{kept:.3f}"])  # fmt: skip
    return rows


def _memory_rows(memory: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in memory:
        rss = " ".join(f"{value / 2**20:.1f}" for _, value in run["rss"][1:])
        growth = f"{(run['rss'][-1][1] - run['rss'][1][1]) / 1024:+.0f} KiB"
        rows.append([run["variant"], rss, growth, f"{run['read_peak_bytes']:,}",
                     f"{run['read_retained_bytes_per_request']:.2f}"])  # fmt: skip
    return rows


def _insight_lines(insight: dict[str, Any] | None) -> list[str]:
    """The insight section: its cost per statement, on and off (in-memory SQLite)."""
    if insight is None:
        return []
    return [
        "## Database insight: cost per statement (in-memory SQLite, CPU time)",
        "",
        f"Median of {insight['rounds']} paired rounds. Off registers no listener: no cost.",
        "",
        *table(
            ["measured", "µs per statement"],
            [
                ["statement, insight off", f"{insight['statement_off_us']:.1f}"],
                ["statement, insight on", f"{insight['statement_on_us']:.1f}"],
                ["on minus off", f"{insight['on_minus_off_us']:+.1f}"],
                [
                    "two empty listeners minus off (SQLAlchemy's event path)",
                    f"{insight['empty_listeners_minus_off_us']:+.1f}",
                ],
                ["off minus off (the noise)", f"{insight['off_minus_off_us']:+.1f}"],
                ["insight's own listeners", f"{insight['listeners_own_us']:.2f}"],
            ],
            1,
        ),
        "",
    ]


def markdown(results: dict[str, Any]) -> str:
    """results.md: how the run went, the ratio tables, our own cost alone, memory."""
    env, micro = results["environment"], results["micro"]
    phases = ", ".join(
        f"{p['phase']} {p['cores_busy_outside']:.2f} ({p['seconds']:.0f} s)"
        for p in results["phases"]
    )
    rounds = len(micro["ns_per_request"]["bare ASGI app"])
    lines = [
        "# alchemy-scope benchmark results",
        "",
        f"`{results['command']}`, started {results['started']}, {results['seconds']} s, at "
        f"{results['revision']}. Python {env['python']} on {env['cpu']} ({env['cores']} cores). "
        f"Load generator: {env['load_generator']}. Databases: "
        + "; ".join(f"{k} {v}" for k, v in env["databases"].items())
        + ".",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + ".",
        "",
        "Cores busy outside the run, per phase (the machine's busy CPU time minus this run's; "
        f"PostgreSQL's work for the run included): {phases}.",
        "",
        "## Requests per second against the framework's baseline and the seed's pattern",
        "",
        "Each cell: the median of the round-by-round ratios [interquartile range]; † marks an "
        f"interquartile range wider than ±{TOLERANCE:.0%} of the median. `manual ÷ seed` above "
        "1: alchemy-scope is faster than the seed's bare pattern. Pools: sqlite 1 connection, "
        "postgresql 32, postgresql-pool8 8 (at concurrency 32, requests wait for connections).",
        "",
        *tables(results["records"]),
        "## Our own cost: ScopeMiddleware around an ASGI app that answers at once",
        "",
        f"{micro['calls_per_round']:,} calls per round, {rounds} rounds (median).",
        "",
        *table(MICRO_HEADER, _micro_rows(micro), 4),
        "",
        *_insight_lines(results.get("insight")),
        "## Memory (Starlette, SQLite, in-process, concurrency 1)",
        "",
        "Requests cycle through 8 `GET /ping`, 1 read, 1 insert; RSS (MiB) at each tenth of the "
        "run; then, under tracemalloc, the read route alone.",
        "",
        *table(MEMORY_HEADER, _memory_rows(results["memory"]), 3),
        "",
    ]
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """The ratios to the baseline (median, whiskers the interquartile range) as a PNG."""
    import matplotlib  # noqa: PLC0415 - slow to import, needed only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    low, high = 0.5, 1.3
    figure, axes = plt.subplots(4, len(DRIVERS), figsize=(20, 14), sharey=True, squeeze=False)
    for row, framework in enumerate(FRAMEWORKS):
        for column, (driver, concurrency) in enumerate(DRIVERS):
            ax, where = axes[row][column], (framework, driver, concurrency)
            mine = [r for r in summary if (r["framework"], r["driver"], r["concurrency"]) == where]
            cells = _cells(mine)
            for index, variant in enumerate(VARIANTS[1:]):
                found = {(r["route"], r["database"]): r for r in mine if r["variant"] == variant}
                ratios = [found[cell]["vs_baseline"] for cell in cells]
                medians = [min(max(ratio["median"], low), high) for ratio in ratios]
                below = [max(0, m - r["q1"]) for m, r in zip(medians, ratios, strict=True)]
                above = [max(0, r["q3"] - m) for m, r in zip(medians, ratios, strict=True)]
                xs = [x + (index - 1) * 0.2 for x in range(len(cells))]
                ax.errorbar(xs, medians, yerr=[below, above], fmt="o", capsize=2,
                            label=LABELS[variant], color=f"C{index}")  # fmt: skip
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
            ax.set_ylim(low, high)
            ax.set_xlim(-0.5, max(len(cells), 1) - 0.5)
            ax.set_xticks(range(len(cells)), [_title(*c).replace(", ", "\n") for c in cells])
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(f"{DRIVER_TITLES[driver].split(' (')[0]}, concurrency {concurrency}")
            if column == 0:
                ax.set_ylabel(f"{framework}\nreq/s ÷ baseline")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    figure.suptitle(
        "Requests per second ÷ the same framework's session-per-handler baseline "
        "(median of the round-by-round ratios, whiskers the interquartile range; dotted 0.99)"
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=80)
    plt.close(figure)
