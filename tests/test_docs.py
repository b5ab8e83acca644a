"""Every code block of the documentation site runs, and the docs agree with the code.

Python blocks run page by page in one namespace, in order, in a temporary directory; a block
titled ``name.py`` is also saved and imported as module ``name``. The apps of the
getting-started pages answer the ``curl`` commands their page shows. The testing page's
``conftest.py``, ``test_*.py`` and ``pytest.ini`` run as a pytest suite of their own, and the
Alembic page's ``env.py`` through Alembic. `nox -s docs` runs this file with every framework
installed (ALCHEMY_SCOPE_DOCS=1: nothing may be skipped); elsewhere it skips what is missing.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import re
import sqlite3
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REQUIRED = bool(os.environ.get("ALCHEMY_SCOPE_DOCS"))
_FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", flags=re.M | re.S)
_TITLE = re.compile(r'title="([^"]+)"')
_CURL = re.compile(r"`curl (?:-X (\w+) )?'?localhost:8000(/[^'`\s]*)'?`")
# Blocks that run as files of their own, not in the page's namespace.
_SUITE_FILES = re.compile(r"^(conftest\.py|test_\w+\.py|pytest\.ini|migrations/env\.py)$")


@dataclass
class Block:
    language: str
    title: str | None
    code: str


def blocks(page: Path) -> list[Block]:
    found = []
    for language, info, code in _FENCE.findall(page.read_text()):
        title = _TITLE.search(info)
        found.append(Block(language, title.group(1) if title else None, code))
    return found


PAGES = sorted(
    page for page in DOCS.rglob("*.md") if any(b.language == "python" for b in blocks(page))
)


def _require(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            if REQUIRED:
                pytest.fail(f"{module} is not installed, and nox -s docs needs every block run")
            pytest.skip(f"{module} is not installed")


def _imports(code: str) -> set[str]:
    return set(re.findall(r"^(?:from|import) (\w+)", code, flags=re.M))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory to run in, on sys.path; the modules the blocks import are forgotten after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        if getattr(module, "__file__", None) is None or str(tmp_path) in str(module.__file__):
            del sys.modules[name]


def _run_block(block: Block, namespace: dict[str, Any], directory: Path) -> None:
    if block.title and block.title.endswith(".py"):  # a module: saved, importable by name
        path = directory / block.title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.code)
        name = block.title.removesuffix(".py").replace("/", ".")
        module = types.ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module  # declarative models resolve Mapped[...] through it
        exec(compile(block.code, str(path), "exec"), module.__dict__)
        namespace.update(module.__dict__)
    else:
        exec(compile(block.code, block.title or "<docs block>", "exec"), namespace)


async def _answer(app: Any, requests: list[tuple[str, str]]) -> list[int]:
    import httpx
    from asgi_lifespan import LifespanManager

    statuses = []
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for method, path in requests:
                statuses.append((await client.request(method, path)).status_code)
    return statuses


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_python_blocks_run(page: Path, workdir: Path) -> None:
    page_blocks = blocks(page)
    own = {b.title.removesuffix(".py") for b in page_blocks if b.title}  # modules of the page
    _require(*{m for b in page_blocks if b.language == "python" for m in _imports(b.code)} - own)
    page_module = types.ModuleType("docs_page")  # declarative models resolve Mapped[...] here
    sys.modules["docs_page"] = page_module
    namespace = page_module.__dict__
    for block in page_blocks:
        if block.language == "python" and not _SUITE_FILES.match(block.title or ""):
            _run_block(block, namespace, workdir)
    requests = [(method or "GET", path) for method, path in _CURL.findall(page.read_text())]
    if requests:
        _require("httpx", "asgi_lifespan")
        statuses = asyncio.run(_answer(namespace["app"], requests))
        assert all(status < 400 for status in statuses), list(zip(requests, statuses, strict=True))


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``cwd``; fail the test with its output unless it succeeds."""
    done = subprocess.run(
        command, check=False, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _write_titled(page: Path, directory: Path) -> None:
    for block in blocks(page):
        if block.title:
            path = directory / block.title
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code)


