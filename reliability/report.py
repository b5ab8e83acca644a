"""The summary tables: one row per framework, then every check by framework, then details."""

from __future__ import annotations

from dataclasses import dataclass, field

from tooling.report import table

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
    header = ["Framework", "Server", "Requests sent", "Responses by status", "Hung", "Leaks found"]
    rows = []
    for report in reports:
        counts = report.rows
        todos = f"todos {counts.acked:,} / {counts.found:,}"
        if counts.unknown:
            todos += f" (+{counts.unknown_found} of {counts.unknown} unacknowledged writes landed)"
        children = f"children {counts.children_expected} / {counts.children_found}"
        passed = sum(result.passed for result in report.results)
        rows.append([report.framework, report.server, f"{report.sent:,}", report.statuses,
                     report.hung, report.leaks_found, f"{todos}; {children}",
                     f"{passed}/{len(report.results)}"])  # fmt: skip
    return table([*header, "Rows expected / found", "Checks passed"], rows, numeric=1)


def checks_table(reports: list[FrameworkReport]) -> list[str]:
    """Every check by framework: pass, FAIL, or FAIL (known) with a footnote."""
    names = list(dict.fromkeys(result.name for report in reports for result in report.results))
    rows = []
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
        rows.append([name, *cells])
    return table(["Check", *(report.framework for report in reports)], rows)


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
