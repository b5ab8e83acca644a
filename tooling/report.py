"""What every report is made of: spreads of samples, Markdown tables, versions, the commit."""

from __future__ import annotations

import contextlib
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, min, max and the quartiles ``q1`` and ``q3`` (the middle half of the samples)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    median = statistics.median(ordered)
    return {"median": median, "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1]}


def table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: int = 0) -> list[str]:
    """A Markdown table; the last ``numeric`` columns are right-aligned."""
    align = ["---"] * (len(header) - numeric) + ["---:"] * numeric
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
    return lines + [f"| {' | '.join(str(cell) for cell in row)} |" for row in rows]


def versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each package (``missing`` where it is not installed)."""
    found = {}
    for name in packages:
        found[name] = "missing"
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def revision(*paths: str) -> str:
    """The commit checked out, and whether ``paths`` had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], capture_output=True, text=True, cwd=ROOT, check=False
            )
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "an unknown commit"
    changed = [path for path in paths if git("status", "--porcelain", "--", path)]
    return f"{commit} (with uncommitted changes in {', '.join(changed)})" if changed else commit