def test_testing_recipe_passes_as_a_suite(tmp_path: Path) -> None:
    """The conftest.py, tests and pytest.ini of the testing section, run by pytest itself."""
    _require("starlette", "httpx", "asgi_lifespan", "pytest_asyncio")
    _write_titled(DOCS / "scripts-jobs-tests.md", tmp_path)
    run = _run(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", cwd=tmp_path
    )
    assert "2 passed" in run.stdout


def test_alembic_recipe_migrates(tmp_path: Path) -> None:
    """Alembic's async template with the page's env.py: autogenerate, then upgrade."""
    _require("alembic")

    def run(*args: str) -> None:
        _run(sys.executable, "-m", "alembic", *args, cwd=tmp_path)

    run("init", "-t", "async", "migrations")
    _write_titled(DOCS / "recipes" / "alembic.md", tmp_path)
    run("revision", "--autogenerate", "-m", "todos")
    run("upgrade", "head")
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:  # (its own `with` only commits)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"todos", "alembic_version"} <= tables


# --- the docs agree with the code ------------------------------------------------------


def _exceptions() -> dict[str, type]:
    import alchemy_scope

    found = {
        name: value
        for name, value in vars(alchemy_scope).items()
        if isinstance(value, type) and issubclass(value, alchemy_scope.AlchemyScopeError)
    }
    for adapter in ("alchemy_scope_starlette", "alchemy_scope_fastapi"):
        if importlib.util.find_spec(adapter) is not None:
            module = __import__(adapter)
            found.update(
                (name, value)
                for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, alchemy_scope.AlchemyScopeError)
            )
    found.pop("AlchemyScopeError")
    return found


def test_every_exception_has_a_section_and_its_message_links_to_it() -> None:
    from alchemy_scope import _errors

    headings = set(re.findall(r"^## (\w+)$", (DOCS / "errors.md").read_text(), flags=re.M))
    for name, exception in _exceptions().items():
        assert name in headings, f"docs/errors.md has no section for {name}"
        if exception.__module__ == _errors.__name__:
            assert f'_see("{name}")' in inspect.getsource(exception), name


def test_docs_url_is_the_site_url() -> None:
    from alchemy_scope._errors import DOCS_URL

    config = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {DOCS_URL}\n" in config


@pytest.mark.parametrize(
    "readme",
    ["core/README.md", *(str(p.relative_to(ROOT)) for p in ROOT.glob("adapters/*/README.md"))],
)
def test_long_descriptions_link_absolutely(readme: str) -> None:
    """A README is a distribution's page on the package index: relative links are dead there."""
    relative = re.findall(r"\]\((?!https?://|#)([^)]+)\)", (ROOT / readme).read_text())
    assert not relative, f"{readme}: relative links {relative}"


def test_commit_policies_page_shows_the_lifecycle_table() -> None:
    """The table comes from alchemy_scope._lifecycle's docstring, not the placeholder."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    table = hooks.lifecycle_table()
    assert "Placeholder" not in table
    assert "response start" in table
    assert ":sup:" not in table


@pytest.mark.parametrize(
    "package",
    [
        "alchemy_scope",
        "alchemy_scope_starlette",
        "alchemy_scope_fastapi",
        "alchemy_scope_litestar",
        "alchemy_scope_quart",
    ],
)
def test_api_reference_covers_every_public_name(package: str) -> None:
    _require(package)
    module = importlib.import_module(package)
    listed = set(re.findall(r"^::: (\S+)$", (DOCS / "api.md").read_text(), flags=re.M))
    missing = [name for name in module.__all__ if f"{package}.{name}" not in listed]
    if package == "alchemy_scope_fastapi":  # re-exported from the Starlette integration
        missing.remove("lifespan_disposing")
    assert not missing, f"docs/api.md lacks {missing}"
