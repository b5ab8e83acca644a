"""Fixtures shared by every test: one run per database leg, and a leak check after each test."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.pool import AsyncAdaptedQueuePool

from alchemy_scope import Database

from .models import Base
from .support import (
    DATABASES_ENV,
    assert_no_leaks,
    create_run_databases,
    database_legs,
    drop_run_databases,
    leg_id,
    leg_options,
    through_pgbouncer,
)

pytest_plugins = ["pytester"]
# The shared scenario and contract modules hold assertions too: show their values on failure.
pytest.register_assert_rewrite("tests.adapters.scenarios", "tests.examples.contract")

MakeDatabase = Callable[..., Database]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames:
        legs = database_legs()
        metafunc.parametrize("database_url", legs, ids=[leg_id(url) for url in legs])


def _enable_sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@pytest.fixture
def leg_url(database_url: str, tmp_path: Path) -> str:
    """The URL of this test's database: a SQLite file of its own, or this run's database."""
    if database_url == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    return database_url


@pytest.fixture
async def make_db(leg_url: str) -> AsyncIterator[MakeDatabase]:
    """A factory of Databases on this leg's database, with fresh tables; leak-checked at the end."""
    url = leg_url
    made: list[Database] = []

    def make(**options: Any) -> Database:
        if url.startswith("sqlite"):  # a real pool to check for leaks (older SQLAlchemy: NullPool)
            engine_options = options.get("engine_options", {})
            options["engine_options"] = {"poolclass": AsyncAdaptedQueuePool, **engine_options}
        database = Database(url, **leg_options(url), **options)
        if database.engine.dialect.name == "sqlite":
            event.listen(database.engine.sync_engine, "connect", _enable_sqlite_foreign_keys)
        made.append(database)
        return database

    first = make()
    async with first.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    yield make
    try:
        await assert_no_leaks(*made)
    finally:
        if not url.startswith("sqlite"):  # a SQLite file goes with the test's tmp_path
            async with first.engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
        for database in made:
            await database.dispose()


@pytest.fixture
def db(make_db: MakeDatabase) -> Database:
    """A Database with the default (manual) commit policy."""
    return make_db()


@pytest.fixture
def autocommit_db(make_db: MakeDatabase) -> Database:
    """A Database that commits when the scope succeeds."""
    return make_db(commit="autocommit")


def pytest_configure(config: pytest.Config) -> None:
    """Give this run databases of its own; on CI, require every database leg."""
    if os.environ.get("CI"):
        legs = database_legs()
        # `nox -s pgbouncer` runs the PostgreSQL legs through PgBouncer, and only them.
        required = {"pgbouncer"} if any(map(through_pgbouncer, legs)) else {"postgresql", "mysql"}
        missing = required - {leg_id(url) for url in legs}
        if missing:
            raise pytest.UsageError(
                f"CI must test every database leg, but {sorted(missing)} are not in "
                f"{DATABASES_ENV}; .ci/run sets it."
            )
    create_run_databases()


# Where every test says in a one-line docstring what it proves (nodeids start with these).
DOCUMENTED = ("tests/adapters/", "tests/examples/", "examples/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse to run a test of DOCUMENTED that has no one-line docstring."""
    undocumented = [
        item.nodeid
        for item in items
        if isinstance(item, pytest.Function)
        and item.nodeid.startswith(DOCUMENTED)
        and len((item.function.__doc__ or "").strip().splitlines()) != 1
    ]
    if undocumented:
        raise pytest.UsageError(
            "Say in a one-line docstring what each test proves: " + ", ".join(undocumented)
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Count the fault-matrix cases per database; list those that failed as known."""
    matrix = sys.modules.get("tests.fault_matrix")
    counts = getattr(matrix, "CASES_RUN", {})
    if counts:
        terminalreporter.section("fault matrix")
        terminalreporter.line(", ".join(f"{n} cases on {leg}" for leg, n in sorted(counts.items())))
    seen = getattr(matrix, "KNOWN_SEEN", [])
    if seen:
        terminalreporter.section("known fault-matrix defects (still present)")
        for line in seen:
            terminalreporter.line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    drop_run_databases()
