"""The summary tables: one row per framework, then every check by framework, then details."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import Result
from .target import Rows

# Failures that are understood and reported, waiting for a fix outside reliability/: the check
# still fails (and the run exits non-zero) until it is fixed; the table says why.
KNOWN: dict[str, str] = {}


@dataclass
class FrameworkReport:
    """Everything one framework's run produced."""

    framework: str
    server: str
    sent: int = 0
    statuses: str = ""
    hung: int = 0
    leaks_found: int = 0
    rows: Rows = field(default_factory=Rows)
    results: list[Result] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(result.passed for result in self.results)


def summary_table(reports: list[FrameworkReport]) -> list[str]:
    """One row per framework."""
    lines = [
        "| Framework | Server | Requests sent | Responses by status | Hung | Leaks found "
        "| Rows expected / found | Checks passed |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for report in reports:
        rows = report.rows
        todos = f"todos {rows.acked:,} / {rows.found:,}"
        if rows.unknown:
            todos += f" (+{rows.unknown_found} of {rows.unknown} unacknowledged writes landed)"
        children = f"children {rows.children_expected} / {rows.children_found}"
        passed = sum(result.passed for result in report.results)
        lines.append(
            f"| {report.framework} | {report.server} | {report.sent:,} | {report.statuses} "
            f"| {report.hung} | {report.leaks_found} | {todos}; {children} "
            f"| {passed}/{len(report.results)} |"
        )
    return lines


def checks_table(reports: list[FrameworkReport]) -> list[str]:
    """Every check by framework: pass, FAIL, or FAIL (known) with a footnote."""
    names = list(dict.fromkeys(result.name for report in reports for result in report.results))
    lines = [
        "| Check | " + " | ".join(report.framework for report in reports) + " |",
        "| --- |" + " --- |" * len(reports),
    ]
    for name in names:
        cells = []
        for report in reports:
            result = next((r for r in report.results if r.name == name), None)
            if result is None:
                cells.append("n/a")
            elif result.passed:
                cells.append("pass")
            else:
                cells.append(
                    "FAIL (known)" if name in KNOWN else f"**FAIL** ({result.failures.count})"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def details(reports: list[FrameworkReport]) -> list[str]:
    """What each check did, and the first failures of each."""
    lines: list[str] = []
    for report in reports:
        lines += ["", f"### {report.framework} ({report.server})", ""]
        for result in report.results:
            mark = "pass" if result.passed else "FAIL"
            lines.append(f"- **{result.name}** ({mark}): {result.detail}")
            if not result.passed and result.name in KNOWN:
                lines.append(f"  - known: {KNOWN[result.name]}")
            for example in result.failures.examples:
                lines.append(f"  - {example}")
            if result.failures.count > len(result.failures.examples):
                lines.append(f"  - … {result.failures.count} failures in all")
    return lines
