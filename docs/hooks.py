"""MkDocs hooks: pages that include files from the repository, which stay where they are.

``<!-- include PATH -->`` on a line of its own is replaced by that file (its headings one level
down, its relative links made absolute); ``<!-- lifecycle-table -->`` by the lifecycle table
in the docstring of ``alchemy_scope._lifecycle``; the benchmark plot is served as
``assets/bench.png``. Sphinx roles in docstrings are dropped.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "https://github.com/alchemy-scope/alchemy-scope/blob/main/"
LIFECYCLE = ROOT / "core" / "src" / "alchemy_scope" / "_lifecycle.py"
PLOT = ROOT / "benchmarks" / "results" / "bench.png"
_INCLUDE = re.compile(r"^<!-- include (\S+) -->$", flags=re.M)
_RELATIVE_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def included(path: str) -> str:
    """The file at ``path`` (from the repository root) as part of a page."""
    text = (ROOT / path).read_text()
    if text.startswith("# "):  # the page has a title of its own
        text = text.partition("\n")[2]
    base = str(Path(path).parent)
    text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)  # under the page's own title
    return _RELATIVE_LINK.sub(lambda m: f"]({SOURCE}{_joined(base, m.group(1))})", text)


def _joined(base: str, link: str) -> str:
    parts: list[str] = [] if base == "." else base.split("/")
    for part in link.split("/"):
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def lifecycle_table() -> str:
    """The lifecycle table of ``alchemy_scope._lifecycle`` with its notes, or a placeholder."""
    docstring = ast.get_docstring(ast.parse(LIFECYCLE.read_text())) if LIFECYCLE.exists() else None
    lines = (docstring or "").splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if first is None:
        return (
            '!!! warning "Placeholder"\n\n'
            "    The lifecycle table is written in the docstring of `alchemy_scope._lifecycle`;\n"
            "    this page shows it once that module is in the repository.\n"
        )
    text = "\n".join(lines[first:])  # the table, its numbered notes, the closing paragraph
    text = re.sub(r":(?:func|class|meth|attr|exc|mod|data|obj):`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`") + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace the include markers of a page."""
    markdown = _INCLUDE.sub(lambda m: included(m.group(1)), markdown)
    return markdown.replace("<!-- lifecycle-table -->", lifecycle_table())


_RST_ROLE = re.compile(r":(?:func|class|meth|attr|exc|mod|data|obj):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """Drop the Sphinx roles some docstrings use (``:func:`scope```): the name stays as code."""
    return _RST_ROLE.sub("", html)


def on_files(files: Files, config: Any) -> Files:
    """Serve the benchmark plot from benchmarks/results/ as assets/bench.png."""
    files.append(File.generated(config, "assets/bench.png", abs_src_path=str(PLOT)))
    return files
